"""Course kit: student copies of the repository with chosen pieces cut out, graded by the library's own tests.

    python -m tinyldm.tools.course list                                   # the assignments, their files and tests
    python -m tinyldm.tools.course student --out ../ldm-course            # every assignment stubbed
    python -m tinyldm.tools.course student --out ../hw1 --only ddim_step classifier_free_guidance
    python -m tinyldm.tools.course grade --root ../hw1                    # a score table (run in the student's copy)

A solution region is marked in the library source by a comment pair around the lines a student writes:

    # BEGIN ASSIGNMENT ddim_step
    ...the solution...
    # END ASSIGNMENT ddim_step

`student` copies the repository's tracked files and replaces each chosen region (markers included) with
`raise NotImplementedError("assignment <name>: <hint>")` at the region's indentation; nothing else changes.
It also writes ASSIGNMENTS.md: what to implement, where, and which tests grade it (the answer key).
`grade` runs the grading tests of each assignment with pytest and prints passed / total per assignment.
On the untouched library every assignment scores full marks; in a student copy each stubbed assignment
fails its own tests and no other's (`tests/test_course.py` checks both for every assignment).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BEGIN = re.compile(r"^(\s*)# BEGIN ASSIGNMENT (\w+)\s*$")
END = re.compile(r"^\s*# END ASSIGNMENT (\w+)\s*$")


@dataclass(frozen=True)
class Assignment:
    name: str
    file: str
    hint: str
    tests: tuple[str, ...]  # pytest node ids that grade it
    minutes: int  # a rough time for a student, CPU only


ASSIGNMENTS = {a.name: a for a in (
    Assignment("forward_process", "tinyldm/schedule.py",
               "return x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise (DDPM Eq. 4); "
               "self.alpha_bar_at(t, x0) gives alpha_bar_t shaped to broadcast",
               ("tests/test_schedule.py::test_q_sample_moments_match_closed_form",), 15),
    Assignment("ddim_step", "tinyldm/ddim.py",
               "sigma = eta * (DDIM Eq. 16); return x_prev of DDIM Eq. 12, plus sigma * noise when eta > 0",
               ("tests/test_ddim.py::test_ddim_eta0_with_point_oracle_returns_the_point",
                "tests/test_ddim.py::test_ddim_eta1_step_equals_ddpm_step_with_shared_noise",
                "tests/test_ddim.py::test_ddim_matches_diffusers_scheduler"), 30),
    Assignment("classifier_free_guidance", "tinyldm/ddim.py",
               "combine pred_u and pred_c with guidance_scale (Ho & Salimans, Eq. 6)",
               ("tests/test_ddim.py::test_cfg_combines_conditional_and_unconditional_predictions",), 10),
    Assignment("attention", "tinyldm/blocks.py",
               "return softmax(q k^T / sqrt(d)) over the keys (LDM Sec. 3.3); keys where mask is False get "
               "probability 0",
               ("tests/test_unet.py::test_fused_attention_equals_explicit_softmax",
                "tests/test_unet.py::test_kept_attention_weights_are_the_softmax_and_change_nothing"), 20),
    Assignment("kl_term", "tinyldm/autoencoder.py",
               "return KL(N(mean, exp(logvar)) || N(0, I)) per image, summed over (c, h, w): shape (B,)",
               ("tests/test_autoencoder.py::test_kl_equals_torch_distributions",), 15),
    Assignment("vq_lookup", "tinyldm/autoencoder.py",
               "two places: in lookup, the index of the nearest codebook vector (self.codebook.weight, (K, c)) "
               "for every latent pixel of z_e, (B, h, w); in forward, z_q with the value of e_k and the "
               "gradient of z_e (straight-through)",
               ("tests/test_autoencoder.py::test_codebook_indices_are_valid_nearest_neighbours",
                "tests/test_autoencoder.py::test_vq_decode_quantizes_its_input",
                "tests/test_autoencoder.py::test_straight_through_gradient_reaches_the_encoder"), 30),
    Assignment("adaptive_weight", "tinyldm/autoencoder_loss.py",
               "return lambda = ||grad_rec|| / (||grad_adv|| + delta), clamped to [0, max_value], with no "
               "gradient (VQGAN Eq. 7)",
               ("tests/test_autoencoder.py::test_adaptive_weight_matches_its_formula",), 15),
)}


def regions(text: str) -> list[tuple[str, int, int, str]]:
    """(name, first line, last line, indentation) of each marked region (0-based, markers included); an
    assignment may have several regions (e.g. the VQ lookup and its straight-through line)."""
    found, open_ = [], None
    for i, line in enumerate(text.splitlines()):
        if m := BEGIN.match(line):
            if open_ is not None:
                raise ValueError(f"assignment {m.group(2)} begins inside {open_[0]}")
            open_ = (m.group(2), i, m.group(1))
        elif m := END.match(line):
            if open_ is None or open_[0] != m.group(1):
                raise ValueError(f"END ASSIGNMENT {m.group(1)} without its BEGIN")
            found.append((open_[0], open_[1], i, open_[2]))
            open_ = None
    if open_ is not None:
        raise ValueError(f"assignment {open_[0]} has no END")
    return found


def stub(text: str, names: set[str]) -> str:
    """The text with each named region replaced by a NotImplementedError carrying its hint."""
    lines = text.splitlines(keepends=True)
    for name, first, last, indent in sorted(regions(text), key=lambda r: -r[1]):  # bottom up: lines stay put
        if name in names:
            message = f"assignment {name}: {ASSIGNMENTS[name].hint}"
            lines[first : last + 1] = [f"{indent}raise NotImplementedError({message!r})\n"]
    return "".join(lines)


def tracked_files(root: Path) -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout
    return [f for f in out.splitlines() if (root / f).is_file()]


def make_student_copy(out: Path, names: list[str] | None = None, root: Path = ROOT) -> Path:
    """Copy the repository's tracked files to `out`, with the chosen assignments (default: all) stubbed."""
    names = list(ASSIGNMENTS) if names is None else names
    unknown = sorted(set(names) - set(ASSIGNMENTS))
    if unknown:
        raise SystemExit(f"unknown assignments {unknown}; choose from {', '.join(ASSIGNMENTS)}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} exists and is not empty: choose a new folder")
    files = {ASSIGNMENTS[n].file for n in names}
    for rel in tracked_files(root):
        dest = out / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if rel in files:
            text = (root / rel).read_text()
            missing = {n for n in names if ASSIGNMENTS[n].file == rel} - {r[0] for r in regions(text)}
            if missing:
                raise SystemExit(f"{rel} has no marked region for {sorted(missing)}")
            dest.write_text(stub(text, set(names)))
        else:
            shutil.copy2(root / rel, dest)
    lines = ["# Assignments\n", "Implement each `raise NotImplementedError` below, then run "
             "`python -m tinyldm.tools.course grade`.\n", "| assignment | file | what to write | graded by | about |",
             "|---|---|---|---|---|"]
    for n in names:
        a = ASSIGNMENTS[n]
        lines.append(f"| {n} | `{a.file}` | {a.hint} | {', '.join(f'`{t}`' for t in a.tests)} | {a.minutes} min |")
    (out / "ASSIGNMENTS.md").write_text("\n".join(lines) + "\n")
    return out


def run_tests(tests: list[str], root: Path = ROOT) -> dict[str, bool]:
    """Run pytest on the node ids in `root`; returns node id -> passed."""
    with_report = root / ".course-report.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={with_report}",
                    *tests], cwd=root, capture_output=True, text=True)
    outcome = {}
    for case in ET.parse(with_report).getroot().iter("testcase"):
        file = case.get("classname", "").replace(".", "/") + ".py"
        name = case.get("name", "").split("[")[0]
        ok = not any(child.tag in ("failure", "error") for child in case)
        key = f"{file}::{name}"
        outcome[key] = outcome.get(key, True) and ok  # a parametrized test passes if every case does
    with_report.unlink()
    return outcome


def grade(names: list[str] | None = None, root: Path = ROOT) -> dict[str, tuple[int, int]]:
    """assignment -> (tests passed, tests) in the repository at `root`; prints the table."""
    names = list(ASSIGNMENTS) if names is None else names
    tests = sorted({t for n in names for t in ASSIGNMENTS[n].tests})
    outcome = run_tests(tests, root)
    scores = {n: (sum(outcome.get(t, False) for t in ASSIGNMENTS[n].tests), len(ASSIGNMENTS[n].tests))
              for n in names}
    print(f"{'assignment':<26}{'passed':>8}")
    for n, (ok, total) in scores.items():
        print(f"{n:<26}{f'{ok}/{total}':>8}")
    ok, total = sum(s[0] for s in scores.values()), sum(s[1] for s in scores.values())
    print(f"{'total':<26}{f'{ok}/{total}':>8}")
    return scores


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list")
    s = sub.add_parser("student")
    s.add_argument("--out", required=True)
    s.add_argument("--only", nargs="+", help="these assignments only (default: all)")
    g = sub.add_parser("grade")
    g.add_argument("--root", default=".", help="the repository to grade (a student copy)")
    g.add_argument("--only", nargs="+")
    args = p.parse_args(argv)
    if args.command == "list":
        for a in ASSIGNMENTS.values():
            print(f"{a.name:<26}{a.file:<24}{a.minutes:>4} min  {a.hint}")
    elif args.command == "student":
        out = make_student_copy(Path(args.out), args.only)
        print(f"student copy in {out} ({len(args.only or ASSIGNMENTS)} assignments); see {out / 'ASSIGNMENTS.md'}")
    else:
        grade(args.only, Path(args.root).resolve())


if __name__ == "__main__":
    main()
