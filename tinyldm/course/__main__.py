"""python -m tinyldm.course: see the package docstring."""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import stat
import sys
import time
from pathlib import Path

from tinyldm.cli import ArgumentParser, UsageError, run
from tinyldm.course import kit
from tinyldm.course.kit import ASSIGNMENTS, ROOT, grade_submission, make_student_copy, results_json

SETUP_SH = """#!/usr/bin/env bash
# Gradescope runs this once, when it builds the autograder's image.
set -euo pipefail
cd /autograder/source
python3 -m pip install --upgrade pip
python3 -m pip install torch --index-url https://download.pytorch.org/whl/cpu   \
# the CPU build: grading needs no GPU
python3 -m pip install -e ".[course]"
"""

RUN_AUTOGRADER = """#!/usr/bin/env bash
# Gradescope runs this for each submission: the student's files are in $AUTOGRADER/submission, \
the scores go to
# $AUTOGRADER/results/results.json. AUTOGRADER_ROOT overrides /autograder (to try the bundle \
locally).
set -uo pipefail
AUTOGRADER="${AUTOGRADER_ROOT:-/autograder}"
mkdir -p "$AUTOGRADER/results"
chmod 700 "$AUTOGRADER/source"  # the reference and the hidden cases: no other user reads them
cd "$AUTOGRADER/source"
"${PYTHON:-python3}" -m tinyldm.course grade --submission "$AUTOGRADER/submission" \\
    --json "$AUTOGRADER/results/results.json" ONLY
"""


def write_autograder(out: Path, names: list[str] | None = None, root: Path = ROOT) -> Path:
    """A Gradescope autograder bundle: setup.sh, run_autograder, the project with its hidden tests,
    and a zip."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"{out} exists and is not empty: choose a new folder")
    kit.copy_project(out / "source", root)
    only = f"--only {' '.join(names)}" if names else ""
    for name, text in (("setup.sh", SETUP_SH),
                       ("run_autograder", RUN_AUTOGRADER.replace("ONLY", only))):
        path = out / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    (out / "results.schema.json").write_text(json.dumps(kit.RESULTS_SCHEMA, indent=1))
    staging = out.parent / f".{out.name}-zip"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(out, staging)
    # setup.sh at the zip's top level
    archive = shutil.make_archive(str(out / "autograder"), "zip", staging)
    shutil.rmtree(staging)
    return Path(archive)


def grade_folder(folder: Path, names: list[str] | None, out_csv: Path, **kw) -> list[dict]:
    """Grade every sub-folder of `folder` (one per student; links are skipped) into one CSV: a
    column per assignment, and the total."""
    names = list(ASSIGNMENTS) if names is None else names
    rows = []
    with kit.Grader(names, **kw) as grader:
        reports = []
        for sub in sorted(p for p in Path(folder).iterdir() if p.is_dir() and not p.is_symlink()):
            print(f"== {sub.name}", flush=True)
            reports.append((sub, grader.grade(sub)))
    for sub, report in reports:
        row = {"submission": sub.name}
        for n in names:
            ok, total = report.score(n)
            row[n] = f"{ok}/{total}"
        row["total"] = sum(c.passed for c in report.cases)
        row["max"] = len(report.cases)
        row["notes"] = "; ".join(f"{n}: {v}" for n, v in report.notes.items())
        rows.append(row)
    with open(out_csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["submission", *names, "total", "max", "notes"])
        writer.writeheader()
        writer.writerows(rows)
    return rows


def check(name: str) -> list:
    """`python -m tinyldm.course check NAME`: the visible cases on this copy, each failure with its
    hint (the case's docstring). Prints values, never code."""
    results = kit.self_check(name)
    cases = {c.__name__: c for c in kit.load_cases(name, False)}
    for r in results:
        case = r.test.split("::")[-1]
        print(f"{'PASS' if r.passed else 'FAIL'}  {case}")
        if not r.passed:
            hint = " ".join((cases[case].__doc__ or "").split())
            print(f"      {r.output}\n      hint: {hint}")
    ok = sum(r.passed for r in results)
    print(f"{name}: {ok}/{len(results)} visible cases pass"
          + ("" if ok < len(results) else "; hidden cases grade it too"))
    return results


def mutant_table(names: list[str] | None = None) -> list[dict]:
    """Grade every mutant (a reference solution with one plausible mistake) as a submission; print
    the table."""
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        jobs = kit.mutant_submissions(Path(tmp), names)
        with kit.Grader(sorted({name for name, _, _ in jobs}), quiet=True) as grader:
            for name, label, folder in jobs:
                ok, total = grader.grade(folder, only=[name]).score(name)
                rows.append({"assignment": name, "mutant": label, "passed": ok, "tests": total})
                print(f"{name:<26}{label:<62}{ok}/{total}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> object:
    import tinyldm.course

    p = ArgumentParser(prog="python -m tinyldm.course", description=tinyldm.course.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the assignments, their files and tests")
    c = sub.add_parser("check", help="run an assignment's visible cases on this copy, with hints")
    c.add_argument("assignment")
    s = sub.add_parser("student", help="a student copy")
    s.add_argument("--out", required=True)
    s.add_argument("--only", nargs="+", help="these assignments only (default: all)")
    g = sub.add_parser("grade", help="grade a submission (or a folder of them)")
    what = g.add_mutually_exclusive_group()
    what.add_argument("--submission", help="a student copy, or a folder of the submitted files")
    what.add_argument("--folder", help="a folder with one sub-folder per submission (writes --csv)")
    g.add_argument("--only", nargs="+")
    g.add_argument("--json", help="write Gradescope's results.json here")
    g.add_argument("--csv", default="grades.csv", help="with --folder: the table to write")
    a = sub.add_parser("autograder", help="a Gradescope autograder bundle")
    a.add_argument("--out", required=True)
    a.add_argument("--only", nargs="+")
    m = sub.add_parser("mutants", help="grade the kit's wrong answers")
    m.add_argument("--only", nargs="+")
    args = p.parse_args(argv)
    if args.command == "list":
        for x in ASSIGNMENTS.values():
            print(f"{x.name:<26}{x.file:<28}{x.task}")
        return ASSIGNMENTS
    if args.command == "student":
        out = make_student_copy(Path(args.out), args.only)
        print(f"student copy in {out} ({len(args.only or ASSIGNMENTS)} assignments); "
              f"see {out / 'ASSIGNMENTS.md'}")
        return out
    if args.command == "autograder":
        archive = write_autograder(Path(args.out), args.only)
        print(f"autograder bundle in {args.out}; upload {archive} to Gradescope "
              "(a 'zip file upload' autograder)")
        return archive
    if args.command == "mutants":
        return mutant_table(args.only)
    if args.command == "check":
        return check(args.assignment)
    for flag, path in (("--submission", args.submission), ("--folder", args.folder)):
        if path is not None and not Path(path).is_dir():
            raise UsageError(f"{flag} {path} is not a folder: give the folder (or, for "
                             "--submission, the folder of files) to grade")
    start = time.perf_counter()
    if args.folder:
        rows = grade_folder(Path(args.folder), args.only, Path(args.csv))
        print(f"{len(rows)} submissions -> {args.csv} ({time.perf_counter() - start:.0f} s)")
        return rows
    report = grade_submission(args.submission or ".", args.only)
    ok, total = sum(c.passed for c in report.cases), len(report.cases)
    print(f"{'total':<26}{f'{ok}/{total}':>8}  ({time.perf_counter() - start:.0f} s; sandbox: "
          f"{report.sandbox})")
    if args.json:  # every process of the students' runs is gone by now
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(f".{out.name}.partial")
        partial.write_text(json.dumps(results_json(report), indent=1))
        partial.replace(out)
    return report


if __name__ == "__main__":
    run(main, sys.argv[1:])
