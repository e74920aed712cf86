"""Failures a user can cause: each ends in one line (`error: ...`, exit status 2) and loses nothing.

The bad-input corpus runs every tool's `main` through `tinyldm.cli.run`, as `python <script>` does
(a few run as real subprocesses, to check that wiring); the signal, lock, full-disk and resume tests
train smoke models.
"""

import contextlib
import errno
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import sample
import train_ae
import train_ldm
from tinyldm import checkpoint as checkpoint_module
from tinyldm.checkpoint import load_checkpoint
from tinyldm.cli import UsageError, run
from tinyldm.course.__main__ import main as course_main
from tinyldm.tools.evaluate import main as evaluate_main
from tinyldm.training.loop import GracefulStop, resume_command
from tinyldm.training.run_lock import RunLock

pytestmark = pytest.mark.slow  # the scripts against bad inputs, signals and faults, end to end

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--smoke", "--device", "cpu", "--sample_every", "100000", "--eval_images", "0"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A smoke LDM (text-conditioned shapes) and its autoencoder, plus bad files to feed the
    tools."""
    root = tmp_path_factory.mktemp("failures")
    out = root / "run"
    train_ldm.main(["--smoke", "--out", str(out), "--device", "cpu"])
    good = out / "ldm.pt"
    data = good.read_bytes()
    (root / "truncated.pt").write_bytes(data[: len(data) // 2])
    (root / "random.pt").write_bytes(os.urandom(4096))
    (root / "empty.pt").write_bytes(b"")
    (root / "a_file").write_text("not a folder")
    return {"root": root, "ldm": good, "ae": out / "ae" / "autoencoder.pt"}


def one_error_line(capsys, main, argv) -> str:
    """Run main(argv) as the command line would; assert exit status 2 and a single `error:` line on
    stderr."""
    with pytest.raises(SystemExit) as exit_info:
        run(main, argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines()
             if line.strip() and not re.search(r"\d+/\d+ \[", line)]  # bars
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ----------------------------------------------------------------------------------------------
# The corpus: (argv with {ldm} / {ae} / {root} placeholders, words the message must contain)

SAMPLE_PROBES = [
    (["--ckpt", "{root}/missing.pt"], "does not exist"),
    (["--ckpt", "{root}/truncated.pt"], "truncated, corrupt"),
    (["--ckpt", "{root}/random.pt"], "could not be read"),
    (["--ckpt", "{root}/empty.pt"], "is empty"),
    (["--ckpt", "{ae}"], "'autoencoder' checkpoint, expected a 'ldm'"),
    (["--ckpt", "{ldm}", "--prompt", " ".join(["a red circle"] * 10)], "reads at most"),
    (["--ckpt", "{ldm}", "--steps", "0"], "--steps 0"),
    (["--ckpt", "{ldm}", "--steps", "-5"], "--steps -5"),
    (["--ckpt", "{ldm}", "--steps", "ten"], "invalid int value"),
    (["--ckpt", "{ldm}", "--n", "0"], "--n 0"),
    (["--ckpt", "{ldm}", "--eta", "7"], "--eta 7"),
    (["--ckpt", "{ldm}", "--guidance", "-2"], "--guidance -2"),
    (["--ckpt", "{ldm}", "--seed", "-1"], "--seed -1"),
    (["--ckpt", "{ldm}", "--height", "100000", "--width", "100000"], "needs about"),
    (["--ckpt", "{ldm}", "--height", "33"], "multiples of"),
    (["--ckpt", "{ldm}", "--height", "0"], "--height 0"),
    (["--ckpt", "{ldm}", "--class", "red circle"], "use --prompt"),
    (["--ckpt", "{ldm}", "--from_eval", "4"], "--from_eval is for"),
    (["--ckpt", "{ldm}", "--sampler", "euler"], "invalid choice"),
    (["--ckpt", "{ldm}", "--out", "{root}"], "is a folder"),
    (["--ckpt", "{ldm}", "--out", "{root}/a_file/grid.png"], "is a file"),
    (["--prompt", "a red circle"], "one of the arguments --ckpt --pretrained is required"),
    (["--ckpt", "{ldm}", "--bogus"], "unrecognized arguments"),
]

TRAIN_LDM_PROBES = [
    (["--steps", "0"], "--steps 0: must be a whole number >= 1"),
    (["--batch_size", "-1"], "--batch_size -1"),
    (["--lr", "0"], "--lr 0.0: must be a learning rate"),
    (["--lr", "nan"], "--lr nan"),
    (["--image_size", "0"], "--image_size 0"),
    (["--channel_mult", "1,0"], "--channel_mult 1,0"),
    (["--max_shapes", "10"], "--max_shapes 10"),
    (["--p_uncond", "1.5"], "--p_uncond 1.5"),
    (["--ema_decay", "1"], "--ema_decay 1.0"),
    (["--eval_steps", "0"], "--eval_steps 0"),
    (["--preset", "shapes", "--data", "{root}"], "would be ignored"),
    (["--ae", "{root}/missing.pt"], "does not exist"),
    (["--ae", "{ldm}"], "'ldm' checkpoint, expected a 'autoencoder'"),
    (["--preset", "nope"], "invalid choice"),
    (["--cond", "sound"], "--cond sound: must be one of text, class, layout, none, auto"),
    (["--resume", "--out", "{root}/nothing_here"], "nothing to continue"),
    (["--ae", "{ae}", "--batch_size", "100000000"], "--batch_size"),
    (["--ae", "{ae}", "--image_size", "20"], "cannot halve evenly"),
]

TRAIN_AE_PROBES = [
    (["--steps", "0"], "--steps 0"),
    (["--batch_size", "0"], "--batch_size 0"),
    (["--lr", "-1"], "--lr -1.0"),
    (["--image_size", "30"], "must be a multiple of the autoencoder's downsampling factor"),
    (["--kl_weight", "-1"], "--kl_weight -1.0"),
    (["--resume", "{root}/missing.pt"], "does not exist"),
    (["--resume", "{ldm}"], "'ldm' checkpoint, expected a 'autoencoder'"),
    (["--batch_size", "100000000"], "--batch_size"),
    (["--steps", "many"], "invalid int value"),
]

EVALUATE_PROBES = [
    (["--ckpt", "{root}/missing.pt"], "does not exist"),
    (["--ckpt", "{root}/truncated.pt"], "truncated, corrupt"),
    (["--ckpt", "{ae}"], "expected a 'ldm'"),
    (["--ckpt", "{ldm}", "--n", "0"], "--n 0"),
    (["--ckpt", "{ldm}", "--steps", "0"], "--steps 0"),
    (["--ckpt", "{ldm}", "--eta", "2"], "--eta 2"),
    (["--ckpt", "{ldm}", "--sweep_steps", "10", "0"], "--steps 0"),
    (["--ckpt", "{ldm}", "--json", "{root}"], "is a folder"),
    (["--n", "10"], "one of the arguments --ckpt --pretrained is required"),
]


def _fill(argv: list[str], trained: dict) -> list[str]:
    return [a.format(ldm=trained["ldm"], ae=trained["ae"], root=trained["root"]) for a in argv]


@pytest.mark.parametrize("argv, words", SAMPLE_PROBES,
                         ids=[" ".join(a)[-40:] for a, _ in SAMPLE_PROBES])
def test_sample_py_bad_inputs_end_in_one_line(trained, capsys, argv, words):
    argv = _fill(argv, trained)
    if "--out" not in argv:
        argv += ["--out", str(trained["root"] / "grid.png")]
    assert words in one_error_line(capsys, sample.main, argv)
    assert not (trained["root"] / "grid.png").exists()  # refused before any work


@pytest.mark.parametrize("argv, words", TRAIN_LDM_PROBES,
                         ids=[" ".join(a)[-40:] for a, _ in TRAIN_LDM_PROBES])
def test_train_ldm_py_bad_inputs_end_in_one_line(trained, capsys, tmp_path, argv, words):
    argv = _fill(argv, trained)
    out = [] if "--out" in argv else ["--out", str(tmp_path / "run")]
    assert words in one_error_line(capsys, train_ldm.main,
                                   ["--smoke", "--device", "cpu", *out, *argv])
    assert not (tmp_path / "run" / "ldm.pt").exists()


@pytest.mark.parametrize("argv, words", TRAIN_AE_PROBES,
                         ids=[" ".join(a)[-40:] for a, _ in TRAIN_AE_PROBES])
def test_train_ae_py_bad_inputs_end_in_one_line(trained, capsys, tmp_path, argv, words):
    argv = _fill(argv, trained)
    assert words in one_error_line(capsys, train_ae.main,
                                   ["--smoke", "--device", "cpu", "--out", str(tmp_path / "ae"),
                                    *argv])
    assert not (tmp_path / "ae" / "autoencoder.pt").exists()


@pytest.mark.parametrize("argv, words", EVALUATE_PROBES,
                         ids=[" ".join(a)[-40:] for a, _ in EVALUATE_PROBES])
def test_evaluate_bad_inputs_end_in_one_line(trained, capsys, argv, words):
    assert words in one_error_line(capsys, evaluate_main,
                                   [*_fill(argv, trained), "--device", "cpu"])


def test_course_kit_bad_inputs_end_in_one_line(trained, capsys, tmp_path):
    assert "unknown assignments" in one_error_line(capsys, course_main,
                                                   ["student", "--out", str(tmp_path / "s"),
                                                    "--only", "no_such_assignment"])
    assert "is not a folder" in one_error_line(capsys, course_main,
                                               ["grade", "--submission", str(tmp_path / "x")])
    assert "required" in one_error_line(capsys, course_main, ["student"])
    assert "unknown assignment" in one_error_line(capsys, course_main, ["check", "backprop"])


def test_the_scripts_wire_the_one_line_errors_and_debug_shows_the_traceback(trained):
    """The real command lines: exit status 2 and one stderr line; --debug adds the traceback."""
    missing = str(trained["root"] / "missing.pt")
    for cmd in ([sys.executable, "sample.py", "--ckpt", missing],
                [sys.executable, "train_ldm.py", "--smoke", "--steps", "0"],
                [sys.executable, "train_ae.py", "--smoke", "--out", str(trained["root"] / "ae0"),
                 "--lr", "-1"],
                [sys.executable, "-m", "tinyldm.tools.evaluate", "--ckpt", missing]):
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert p.returncode == 2, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1 and p.stderr.startswith("error: "), p.stderr
    p = subprocess.run([sys.executable, "sample.py", "--ckpt", missing, "--debug"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert (p.returncode == 2 and "Traceback" in p.stderr
            and p.stderr.strip().splitlines()[-1].startswith("error:"))
    p = subprocess.run([sys.executable, "sample.py", "--ckpt", missing], cwd=ROOT,
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "TINYLDM_DEBUG": "1"})
    assert "Traceback" in p.stderr


def test_a_bug_keeps_its_traceback(capsys):
    def buggy(argv):
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        run(buggy, [])


# ----------------------------------------------------------------------------------------------
# Memory estimates


def test_the_sampling_memory_estimate_grows_as_the_model_does(trained):
    """Activations grow with the pixels, self-attention with their square: the estimate follows
    both, and the sizes it offers as fitting do fit by its own measure."""
    from tinyldm.checkpoint import load_ldm
    from tinyldm.memory import SamplingEstimate

    ckpt = load_checkpoint(trained["ldm"], kind="ldm")
    denoiser, _, ae, _ = load_ldm(ckpt)
    est = SamplingEstimate(denoiser, ae, (8, 8))
    fixed = est.fixed
    growth = ((est.bytes(1, 1024, 1024, guided=True) - fixed)
              / (est.bytes(1, 512, 512, guided=True) - fixed))
    # the fused kernel holds no attention matrix: linear in pixels
    assert growth == pytest.approx(4, rel=0.02)
    # the explicit formula holds (queries x keys) per head: self-attention is quadratic
    explicit_unet = {**ckpt["unet_config"], "fused_attention": False}
    explicit = SamplingEstimate(load_ldm({**ckpt, "unet_config": explicit_unet})[0], ae, (8, 8))
    growth = ((explicit.bytes(1, 1024, 1024, guided=True) - fixed)
              / (explicit.bytes(1, 512, 512, guided=True) - fixed))
    assert growth > 10
    assert explicit.bytes(1, 64, 64, guided=True) > est.bytes(1, 64, 64, guided=True)
    # guidance doubles the UNet batch
    assert est.bytes(8, 32, 32, guided=True) > est.bytes(8, 32, 32, guided=False)
    with pytest.raises(UsageError,
                       match=r"needs about .* largest square that fits is about (\d+)x\1") as info:
        est.check(1, 100_000, 100_000, guided=True, device=torch.device("cpu"))
    side = int(str(info.value).split("about ")[-1].split("x")[0])
    from tinyldm.memory import available_bytes

    assert est.bytes(1, side, side, guided=True) <= 0.9 * available_bytes(torch.device("cpu"))


# ----------------------------------------------------------------------------------------------
# Signals, SIGKILL and resume


def _start(script: str, argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, script, *argv], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            # as the tests: 1 thread
                            env={**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"})


def _wait_for_steps(log: Path, steps: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    start = time.time()
    while time.time() - start < timeout:
        # the training records (the quality curve's points are records too)
        lines = log.read_text().splitlines() if log.exists() else []
        if sum('"quality"' not in line for line in lines) >= steps:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.communicate()}")
        time.sleep(0.05)
    raise AssertionError("the run did not get going")


def _weights(path: Path) -> dict:
    ckpt = load_checkpoint(path)
    parts = ("denoiser", "ema", "optimizer", "autoencoder", "ema_autoencoder", "opt_ae",
             "discriminator")
    return {k: v for part in parts if isinstance(ckpt.get(part), dict)
            for k, v in _flat(ckpt[part], part).items()}


def _flat(d: dict, prefix: str) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}.{k}"))
        elif isinstance(v, torch.Tensor):
            out[f"{prefix}.{k}"] = v
    return out


def _assert_same_weights(a: Path, b: Path) -> int:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and len(wa) > 10
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    return len(wa)


@pytest.fixture(scope="module")
def ldm_reference(trained, tmp_path_factory):
    """An uninterrupted 120-step smoke LDM run, to compare interrupted-and-resumed runs with."""
    out = tmp_path_factory.mktemp("reference") / "run"
    argv = [*FAST, "--ae", str(trained["ae"]), "--steps", "120", "--ckpt_every", "40",
            "--log_every", "1"]
    train_ldm.main([*argv, "--out", str(out)])
    return argv, out / "ldm.pt"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL],
                         ids=["SIGINT", "SIGTERM", "SIGKILL"])
def test_a_signal_mid_training_loses_nothing_and_resume_is_exact(ldm_reference, tmp_path, sig):
    argv, reference = ldm_reference
    out = tmp_path / "run"
    proc = _start("train_ldm.py", [*argv, "--out", str(out)])
    _wait_for_steps(out / "log.jsonl", 50 if sig == signal.SIGKILL else 10, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
        step = load_checkpoint(out / "ldm.pt")["step"]
        # the last periodic checkpoint; the steps after it are lost, as SIGKILL allows
        assert step == 40
    else:
        assert proc.returncode == 128 + sig, err
        step = load_checkpoint(out / "ldm.pt")["step"]
        assert 10 <= step < 120
        assert f"stopped by {signal.Signals(sig).name} after step {step} of 120" in err
        assert "Continue with: python train_ldm.py" in err and err.rstrip().endswith("--resume")
    assert not (out / ".lock").exists() or sig == signal.SIGKILL
    # a lock left by SIGKILL is stale: taken over
    train_ldm.main([*argv, "--out", str(out), "--resume"])
    assert _assert_same_weights(out / "ldm.pt", reference) > 100


def test_sigterm_while_the_autoencoder_trains(tmp_path):
    """train_ae.py stops the same way, and its resumed run equals an uninterrupted one."""
    argv = ["--smoke", "--device", "cpu", "--steps", "150", "--log_every", "1",
            "--sample_every", "100000", "--ckpt_every", "1000"]
    reference = tmp_path / "reference"
    train_ae.main([*argv, "--out", str(reference)])
    out = tmp_path / "run"
    proc = _start("train_ae.py", [*argv, "--out", str(out)])
    _wait_for_steps(out / "log.jsonl", 20, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Continue with: python train_ae.py" in err
    assert load_checkpoint(out / "autoencoder.pt")["step"] < 150
    train_ae.main([*argv, "--out", str(out), "--resume"])
    _assert_same_weights(out / "autoencoder.pt", reference / "autoencoder.pt")


def test_a_second_ctrl_c_stops_at_once():
    before = signal.getsignal(signal.SIGINT)
    with GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert stop.requested and stop.signal == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
    assert signal.getsignal(signal.SIGINT) is before  # restored


def test_the_resume_command_repeats_the_flags():
    assert resume_command("train_ldm.py", ["--preset", "shapes", "--out", "a b"]) == \
        "python train_ldm.py --preset shapes --out 'a b' --resume"
    assert resume_command("train_ae.py", ["--resume", "x.pt", "--steps", "5"]) == \
        "python train_ae.py --steps 5 --resume"


def test_resume_refuses_flags_that_change_the_run_and_allows_the_others(ldm_reference, capsys,
                                                                        tmp_path):
    argv, reference = ldm_reference
    out = tmp_path / "run"
    train_ldm.main([*argv, "--out", str(out), "--steps", "40"])
    message = one_error_line(capsys, train_ldm.main,
                             [*argv, "--out", str(out), "--steps", "120", "--resume",
                              "--lr", "0.5", "--batch_size", "4"])
    assert "--lr 0.5 (the run has" in message and "--batch_size 4 (the run has" in message
    assert load_checkpoint(out / "ldm.pt")["step"] == 40
    # safe to change
    train_ldm.main([*argv, "--out", str(out), "--resume", "--log_every", "7", "--steps", "120"])
    _assert_same_weights(out / "ldm.pt", reference)


# ----------------------------------------------------------------------------------------------
# One run per folder


def test_a_second_run_in_the_same_folder_is_refused_and_a_stale_lock_is_taken_over(trained, capsys,
                                                                                   tmp_path):
    out = tmp_path / "run"
    argv = [*FAST, "--ae", str(trained["ae"]), "--steps", "100000", "--log_every", "1",
            "--out", str(out)]
    first = _start("train_ldm.py", argv)
    try:
        _wait_for_steps(out / "log.jsonl", 1, first)
        message = one_error_line(capsys, train_ldm.main, argv)
        assert f"is in use by process {first.pid}" in message and "train_ldm.py" in message
    finally:
        first.kill()
        first.wait()
    assert json.loads((out / ".lock").read_text())["pid"] == first.pid  # SIGKILL leaves it behind
    result = train_ldm.main([*FAST, "--ae", str(trained["ae"]), "--steps", "3", "--out", str(out)])
    # the stale lock was taken over
    assert result["steps"] == 3 and "taking over" in capsys.readouterr().out


def test_the_lock_names_a_live_owner_and_is_released(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from tinyldm.training.run_lock import RunLock; "
         f"RunLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
        cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UsageError, match=f"in use by process {holder.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = RunLock(tmp_path).acquire()  # the kernel dropped the killed holder's lock: taken
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert RunLock(tmp_path).acquire() is not None  # re-entrant within a process
    lock.release()
    assert (tmp_path / ".lock").exists()  # still held once
    lock.release()
    assert not (tmp_path / ".lock").exists()


def test_many_simultaneous_starts_on_a_stale_lock_never_give_two_holders(tmp_path):
    """100 rounds: a killed run's lock file is left behind, then 8 processes try to take it at
    the same moment. Each holder logs when it enters and leaves; no two may overlap."""
    log = tmp_path / "log"
    for round_ in range(100):
        (tmp_path / ".lock").write_text(json.dumps({"pid": 999_999_999,
                                                    "host": os.uname().nodename}))
        gate_r, gate_w = os.pipe()
        children = []
        for _ in range(8):
            pid = os.fork()
            if pid == 0:  # a contender: wait for the gate, try once
                code = 0
                try:
                    os.close(gate_w)
                    os.read(gate_r, 1)
                    lock = RunLock(tmp_path)
                    try:
                        with contextlib.redirect_stdout(io.StringIO()):
                            lock.acquire()
                    except UsageError:
                        pass
                    else:
                        with open(log, "a") as f:
                            f.write(f"in {round_} {os.getpid()}\n")
                        time.sleep(0.01)
                        with open(log, "a") as f:
                            f.write(f"out {round_} {os.getpid()}\n")
                        lock.release()
                except BaseException:
                    code = 1
                os._exit(code)
            children.append(pid)
        os.close(gate_r)
        os.close(gate_w)  # every contender starts now
        assert all(os.waitpid(pid, 0)[1] == 0 for pid in children)
    events = [line.split() for line in log.read_text().splitlines()]
    holders = 0
    for kind, _, _ in events:
        holders += 1 if kind == "in" else -1
        assert holders in (0, 1), "two processes held the lock at once"
    rounds = {r for kind, r, _ in events if kind == "in"}
    assert len(rounds) == 100  # every round had a holder


# ----------------------------------------------------------------------------------------------
# Faults while writing


def test_a_disk_full_during_a_checkpoint_leaves_the_previous_one(trained, capsys, tmp_path,
                                                                 monkeypatch):
    """The second checkpoint write fails half-way (ENOSPC): the run ends in one line, ldm.pt still
    holds step 3, no temporary file is left, and --resume continues from it."""
    real_save, calls = torch.save, []

    # torch.save, failing on the second LDM checkpoint
    def save_until_the_disk_fills(obj, f, *args, **kwargs):
        calls.extend([1] if isinstance(obj, dict) and obj.get("kind") == "ldm" else [])
        if len(calls) == 2 and obj.get("kind") == "ldm":
            f.write(b"PK\x03\x04" + b"\0" * 1000)  # part of a file, as a disk filling up leaves it
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    out = tmp_path / "run"
    argv = [*FAST, "--ae", str(trained["ae"]), "--steps", "6", "--ckpt_every", "3",
            "--out", str(out)]
    monkeypatch.setattr(checkpoint_module.torch, "save", save_until_the_disk_fills)
    message = one_error_line(capsys, train_ldm.main, argv)
    assert "No space left on device" in message and "still holds the previous checkpoint" in message
    assert load_checkpoint(out / "ldm.pt")["step"] == 3
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setattr(checkpoint_module.torch, "save", real_save)
    train_ldm.main([*argv, "--resume"])
    assert load_checkpoint(out / "ldm.pt")["step"] == 6


def test_a_disk_full_while_writing_the_latent_cache_ends_in_one_line_and_leaves_no_file(
        trained, capsys, tmp_path, monkeypatch):
    """The latent cache's write fails half-way (ENOSPC): one line, and no temporary file left on
    the full disk."""
    from tinyldm.data import latents

    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and "key" in obj and hasattr(f, "write"):
            f.write(b"PK\x03\x04" + b"\0" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    out = tmp_path / "run"
    monkeypatch.setattr(latents.torch, "save", full_disk)
    message = one_error_line(capsys, train_ldm.main,
                             [*FAST, "--ae", str(trained["ae"]), "--steps", "2", "--out", str(out)])
    assert "writing the latent cache" in message and "No space left on device" in message
    assert "nothing was written" in message and "temporary file was removed" in message
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("size, what", [("32k", "the latent cache"), ("1m", "the checkpoint")])
def test_a_real_full_disk_ends_in_one_line_and_leaves_no_temporary_file(trained, tmp_path, size,
                                                                        what):
    """train_ldm.py on a tmpfs of 32 KiB (the latent cache, 70 KB, does not fit) or 1 MiB (the
    checkpoint does not), in a mount namespace of its own (needs root or user namespaces): one line
    saying the disk is full, exit status 2, no temporary file left on it."""
    disk = tmp_path / "disk"
    disk.mkdir()
    script = (f"mount -t tmpfs -o size={size} tmpfs {disk} && {sys.executable} train_ldm.py "
              f"{' '.join(FAST)} --ae {trained['ae']} --steps 2 --out {disk}/run; "
              f"echo status $?; ls -A {disk}/run")
    for prefix in (["unshare", "-m"], ["unshare", "-r", "-m"]):
        proc = subprocess.run([*prefix, "sh", "-c", script], cwd=ROOT, capture_output=True,
                              text=True, timeout=600)
        if "status" in proc.stdout:
            break
    else:
        pytest.skip(f"no mount namespace here: {proc.stderr.strip()[:200]}")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert "status 2" in proc.stdout and len(errors) == 1, proc.stderr[-2000:]
    assert f"writing {what}" in errors[0] and "No space left on device" in errors[0]
    assert "temporary file was removed" in errors[0]
    left = proc.stdout.split("status 2")[1].split()
    assert not [name for name in left if name.endswith(".tmp")], left


def test_a_truncated_latent_cache_is_rebuilt_with_a_warning(trained, tmp_path):
    out = tmp_path / "run"
    argv = [*FAST, "--ae", str(trained["ae"]), "--steps", "2", "--out", str(out)]
    first = train_ldm.main(argv)
    cache = out / "latents.pt"
    cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 3])
    with pytest.warns(UserWarning, match="latent cache .* is unreadable"):
        second = train_ldm.main(argv)
    assert load_checkpoint(out / "ldm.pt")["step"] == 2
    assert first["steps"] == second["steps"] == 2
    torch.load(cache, weights_only=True)  # whole again


# ----------------------------------------------------------------------------------------------
# Image folders: what is not an image, what declares too many pixels, malformed metadata


def _png_declaring(width: int, height: int) -> bytes:
    """A few hundred bytes of PNG whose header declares width x height 16-bit RGBA pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, 16, 6, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_a_folder_skips_a_fifo_and_an_image_that_declares_too_many_pixels(tmp_path):
    from PIL import Image

    from tinyldm.data.images import DataConfig, folder_dataset, load_image

    root = tmp_path / "images"
    root.mkdir()
    for i in range(4):
        Image.new("RGB", (40, 40), (60 * i, 0, 0)).save(root / f"ok{i}.png")
    os.mkfifo(root / "a.png")  # opening it to read would block for ever
    (root / "huge.png").write_bytes(_png_declaring(12_000, 12_000))
    assert (root / "huge.png").stat().st_size < 1000
    signal.alarm(60)  # a blocked read fails the test instead of hanging it
    try:
        with pytest.warns(UserWarning, match=r"not a regular file \(1\): a.png"):
            data = folder_dataset(DataConfig(source="folder", root=str(root), image_size=32),
                                  split="all")
        with pytest.warns(UserWarning, match="declares 12000 x 12000 pixels"):
            items = [data[i] for i in range(len(data))]
        with pytest.raises(ValueError, match="not a regular file"):
            load_image(root / "a.png", 32)
    finally:
        signal.alarm(0)
    assert len(items) == len(data) == 5
    assert [Path(p).name for p in data.bad_files()] == ["huge.png"]
    assert "1 unreadable and skipped" in data.summary()


@pytest.mark.parametrize("line, words", [
    (b'{"file_name": "ok0.png", "text": "caf\xe9"}\n', "line 2: not UTF-8 text"),
    (b'{"file_name": 3, "text": "a red square"}\n', "line 2: field 'file_name' must be a string"),
    (b'{"file_name": "ok0.png", "text": ["a"]}\n', "line 2: field 'text' must be a string"),
    (b'["ok0.png", "a red square"]\n', "line 2: expected a JSON object"),
])
def test_a_malformed_metadata_line_ends_in_one_line_naming_file_line_and_field(
        capsys, tmp_path, line, words):
    from PIL import Image

    root = tmp_path / "images"
    root.mkdir()
    for i in range(4):
        Image.new("RGB", (40, 40), (60 * i, 0, 0)).save(root / f"ok{i}.png")
    (root / "metadata.jsonl").write_bytes(b'{"file_name": "ok1.png", "text": "fine"}\n' + line)
    message = one_error_line(capsys, train_ldm.main, [*FAST, "--data", str(root), "--steps", "1",
                                                      "--out", str(tmp_path / "run")])
    assert "metadata.jsonl" in message and words in message


# ----------------------------------------------------------------------------------------------
# A run is pinned to its autoencoder


def test_resume_refuses_another_autoencoder_and_a_changed_one(trained, capsys, tmp_path):
    ae = tmp_path / "ae.pt"
    ae.write_bytes(Path(trained["ae"]).read_bytes())
    out = tmp_path / "run"
    argv = [*FAST, "--ae", str(ae), "--steps", "2", "--out", str(out)]
    train_ldm.main(argv)
    assert load_checkpoint(out / "ldm.pt")["ae_digest"]
    message = one_error_line(capsys, train_ldm.main, [*FAST, "--ae", str(trained["ae"]),
                                                      "--steps", "4", "--out", str(out),
                                                      "--resume"])
    assert f"trained on the autoencoder {ae}" in message and "is another" in message
    stored = load_checkpoint(ae, kind="autoencoder")  # the same path, other bytes
    stored["step"] += 1
    torch.save(stored, ae)
    message = one_error_line(capsys, train_ldm.main, [*argv[:-4], "--steps", "4", "--out",
                                                      str(out), "--resume"])
    assert f"the autoencoder {ae} changed after the run" in message
    assert load_checkpoint(out / "ldm.pt")["step"] == 2  # nothing was trained on the new one


# ----------------------------------------------------------------------------------------------
# Sizes are not taken on trust


def test_a_crafted_or_malformed_checkpoint_is_refused_before_anything_is_built(trained, capsys,
                                                                                tmp_path):
    """A config that asks for 16,384 channels beside the stored few-MB weights, a missing entry and
    a mistyped one: each ends in one line naming the file, and nothing large is allocated."""
    import resource

    ldm = torch.load(trained["ldm"], weights_only=True)
    huge = {**ldm, "unet_config": {**ldm["unet_config"], "channels": 16_384}}
    missing = {k: v for k, v in ldm.items() if k != "denoiser"}
    mistyped = {**ldm, "unet_config": {**ldm["unet_config"], "channel_mult": "many"}}
    ae = torch.load(trained["ae"], weights_only=True)
    big_ae = {**ae, "autoencoder": {**ae["autoencoder"],
                                    "config": {**ae["autoencoder"]["config"],
                                               "base_channels": 8192}}}
    files = {}
    for name, payload in [("huge", huge), ("missing", missing), ("mistyped", mistyped),
                          ("big_ae", big_ae)]:
        files[name] = tmp_path / f"{name}.pt"
        torch.save(payload, files[name])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for name, words in [("huge", "config does not match its stored weights"),
                        ("missing", "malformed 'ldm' checkpoint (KeyError: 'denoiser')"),
                        ("mistyped", "unet_config channel_mult = 'many' is not of type")]:
        message = one_error_line(capsys, sample.main, ["--ckpt", str(files[name]), "--n", "1",
                                                       "--out", str(tmp_path / "g.png")])
        assert str(files[name]) in message and words in message, message
    message = one_error_line(capsys, train_ldm.main, [*FAST, "--ae", str(files["big_ae"]),
                                                      "--out", str(tmp_path / "run")])
    assert "autoencoder's config does not match its stored weights" in message
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before  # KiB
    assert grown < 1_000_000, f"{grown} KiB more peak memory"  # a 16,384-channel UNet is ~10 GB


@pytest.mark.parametrize("entry, ok", [
    ({"channels": 64}, True), ({"channels": True}, False), ({"channels": 64.0}, False),
    ({"channel_mult": [1, 2, 4]}, True), ({"channel_mult": (1, "2")}, False),
    ({"channel_mult": 3}, False), ({"num_heads": None}, True), ({"num_heads": 4}, True),
    ({"num_heads": "4"}, False), ({"norm_eps": 1}, True), ({"norm_eps": "1e-6"}, False),
    ({"attention_block": "plain"}, True), ({"attention_block": 1}, False),
    ({"mid_attention": 1}, False), ({"unknown_entry": object()}, True),  # left to the constructor
])
def test_stored_configs_are_checked_against_the_declared_types(entry, ok):
    from tinyldm.checkpoint import CheckpointError, check_types
    from tinyldm.unet import UNetConfig

    if ok:
        check_types("x.pt", "unet_config", UNetConfig, entry)
    else:
        with pytest.raises(CheckpointError, match=f"x.pt: unet_config {next(iter(entry))} = "):
            check_types("x.pt", "unet_config", UNetConfig, entry)


def _diffusers_folder(root: Path) -> Path:
    """A small LDMPipeline (UNet2DModel + VQModel, random weights) saved as diffusers saves it."""
    diffusers = pytest.importorskip("diffusers", reason="writes it: pip install -e '.[dev]'")
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(32, 64), norm_num_groups=8,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    vq = diffusers.VQModel(block_out_channels=(32, 64), latent_channels=3, num_vq_embeddings=64,
                           down_block_types=("DownEncoderBlock2D",) * 2, layers_per_block=1,
                           up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8)
    folder = root / "tiny-ldm"
    diffusers.LDMPipeline(vqvae=vq, unet=unet,
                          scheduler=diffusers.DDIMScheduler()).save_pretrained(folder)
    return folder


def _edit_config(part: str, **changes):
    def edit(folder: Path) -> None:
        path = folder / part / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return edit


CRAFTED_FOLDERS = {  # name: (how the copy is damaged, words of the one line)
    "huge unet": (_edit_config("unet", block_out_channels=[16_384, 16_384]),
                  "unet does not hold the UNet its config.json describes"),
    "huge autoencoder": (_edit_config("vqvae", block_out_channels=[8192, 16_384]),
                         "vqvae does not hold the autoencoder its config.json describes"),
    "mistyped": (_edit_config("unet", block_out_channels="many"),
                 "block_out_channels = 'many' is not a size"),
    "negative": (_edit_config("unet", layers_per_block=-1), "layers_per_block = -1 is not a size"),
    "missing key": (lambda f: (f / "unet" / "config.json").write_text('{"sample_size": 8}'),
                    "(KeyError: 'block_out_channels')"),
    "not JSON": (lambda f: (f / "vqvae" / "config.json").write_bytes(b"{\xff not json"),
                 "config.json is not JSON"),
    "8-byte safetensors": (
        lambda f: (f / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(
            (2**40).to_bytes(8, "little")), "is not a safetensors file"),
    "no tensors": (
        lambda f: (f / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(
            (2).to_bytes(8, "little") + b"{}"), "144 tinyldm tensors unfilled"),
    "huge sample_size": (_edit_config("unet", sample_size=100_000),
                         "set by unet/config.json's sample_size"),
}


@pytest.mark.parametrize("name", list(CRAFTED_FOLDERS))
def test_a_crafted_diffusers_folder_is_refused_before_anything_is_built(capsys, tmp_path, name):
    """A diffusers-format folder whose config.json asks for what its weights do not hold (16,384
    channels beside a few MB, a 100,000-px sample_size), or whose files are malformed: one line
    naming the file, and nothing large allocated (each would ask for 2 GB to 120 GB)."""
    import resource
    import shutil

    good = _diffusers_folder(tmp_path / "good")
    folder = tmp_path / name.replace(" ", "-")
    shutil.copytree(good, folder)
    damage, words = CRAFTED_FOLDERS[name]
    damage(folder)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    message = one_error_line(capsys, sample.main, ["--pretrained", str(folder), "--n", "1",
                                                   "--steps", "2", "--device", "cpu",
                                                   "--out", str(tmp_path / "g.png")])
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before  # KiB
    assert words in message, message
    assert str(folder) in message or "sample_size" in message, message
    assert grown < 500_000, f"{grown} KiB more peak memory"
    # the undamaged folder samples
    sample.main(["--pretrained", str(good), "--n", "1", "--steps", "2", "--device", "cpu",
                 "--out", str(tmp_path / "g.png")])


def test_weights_the_device_cannot_hold_are_refused_before_any_module_is_built(
        trained, capsys, tmp_path, monkeypatch):
    """A checkpoint (or released folder) whose configs match its tensors but which the free memory
    cannot hold: a file larger than it is refused before it is read; weights that what is left
    cannot hold are refused from the config's size, before any module is built or loaded."""
    from tinyldm import memory
    from tinyldm.autoencoder import Autoencoder, AutoencoderConfig
    from tinyldm.checkpoint import build_denoiser

    path = trained["ldm"]
    ckpt = load_checkpoint(path)
    with torch.device("meta"):  # what the refusal must name: the denoiser once, plus the AE
        denoiser = build_denoiser(ckpt["unet_config"], ckpt["cond_config"])
        ae = Autoencoder(AutoencoderConfig(**ckpt["autoencoder"]["config"]))
    need = sum(t.numel() * t.element_size() for m in (denoiser, ae)
               for t in m.state_dict().values())
    size = path.stat().st_size
    assert size > need  # the file holds the weights (and their EMA, the optimizer's state)
    monkeypatch.setattr(torch.nn.Module, "load_state_dict",
                        lambda *a, **k: pytest.fail("a module was loaded before the refusal"))
    argv = ["--ckpt", str(path), "--n", "1", "--out", str(tmp_path / "g.png")]
    monkeypatch.setattr(memory, "available_bytes", lambda device: int(size / memory.HEADROOM) - 1)
    message = one_error_line(capsys, sample.main, argv)
    assert f"{path}: reading it needs {memory.describe(size)}" in message, message
    # the file fits, and reading it leaves less than its weights need
    free = iter([int(size / memory.HEADROOM) + 1] + [int(need / memory.HEADROOM) - 1] * 9)
    monkeypatch.setattr(memory, "available_bytes", lambda device: next(free))
    message = one_error_line(capsys, sample.main, argv)
    assert f"{path}: its weights need {memory.describe(need)}" in message, message
    folder = _diffusers_folder(tmp_path)
    argv = ["--pretrained", str(folder), "--n", "1", "--device", "cpu", "--out",
            str(tmp_path / "g.png")]
    monkeypatch.setattr(memory, "available_bytes", lambda device: 2**20)
    message = one_error_line(capsys, sample.main, argv)  # the UNet's file is 3 MB
    assert f"{folder}/unet/diffusion_pytorch_model.safetensors: reading it needs" in message
    assert "1 MiB free" in message, message
    # both files fit (read one after the other), and then the weights do not
    free = iter([2**30, 2**30] + [2**20] * 9)
    monkeypatch.setattr(memory, "available_bytes", lambda device: next(free))
    message = one_error_line(capsys, sample.main, argv)
    assert f"{folder}: its weights need" in message and "1 MiB free" in message, message
    monkeypatch.undo()  # with the machine's real free memory, the same checkpoint samples
    assert sample.main(["--ckpt", str(path), "--n", "1", "--steps", "2",
                        "--out", str(tmp_path / "g.png")])["images"] == 1
