"""Reference runs: a finished train_ldm.py run's loss and quality curves, kept as JSON, that a later
run of the same preset and settings draws its own loss.png against (in grey behind its curves).

    python -m tinyldm.evaluation.curves runs/ldm-shapes --name shapes \\
        --command "python train_ldm.py --preset shapes" --machine "2 CPU cores, ..." \\
        --out tinyldm/evaluation/reference_curves/shapes.json

A reference holds: the command and machine that made it, the settings a run must share to be drawn
against it (dataset, image size, batch size, steps, the quality curve's cadence and size), the loss
per logged step, the quality points as [step, minutes, value] with their name, and the run's final
evaluation. The references committed with tinyldm are in `reference_curves/` beside this file;
`reference_for(preset, config)` finds the one a run matches, or None.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from tinyldm.cli import ArgumentParser, UsageError, run

REFERENCE_DIR = Path(__file__).parent / "reference_curves"
# what a run must share with a reference to be drawn against it
MATCH = ("dataset", "image_size", "batch_size", "steps", "curve_every", "curve_images",
         "eval_steps", "eval_cfg")


def from_run(run_dir: str | Path, *, name: str, command: str, machine: str) -> dict:
    """The reference of the finished run in `run_dir` (its log.jsonl, eval.json and ldm.pt's
    settings)."""
    from tinyldm.checkpoint import load_checkpoint

    run_dir = Path(run_dir)
    for f in ("log.jsonl", "eval.json", "ldm.pt"):
        if not (run_dir / f).exists():
            raise UsageError(f"{run_dir} has no {f}: give the folder of a finished "
                             "train_ldm.py run")
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()
               if line.strip()]
    quality = [r for r in records if "quality" in r]
    if not quality:
        raise UsageError(f"{run_dir}/log.jsonl has no quality points: train with --curve_every N")
    settings = load_checkpoint(run_dir / "ldm.pt", kind="ldm")["train_config"]
    final = json.loads((run_dir / "eval.json").read_text())
    return {"name": name, "command": command, "machine": machine,
            "settings": {k: settings.get(k) for k in MATCH},
            "loss": [[r["step"], r["loss"]] for r in records if "loss" in r],
            "quality_name": quality[-1]["quality_name"],
            "quality_better": quality[-1]["quality_better"],
            "quality": [[r["step"], r["minutes"], r["quality"]] for r in quality],
            "final": {k: v for k, v in final.items() if isinstance(v, int | float | str)
                      and k not in ("checkpoint", "samples")}}


def reference_for(preset: str | None, config) -> dict | None:
    """The committed reference of `preset` when `config` (a TrainLDMConfig) shares its settings,
    else None."""
    path = REFERENCE_DIR / f"{preset}.json"
    if not preset or not path.exists():
        return None
    reference = json.loads(path.read_text())
    mine = asdict(config)
    return reference if all(mine.get(k) == v for k, v in reference["settings"].items()) else None


def main(argv: list[str] | None = None) -> dict:
    p = ArgumentParser(prog="python -m tinyldm.evaluation.curves", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="the folder of a finished train_ldm.py run")
    p.add_argument("--name", required=True, help="the preset it ran (the file's name)")
    p.add_argument("--command", required=True, help="the command that made the run")
    p.add_argument("--machine", required=True, help="where it ran (cores, GPU, date)")
    p.add_argument("--out", required=True, help="the JSON to write")
    args = p.parse_args(argv)
    reference = from_run(args.run, name=args.name, command=args.command, machine=args.machine)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(reference, indent=1) + "\n")
    print(f"{args.out}: {len(reference['loss'])} loss and {len(reference['quality'])} quality "
          f"points ({reference['quality_name']})")
    return reference


if __name__ == "__main__":
    run(main)
