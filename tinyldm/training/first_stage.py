"""The first stage a diffusion run stands on: the autoencoder checkpoint it is given, or one that
train_ae.py trains for it in a child process; and, on --resume, the check that it is still the
same file (ldm.pt holds its SHA-256).
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
from pathlib import Path

from ..checkpoint import load_checkpoint
from ..cli import UsageError
from ..files import file_digest
from .distributed import World
from .loop import resume_command


def first_stage(args: argparse.Namespace, config, out: Path, argv: list[str],
                script_dir: Path) -> Path:
    """The autoencoder checkpoint of this run: --ae, the one trained for it before in <out>/ae, or
    one that train_ae.py trains now (or continues, when it was cut short) with the preset
    `config.ae_preset` on the same data."""
    if args.ae:
        return Path(args.ae)
    path = out / "ae" / "autoencoder.pt"
    unfinished = False
    if path.exists():
        stored = load_checkpoint(path, kind="autoencoder")
        unfinished = stored["step"] < stored["train_config"]["steps"]
        if not unfinished:
            return path
        print(f"the autoencoder in {path} stopped at step {stored['step']} of "
              f"{stored['train_config']['steps']}: continuing it")
    if World.current().enabled:
        raise UsageError(f"no --ae: under torchrun every process would wait while one trained the "
                         f"autoencoder. Train it first "
                         f"(python train_ae.py --preset {config.ae_preset} --out DIR, or torchrun "
                         "for a KL one), then pass --ae DIR/autoencoder.pt")
    cmd = train_ae_flags(args, config, out) + (["--resume"] if unfinished else [])
    if not unfinished:
        print(f"no --ae given: training the autoencoder first "
              f"(python train_ae.py {' '.join(cmd)})", flush=True)
    status = run_script(script_dir / "train_ae.py", cmd)
    if status in (128 + signal.SIGINT, 128 + signal.SIGTERM):  # it checkpointed and said so
        print(f"Continue with: {resume_command('train_ldm.py', argv)}", file=sys.stderr, flush=True)
        raise SystemExit(status)
    if status:
        raise UsageError(f"train_ae.py ended with exit status {status} (its message is above); "
                         f"fix that, then run this command again")
    return path


def train_ae_flags(args: argparse.Namespace, config, out: Path) -> list[str]:
    """train_ae.py's flags for the first stage of this run: the preset `config.ae_preset`, into
    <out>/ae, on the same images as the LDM."""
    cmd = ["--preset", config.ae_preset, "--out", str(out / "ae"), "--device", args.device]
    cmd += ["--smoke"] if args.smoke else []
    cmd += ["--steps", str(config.ae_steps)] if config.ae_steps and not args.smoke else []
    cmd += ["--tensorboard", "true"] if config.tensorboard else []
    if config.dataset != "shapes":  # the first stage learns the same images as the second
        cmd += ["--dataset", config.dataset, "--data", str(args.data),
                "--image_size", str(config.image_size), "--n_train", str(config.n_train)]
    return cmd


def check_pinned_autoencoder(args: argparse.Namespace, out: Path, stored: dict | None) -> None:
    """A resumed run continues on the autoencoder it was trained on, unchanged: refuses another
    --ae, and a file whose bytes changed since (ldm.pt holds its SHA-256)."""
    if not stored:
        return
    pinned = Path(stored["ae_path"])
    if args.ae and Path(args.ae).resolve() != pinned.resolve():
        raise UsageError(f"--resume continues the run in {out}, whose UNet was trained on the "
                         f"autoencoder {pinned}; --ae {args.ae} is another. Drop --ae to continue "
                         f"it, or start a new run (another --out) with --ae {args.ae}")
    if not pinned.exists():
        raise UsageError(f"the run in {out} was trained on the autoencoder {pinned}, which is no "
                         "longer there: put it back to continue, or start a new run")
    if stored.get("ae_digest") not in (None, file_digest(pinned)):
        raise UsageError(f"the autoencoder {pinned} changed after the run in {out} began (its "
                         "SHA-256 differs from the one in ldm.pt): the UNet was trained on the "
                         "old one's latents. Put the old file back to continue, or start a new "
                         f"run (another --out) with --ae {pinned}")


def run_script(script: Path, argv: list[str]) -> int:
    """`python script argv` in a child process; its exit status. Ctrl-C reaches the child from the
    terminal (it finishes its step and checkpoints), so this process ignores it meanwhile; a SIGTERM
    sent to this process is passed on."""
    with subprocess.Popen([sys.executable, str(script), *argv]) as child:
        previous = {signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
                    signal.SIGTERM: signal.signal(signal.SIGTERM,
                                                  lambda signum, _: child.send_signal(signum))}
        try:
            return child.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
