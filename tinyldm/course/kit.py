"""The course kit's machinery: assignments, marked regions, student copies, and grading in a tree
the grader owns.

A solution region is marked in the library source by a comment pair around the lines a student
writes:

    # BEGIN ASSIGNMENT ddim_step
    ...the reference solution...
    # END ASSIGNMENT ddim_step

A student copy keeps the markers and replaces what is between them by
`raise NotImplementedError(<task>)`. Grading never runs the student's tree: it copies the
instructor's project (with the hidden tests) to a temporary folder, and for each assignment in turn
writes the student's lines between that assignment's markers, the reference solution in every other
region, and runs that assignment's grading tests in a separate process (per-test and overall
timeouts; reports in a temporary folder). Only a test that passed earns its point: failed, errored,
skipped, xfailed, timed out or never run all score 0.
"""

from __future__ import annotations

import ast
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from tinyldm.cli import UsageError

ROOT = Path(__file__).resolve().parents[2]
GRADING = "tinyldm/course/grading"  # the grading tests, relative to a project root
HIDDEN = f"{GRADING}/hidden"  # kept out of student copies
# kept out of student copies
INSTRUCTOR_ONLY = (HIDDEN, "tinyldm/course/mutants.py", "tests/test_course.py")
BEGIN = re.compile(r"^(\s*)# BEGIN ASSIGNMENT (\w+)\s*$")
END = re.compile(r"^\s*# END ASSIGNMENT (\w+)\s*$")
# Names a solution region may not use: the regions are a few lines of tensor maths, and these reach
# the test process itself (skipping, exiting, reading or writing files, importing).
FORBIDDEN = {"pytest", "_pytest", "sys", "os", "atexit", "signal", "subprocess", "builtins",
             "__builtins__", "__import__", "importlib", "exec", "eval", "compile", "open",
             "globals", "locals", "vars", "setattr", "delattr", "exit", "quit", "breakpoint",
             "input", "inspect", "threading", "time"}


@dataclass(frozen=True)
class Assignment:
    name: str
    file: str
    # the stub's message: the equation to implement (by reference) and the shapes, never the code
    task: str
    timeout: int = 60  # seconds per grading test
    requires: tuple[str, ...] = ()  # reference packages its grading tests compare against

    @property
    def tests(self) -> tuple[str, str]:
        """Its grading test files: visible (in student copies) and hidden (instructor only)."""
        return f"{GRADING}/test_{self.name}.py", f"{HIDDEN}/test_{self.name}_hidden.py"


ASSIGNMENTS = {a.name: a for a in (
    Assignment("noise_schedule", "tinyldm/schedule.py",
               "alpha_bar_t from the betas (DDPM Eq. 4 and the line above it). betas: float64 "
               "(T,); alpha_bar: float64 (T,)."),
    Assignment("forward_process", "tinyldm/schedule.py",
               "a draw of x_t ~ q(x_t | x0) using the given noise (DDPM Eq. 4). x0, noise: "
               "(B, C, H, W); t: (B,) int64; self.alpha_bar_at(t, x0) gives alpha_bar_t as "
               "(B, 1, 1, 1)."),
    Assignment("training_step", "tinyldm/ldm.py",
               "the LDM objective (LDM Eq. 3) on the batch: noise z0 to z_t with eps at t, predict "
               "with the denoiser, return the loss against schedule.target(...) with cfg.loss "
               "('l2' or 'l1'). z0, eps: (B, C, h, w); t: (B,); returns a scalar.", timeout=240),
    Assignment("ddim_step", "tinyldm/ddim.py",
               "one DDIM update from t to t_prev (DDIM Eq. 12, sigma from Eq. 16 scaled by eta). "
               "x0, eps, noise: (B, C, h, w); alpha_bar_t, alpha_bar_prev: floats; noise is only "
               "needed when eta > 0.",
               requires=("diffusers",)),
    Assignment("classifier_free_guidance", "tinyldm/ddim.py",
               "the guided prediction from pred_u and pred_c (Ho & Salimans, Eq. 6, with "
               "guidance_scale as its scale; 1 means the conditional model). pred_u, pred_c: "
               "(B, C, h, w)."),
    Assignment("attention", "tinyldm/blocks.py",
               "the attention probabilities (LDM Sec. 3.3; Vaswani et al. Eq. 1). "
               "q: (B, heads, N, d); k: (B, heads, L, d); mask: (B, L) bool or None, True where a "
               "key counts; returns (B, heads, N, L), each row summing to 1, masked keys exactly "
               "0. A UNet built with fused_attention=False runs yours.",
               timeout=180),
    Assignment("cross_attention", "tinyldm/blocks.py",
               "the cross-attention sub-layer of the transformer block (LDM Sec. 3.3, Fig. 3): "
               "pre-norm and residual like the self-attention above it, queries from x, keys and "
               "values from context. x: (B, N, C); context: (B, L, D); context_mask: (B, L) or "
               "None."),
    Assignment("kl_term", "tinyldm/autoencoder.py",
               "KL(N(mean, exp(logvar)) || N(0, I)) per image, summed over (c, h, w) "
               "(Kingma & Welling, App. B). self.mean, self.logvar: (B, c, h, w); returns (B,)."),
    Assignment("vq_lookup", "tinyldm/autoencoder.py",
               "two places (VQ-VAE Eqs. 1-3): in lookup, the index of the nearest codebook vector "
               "for every latent pixel (self.codebook.weight: (K, c); z_e: (B, c, h, w) -> "
               "(B, h, w) int64); in forward, z_q with the value of e_k and the gradient of z_e "
               "(straight-through)."),
    Assignment("adaptive_weight", "tinyldm/autoencoder_loss.py",
               "the adaptive weight lambda of VQGAN Eq. 7 from grad_rec and grad_adv (the two "
               "losses' gradients at the decoder's last layer), with delta in the denominator, "
               "clamped to [0, max_value], carrying no gradient. Returns a scalar tensor."),
)}


# --- Regions --------------------------------------------------------------------------------------

def regions(text: str) -> list[tuple[str, int, int, str]]:
    """(name, BEGIN line, END line, indentation) of each marked region, 0-based; an assignment may
    have several regions (the VQ lookup and its straight-through line)."""
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


def bodies(text: str, name: str) -> list[str]:
    """The lines between each of `name`'s marker pairs, in order."""
    lines = text.splitlines(keepends=True)
    return ["".join(lines[first + 1:last]) for n, first, last, _ in regions(text) if n == name]


def with_bodies(text: str, name: str, new: list[str]) -> str:
    """`text` with the lines between `name`'s marker pairs replaced by `new` (one string per
    region)."""
    mine = [r for r in regions(text) if r[0] == name]
    if len(mine) != len(new):
        raise ValueError(f"{name} has {len(mine)} regions, got {len(new)} bodies")
    lines = text.splitlines(keepends=True)
    for (_, first, last, _), body in sorted(zip(mine, new, strict=True), key=lambda p: -p[0][1]):
        lines[first + 1:last] = [body if body.endswith("\n") or not body else body + "\n"]
    return "".join(lines)


def stub(text: str, names: set[str]) -> str:
    """The text with each named region's lines replaced by a NotImplementedError carrying its
    task."""
    for name in {r[0] for r in regions(text)} & names:
        indent = next(r[3] for r in regions(text) if r[0] == name)
        message = f"assignment {name}: {ASSIGNMENTS[name].task}"
        text = with_bodies(text, name, [f"{indent}raise NotImplementedError({message!r})\n"]
                           * len(bodies(text, name)))
    return text


def skeleton_digest(text: str) -> str:
    """sha256 of the text with every region's lines removed: equal iff nothing outside the regions
    changed."""
    for name in {r[0] for r in regions(text)}:
        text = with_bodies(text, name, [""] * len(bodies(text, name)))
    return hashlib.sha256(text.encode()).hexdigest()


def apply_mutant(text: str, name: str, old: str, new: str) -> str:
    """`name`'s reference region(s) in `text` with `old` replaced by `new`; `old` must occur exactly
    once there."""
    current = bodies(text, name)
    hits = [i for i, body in enumerate(current) if old in body]
    if len(hits) != 1 or current[hits[0]].count(old) != 1:
        raise ValueError(f"{old!r} does not occur exactly once in the regions of {name}")
    current[hits[0]] = current[hits[0]].replace(old, new)
    return with_bodies(text, name, current)


def mutant_submissions(folder: Path, names: list[str] | None = None,
                       root: Path = ROOT) -> list[tuple[str, str, Path]]:
    """One submission folder per wrong answer in mutants.py, and one with the reference first for
    each assignment: [(assignment, label, folder)], label "(the reference)" for the reference."""
    from tinyldm.course.mutants import MUTANTS

    out = []
    for name in MUTANTS if names is None else names:
        a = ASSIGNMENTS[name]
        reference = (root / a.file).read_text()
        for i, (label, old, new) in enumerate([("(the reference)", "", "")] + MUTANTS[name]):
            sub = Path(folder) / f"{name}-{i}"
            sub.mkdir(parents=True)
            (sub / Path(a.file).name).write_text(apply_mutant(reference, name, old, new) if old
                                                 else reference)
            out.append((name, label, sub))
    return out


def check_solution(body: str) -> str | None:
    """Why a region's lines cannot be graded (a syntax error, a forbidden name), or None."""
    source = textwrap.dedent(body)
    try:
        tree = ast.parse(source if source.strip() else "pass")
    except SyntaxError as e:
        return f"SyntaxError in the region, its line {e.lineno}: {e.msg}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            return "imports are not allowed in a solution region"
        name = (node.id if isinstance(node, ast.Name)
                else node.attr if isinstance(node, ast.Attribute) else None)
        if name in FORBIDDEN or (isinstance(name, str) and name.startswith("__")
                                 and name != "__init__"):
            return f"{name!r} is not allowed in a solution region"
    return None


# --- Files and copies -----------------------------------------------------------------------------

SKIP_DIRS = {".git", "__pycache__", "runs", ".pytest_cache", ".ruff_cache", ".venv", "venv",
             "build", "dist"}


def project_files(root: Path = ROOT) -> list[str]:
    """The project's files: in a git checkout, the tracked ones and the new ones git does not
    ignore; elsewhere (a student copy, an autograder bundle) every file under `root` outside build,
    cache and run folders."""
    if (root / ".git").exists() and shutil.which("git"):
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                             cwd=root, capture_output=True, text=True)
        if out.returncode == 0:
            return [f for f in out.stdout.splitlines() if (root / f).is_file()]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames
                             if d not in SKIP_DIRS and not d.endswith(".egg-info"))
        files += [str(Path(dirpath, f).relative_to(root)) for f in sorted(filenames)
                  if not f.endswith(".pyc")]
    return files


def copy_project(out: Path, root: Path = ROOT, *, instructor: bool = True) -> Path:
    """Copy the project's files to `out` (hidden tests and mutants only with instructor=True)."""
    for rel in project_files(root):
        if not instructor and rel.startswith(INSTRUCTOR_ONLY):
            continue
        dest = out / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, dest)
    return out


def make_student_copy(out: Path, names: list[str] | None = None, root: Path = ROOT) -> Path:
    """The project at `out` with the chosen assignments (default: all) stubbed, the hidden tests and
    the mutants left out, and ASSIGNMENTS.md: what to implement, where, and the visible tests."""
    names = list(ASSIGNMENTS) if names is None else names
    unknown = sorted(set(names) - set(ASSIGNMENTS))
    if unknown:
        raise UsageError(f"unknown assignments {unknown}; choose from {', '.join(ASSIGNMENTS)}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"{out} exists and is not empty: choose a new folder")
    copy_project(out, root, instructor=False)
    for rel in sorted({ASSIGNMENTS[n].file for n in names}):
        text = (root / rel).read_text()
        missing = {n for n in names if ASSIGNMENTS[n].file == rel} - {r[0] for r in regions(text)}
        if missing:
            raise UsageError(f"{rel} has no marked region for {sorted(missing)}")
        (out / rel).write_text(stub(text, set(names)))
    lines = ["# Assignments", "",
             ("Write each solution between its `# BEGIN ASSIGNMENT` / `# END ASSIGNMENT` markers, "
              "in place of the"),
             ("`raise NotImplementedError`. Keep the markers, and change nothing outside them: "
              "grading takes only"),
             "the lines between the markers. Check yourself with the visible tests",
             ("(`python -m pytest tinyldm/course/grading/test_<assignment>.py`); more tests grade "
              "it."), "",
             "| assignment | file | what to write | visible tests |", "|---|---|---|---|"]
    for n in names:
        a = ASSIGNMENTS[n]
        lines.append(f"| {n} | `{a.file}` | {a.task} | `{a.tests[0]}` |")
    (out / "ASSIGNMENTS.md").write_text("\n".join(lines) + "\n")
    return out


# --- Grading --------------------------------------------------------------------------------------

@dataclass
class CaseResult:
    assignment: str
    test: str  # pytest node id, relative to the project root
    visible: bool
    passed: bool
    output: str = ""


@dataclass
class Report:
    submission: str
    cases: list[CaseResult] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)  # assignment -> what the grader noticed
    # assignment -> wall time of its grading
    seconds: dict[str, float] = field(default_factory=dict)

    def score(self, name: str) -> tuple[int, int]:
        mine = [c for c in self.cases if c.assignment == name]
        return sum(c.passed for c in mine), len(mine)


def _locate(submission: Path, rel: str) -> Path | None:
    """The submitted version of project file `rel`: at its path in a copy, or by its name among
    loose files."""
    for candidate in (submission / rel, submission / Path(rel).name):
        if candidate.is_file():
            return candidate
    return None


def _env(tree: Path, timeout: int, threads: int | None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1",
           "TINYLDM_GRADING_TREE": str(tree), "TINYLDM_TEST_TIMEOUT": str(timeout),
           "TQDM_DISABLE": "1"}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def collect(tree: Path, names: list[str]) -> dict[str, list[str]]:
    """assignment -> the node ids of its grading tests in `tree` (the reference tree: what a
    submission owes)."""
    files = [f for n in names for f in ASSIGNMENTS[n].tests if (tree / f).exists()]
    if not files:
        raise UsageError(f"{tree} has no grading tests ({GRADING}): is the reference the "
                         "instructor's project?")
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-o", "addopts=",
                          "-p", "no:cacheprovider", *files],
                         cwd=tree, env=_env(tree, 60, None), capture_output=True, text=True)
    ids = [line.strip() for line in out.stdout.splitlines() if "::" in line]
    if out.returncode != 0 or not ids:
        raise RuntimeError(f"could not collect the grading tests:\n{out.stdout[-3000:]}\n"
                           f"{out.stderr[-3000:]}")
    by_name = {n: [] for n in names}
    for node in ids:
        stem = Path(node.split("::")[0]).stem.removeprefix("test_").removesuffix("_hidden")
        if stem in by_name:
            by_name[stem].append(node)
    return by_name


def _run_cases(tree: Path, nodes: list[str], *, timeout: int, grace: int, threads: int | None,
               stop_early: bool) -> dict[str, tuple[bool, str]]:
    """Run `nodes` in `tree` in a separate process; node id -> (passed, output). Reports go to a
    temporary folder; a run past its overall timeout is killed, and every test it did not report
    scores 0."""
    with tempfile.TemporaryDirectory() as reports:
        report = Path(reports) / "report.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
               f"--junitxml={report}", *(["-x"] if stop_early else []),
               *sorted({n.split("::")[0] for n in nodes})]
        overall = timeout * len(nodes) + grace
        proc = subprocess.Popen(cmd, cwd=tree, env=_env(tree, timeout, threads),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            log, _ = proc.communicate(timeout=overall)
            killed = None
        except subprocess.TimeoutExpired:
            # the whole process group: nothing the solution started survives
            os.killpg(proc.pid, signal.SIGKILL)
            log, _ = proc.communicate()
            killed = f"the grading process was stopped after {overall} s (an endless loop?)"
        results: dict[str, tuple[bool, str]] = {}
        if report.exists():
            try:
                root = ET.parse(report).getroot()
            except ET.ParseError:
                root = ET.Element("none")
            for case in root.iter("testcase"):
                file = case.get("classname", "").replace(".", "/")
                node = f"{file}.py::{case.get('name', '')}"
                bad = [child for child in case if child.tag in ("failure", "error", "skipped")]
                text = "; ".join(f"{c.tag}: {c.get('message') or ''}\n{(c.text or '')[-1500:]}"
                                 for c in bad)
                results[node] = (not bad, text.strip())
    return {n: results.get(n, (False, killed or "not run: " + (log or "")[-1500:].strip()))
            for n in nodes}


class Grader:
    """A grading tree: a temporary copy of the reference project, and the grading tests each
    assignment owes.

        with Grader(names) as grader:
            report = grader.grade("path/to/submission")

    `timeout` overrides the assignments' per-test limits; a run is stopped `grace` seconds after all
    its tests' limits together. `stop_early` ends an assignment's run at its first failed test (the
    kit's own tests use it: they only ask whether a wrong answer loses a point). `threads` sets the
    test process's CPU threads."""

    def __init__(self, names: list[str] | None = None, *, reference: str | Path = ROOT,
                 timeout: int | None = None, grace: int = 60, threads: int | None = None,
                 stop_early: bool = False, quiet: bool = False):
        self.names = list(ASSIGNMENTS) if names is None else names
        unknown = sorted(set(self.names) - set(ASSIGNMENTS))
        if unknown:
            raise UsageError(f"unknown assignments {unknown}; choose from {', '.join(ASSIGNMENTS)}")
        for package in sorted({p for n in self.names for p in ASSIGNMENTS[n].requires}):
            try:
                __import__(package)
            except ImportError as e:
                raise UsageError(f"grading needs {package} (its tests compare against it): "
                                 f"pip install {package}") from e
        self.reference, self.timeout, self.grace = Path(reference), timeout, grace
        self.threads, self.stop_early, self.quiet = threads, stop_early, quiet

    def __enter__(self) -> Grader:
        self._tmp = tempfile.TemporaryDirectory(prefix="tinyldm-grading-")
        self.tree = copy_project(Path(self._tmp.name) / "project", self.reference)
        self.owed = collect(self.tree, self.names)
        return self

    def __exit__(self, *exc) -> None:
        self._tmp.cleanup()

    def _body(self, submission: Path, a: Assignment,
              report: Report) -> tuple[list[str] | None, str | None]:
        """The submitted lines of `a`'s regions, or why there are none to grade."""
        pristine = (self.tree / a.file).read_text()
        submitted = _locate(submission, a.file)
        if submitted is None:
            return None, f"{a.file} was not submitted"
        text = submitted.read_text(errors="replace")
        try:
            body = bodies(text, a.name)
        except ValueError as e:
            return None, f"{a.file}: {e}"
        if len(body) != len(bodies(pristine, a.name)):
            return None, f"{a.file}: the markers of {a.name} were removed or duplicated"
        problem = next((p for p in map(check_solution, body) if p), None)
        if problem:
            return None, problem
        if "NotImplementedError" in "".join(body) and f"assignment {a.name}" in "".join(body):
            return None, "not implemented (the stub is still there)"
        try:
            if skeleton_digest(text) != skeleton_digest(pristine):
                report.notes[a.name] = (f"{a.file} was changed outside its regions: those changes "
                                        "are ignored (graded with the reference code)")
        except ValueError:
            pass
        return body, None

    def grade(self, submission: str | Path, only: list[str] | None = None) -> Report:
        """Grade a submission (a student copy, or a folder of the submitted files), each assignment
        on its own (the reference solution in every other region); `only`: a subset of the grader's
        assignments."""
        submission = Path(submission)
        report = Report(str(submission))
        for name in self.names if only is None else only:
            start, a = time.perf_counter(), ASSIGNMENTS[name]
            nodes = self.owed[name]
            body, problem = self._body(submission, a, report)
            if problem:
                report.cases += [CaseResult(name, n, "/hidden/" not in n, False, problem)
                                 for n in nodes]
                report.notes[name] = problem
            else:
                pristine = (self.tree / a.file).read_text()
                (self.tree / a.file).write_text(with_bodies(pristine, name, body))
                try:
                    outcome = _run_cases(self.tree, nodes, timeout=self.timeout or a.timeout,
                                         grace=self.grace, threads=self.threads,
                                         stop_early=self.stop_early)
                finally:
                    (self.tree / a.file).write_text(pristine)
                report.cases += [CaseResult(name, n, "/hidden/" not in n, *outcome[n])
                                 for n in nodes]
            report.seconds[name] = time.perf_counter() - start
            if not self.quiet:
                ok, total = report.score(name)
                print(f"{name:<26}{f'{ok}/{total}':>8}{report.seconds[name]:6.0f} s  "
                      f"{report.notes.get(name, '')}", flush=True)
        return report


def grade_submission(submission: str | Path, names: list[str] | None = None, **kw) -> Report:
    """Grade one submission in a fresh grading tree (see `Grader` for the options)."""
    with Grader(names, **kw) as grader:
        return grader.grade(submission)


def results_json(report: Report) -> dict:
    """The Gradescope autograder format: one entry per test case, one point each."""
    tests = []
    for c in report.cases:
        tests.append({"name": f"{c.assignment}: {c.test.split('::')[-1]}", "score": float(c.passed),
                      "max_score": 1.0,
                      "output": c.output[-4000:] or ("passed" if c.passed else "failed"),
                      "visibility": "visible" if c.visible else "after_published"})
    summary = [f"{n}: {report.score(n)[0]}/{report.score(n)[1]}"
               + (f" ({report.notes[n]})" if n in report.notes else "")
               for n in dict.fromkeys(c.assignment for c in report.cases)]
    return {"score": float(sum(c.passed for c in report.cases)), "output": "\n".join(summary),
            "visibility": "visible", "stdout_visibility": "hidden", "tests": tests}


# Gradescope's results.json, as far as this kit writes it (JSON Schema, draft 7).
RESULTS_SCHEMA = {
    "type": "object", "required": ["score", "tests"],
    "properties": {
        "score": {"type": "number", "minimum": 0}, "output": {"type": "string"},
        "visibility": {"enum": ["hidden", "after_due_date", "after_published", "visible"]},
        "stdout_visibility": {"enum": ["hidden", "after_due_date", "after_published", "visible"]},
        "tests": {"type": "array", "items": {
            "type": "object", "required": ["name", "score", "max_score", "output", "visibility"],
            "properties": {"name": {"type": "string"}, "score": {"type": "number", "minimum": 0},
                           "max_score": {"type": "number", "minimum": 0},
                           "output": {"type": "string"},
                           "visibility": {"enum": ["hidden", "after_due_date", "after_published",
                                                   "visible"]}},
            "additionalProperties": False}},
    },
}
