"""The course kit's machinery: assignments, marked regions, student copies, and grading where no
student code decides a score.

A solution region is marked in the library source by a comment pair around the lines a student
writes:

    # BEGIN ASSIGNMENT ddim_step
    ...the reference solution...
    # END ASSIGNMENT ddim_step

A student copy keeps the markers and replaces what is between them by
`raise NotImplementedError(<task>)`. Grading builds, for each assignment in turn, a fresh tree of
the library with every graded region stubbed and the student's lines in that assignment's regions.
The student's code runs there, in a sandboxed child process (sandbox.py), which only computes: the
grading cases (grading/) send it inputs and get back tensors (probe.py), and the grader's own
process compares them with the expected values and decides. No output, report or exit status of the
child can change a score.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import inspect
import os
import re
import secrets
import shutil
import stat
import subprocess
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

from tinyldm.cli import UsageError
from tinyldm.course import sandbox

ROOT = Path(__file__).resolve().parents[2]
GRADING = "tinyldm/course/grading"  # the grading tests, relative to a project root
HIDDEN = f"{GRADING}/hidden"  # kept out of student copies
# kept out of student copies
INSTRUCTOR_ONLY = (HIDDEN, "tinyldm/course/mutants.py", "tests/test_course.py")
BEGIN = re.compile(r"^(\s*)# BEGIN ASSIGNMENT (\w+)\s*$")
END = re.compile(r"^\s*# END ASSIGNMENT (\w+)\s*$")
MAX_SUBMITTED_BYTES = 1_000_000  # a submitted file larger than this is refused


@dataclass(frozen=True)
class Assignment:
    name: str
    file: str
    # the stub's message: the equation to implement (by reference) and the shapes, never the code
    task: str
    timeout: int = 60  # seconds of the student's code per grading case
    requires: tuple[str, ...] = ()  # reference packages its grading cases compare against

    @property
    def tests(self) -> tuple[str, str]:
        """Its grading cases: visible (in student copies) and hidden (instructor only)."""
        return f"{GRADING}/{self.name}.py", f"{HIDDEN}/{self.name}.py"


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


def degenerate_submissions(folder: Path, names: list[str] | None = None,
                           root: Path = ROOT) -> list[tuple[str, str, Path]]:
    """One submission folder per answer in mutants.DEGENERATE (zeros, constants, random draws):
    [(assignment, label, folder)]."""
    from tinyldm.course.mutants import DEGENERATE

    out = []
    for name in DEGENERATE if names is None else names:
        a = ASSIGNMENTS[name]
        text = (root / a.file).read_text()
        indents = [r[3] for r in regions(text) if r[0] == name]
        for i, (label, lines) in enumerate(DEGENERATE[name]):
            sub = Path(folder) / f"{name}-degenerate-{i}"
            sub.mkdir(parents=True)
            new = [f"{indent}{line}\n" for indent, line in zip(indents, lines, strict=True)]
            (sub / Path(a.file).name).write_text(with_bodies(text, name, new))
            out.append((name, label, sub))
    return out


def check_solution(body: str) -> str | None:
    """Why a region's lines cannot be graded (a syntax error), or None. Nothing else is refused:
    the lines run in a sandbox whose outputs are only data."""
    source = textwrap.dedent(body)
    try:
        ast.parse(source if source.strip() else "pass")
    except SyntaxError as e:
        return f"SyntaxError in the region, its line {e.lineno}: {e.msg}"
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
    test: str  # "<file relative to the project root>::<case>"
    visible: bool
    passed: bool
    output: str = ""


@dataclass
class Report:
    submission: str
    sandbox: str = ""  # how the student's code was shut in (Grader.describe)
    cases: list[CaseResult] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)  # assignment -> what the grader noticed
    seconds: dict[str, float] = field(default_factory=dict)  # assignment -> wall time

    def score(self, name: str) -> tuple[int, int]:
        mine = [c for c in self.cases if c.assignment == name]
        return sum(c.passed for c in mine), len(mine)


def read_submitted(folder: Path, rel: str, limit: int = MAX_SUBMITTED_BYTES) -> str | None:
    """The submitted text of project file `rel`: at its place in a copy, or by its name at the top
    of `folder`; None if neither is there. Refuses (UsageError) what is not a regular file inside
    `folder`: a symbolic link at any level, a device or pipe, a file over `limit` bytes."""
    for candidate in (Path(rel), Path(Path(rel).name)):
        path = Path(folder)
        for i, part in enumerate(candidate.parts):
            path = path / part
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:
                break
            if stat.S_ISLNK(mode):
                raise UsageError(f"{path} is a symbolic link: submit the file itself")
            if i < len(candidate.parts) - 1 and not stat.S_ISDIR(mode):
                break
        else:
            flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
            fd = os.open(path, flags)
            with os.fdopen(fd, "rb") as f:
                info = os.fstat(fd)
                if not stat.S_ISREG(info.st_mode):
                    raise UsageError(f"{path} is not a regular file: submit the file itself")
                if info.st_size > limit:
                    raise UsageError(f"{path} has {info.st_size} bytes, over the limit of "
                                     f"{limit}: submit the library file")
                data = f.read(limit + 1)
            if len(data) > limit:
                raise UsageError(f"{path} is over the limit of {limit} bytes")
            return data.decode(errors="replace")
    return None


def load_cases(name: str, hidden: bool) -> list:
    """The case functions of an assignment's visible (or hidden) grading module, in file order;
    [] when the module is not there (a student copy has no hidden cases)."""
    module = f"tinyldm.course.grading.{'hidden.' if hidden else ''}{name}"
    try:
        m = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):
            return []
        raise
    return [f for f in vars(m).values() if inspect.isfunction(f) and f.__module__ == m.__name__
            and not f.__name__.startswith("_")]


def library_tree(out: Path, stubbed: set[str], root: Path = ROOT) -> Path:
    """The `tinyldm` package of `root` at `out`, without the grading cases and the mutants, with the
    `stubbed` assignments' regions stubbed, readable by every user (the sandbox runs as another)."""
    for rel in project_files(root):
        if not rel.startswith("tinyldm/") or rel.startswith((GRADING, *INSTRUCTOR_ONLY)):
            continue
        dest = out / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if rel in {ASSIGNMENTS[n].file for n in stubbed}:
            dest.write_text(stub((root / rel).read_text(), stubbed))
        else:
            shutil.copyfile(root / rel, dest)
    for path in [out, *out.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return out


def hidden_folders(root: Path = ROOT) -> list[Path]:
    """What the sandbox covers: the instructor's project (or, installed as a package, tinyldm)."""
    return [root] if (root / "pyproject.toml").exists() else [root / "tinyldm"]


def case_node(case) -> tuple[str, bool]:
    """A case's id ("<file>::<function>", relative to the project root) and whether students see
    it (it is not in grading/hidden/)."""
    return (f"{case.__module__.replace('.', '/')}.py::{case.__name__}",
            ".hidden." not in case.__module__)


def run_cases(child: sandbox.Child, name: str, cases: list, *, timeout: int,
              stop_early: bool = False) -> list[CaseResult]:
    """Run `cases` of assignment `name` against `child`; each case's inputs are drawn afresh.
    A case passes when it returns; a failed check, an error the student's code raised, a time-out
    or a reply that does not fit all fail it with the reason."""
    import torch

    from tinyldm.course.grading import Failed

    out, stopped = [], None
    for case in cases:
        node, shown = case_node(case)
        if stopped:
            out.append(CaseResult(name, node, shown, False, stopped))
            continue
        g = torch.Generator().manual_seed(secrets.randbits(62))
        try:
            if child.proc is None:
                child.start()  # its own time limit: importing torch is not the student's time
            deadline = time.monotonic() + timeout

            def run(probe, _deadline=deadline, **inputs):
                return child.call(probe, inputs, deadline=_deadline, limit=timeout)

            case(run, g)
            passed, output = True, ""
        except Failed as e:
            passed, output = False, str(e)
        except sandbox.ChildError as e:
            passed, output = False, str(e)
            if e.fatal:
                child.close()  # killed, and started afresh by the next case's first call
        except Exception as e:  # a reply the checks could not use (a wrong shape, a wrong dtype)
            passed, output = False, f"{type(e).__name__}: {e}"[:600]
        out.append(CaseResult(name, node, shown, passed, output))
        if stop_early and not passed:
            stopped = "not run (grading stopped at the first failed case)"
    child.close()
    return out


class Grader:
    """Grades submissions for `names` (default: all assignments).

        with Grader(names) as grader:
            report = grader.grade("path/to/submission")

    `timeout` overrides the assignments' per-case limits; `stop_early` ends an assignment at its
    first failed case (the kit's own tests use it: they only ask whether a wrong answer loses a
    point); `threads` sets the child's CPU threads; `isolation` ("namespaces" or "reaper"; default:
    the strongest this machine allows, see sandbox.py)."""

    def __init__(self, names: list[str] | None = None, *, timeout: int | None = None,
                 threads: int | None = None, stop_early: bool = False, quiet: bool = False,
                 isolation: str | None = None):
        self.names = list(ASSIGNMENTS) if names is None else names
        unknown = sorted(set(self.names) - set(ASSIGNMENTS))
        if unknown:
            raise UsageError(f"unknown assignments {unknown}; choose from {', '.join(ASSIGNMENTS)}")
        for package in sorted({p for n in self.names for p in ASSIGNMENTS[n].requires}):
            try:
                importlib.import_module(package)
            except ImportError as e:
                raise UsageError(f"grading needs {package} (its cases compare against it): "
                                 f"pip install {package}") from e
        self.timeout, self.threads = timeout, threads
        self.stop_early, self.quiet = stop_early, quiet
        self.isolation = isolation or sandbox.isolation()
        self.cases = {n: load_cases(n, False) + load_cases(n, True) for n in self.names}
        if not all(self.cases.values()):
            raise UsageError(f"no grading cases for {[n for n in self.names if not self.cases[n]]}"
                             f" in {ROOT / GRADING}: grade from the instructor's project")

    def describe(self) -> str:
        user = (f"as uid {sandbox.SANDBOX_UID}" if os.geteuid() == 0 else
                "as this user")
        return f"{self.isolation}, {user}"

    def __enter__(self) -> Grader:
        self._tmp = tempfile.TemporaryDirectory(prefix="tmp")
        self.base = Path(self._tmp.name)
        self.base.chmod(0o755)  # the sandbox's user reads the trees below it
        self.library = library_tree(self.base / "library", set(self.names))
        return self

    def __exit__(self, *exc) -> None:
        self._tmp.cleanup()

    def _body(self, submission: Path, a: Assignment,
              report: Report) -> tuple[list[str] | None, str | None]:
        """The submitted lines of `a`'s regions, or why there are none to grade."""
        pristine = (ROOT / a.file).read_text()
        try:
            text = read_submitted(submission, a.file)
        except UsageError as e:
            return None, f"refused: {e}"
        if text is None:
            return None, f"{a.file} was not submitted"
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
                                        "are ignored (graded with the library's own code)")
        except ValueError:
            pass
        return body, None

    def grade(self, submission: str | Path, only: list[str] | None = None) -> Report:
        """Grade a submission (a student copy, or a folder of the submitted files), each assignment
        in a tree of its own; `only`: a subset of the grader's assignments."""
        submission = Path(submission)
        report = Report(str(submission), self.describe())
        for name in self.names if only is None else only:
            start, a = time.perf_counter(), ASSIGNMENTS[name]
            body, problem = self._body(submission, a, report)
            if problem:
                report.cases += [CaseResult(name, *case_node(c), False, problem)
                                 for c in self.cases[name]]
                report.notes[name] = problem
            else:
                tree = Path(tempfile.mkdtemp(dir=self.base))
                shutil.copytree(self.library, tree, dirs_exist_ok=True)
                stubbed = (self.library / a.file).read_text()
                (tree / a.file).write_text(with_bodies(stubbed, name, body))
                (tree / a.file).chmod(0o644)
                tree.chmod(0o755)
                child = sandbox.Child(tree, isolation=self.isolation, hide=hidden_folders(),
                                      threads=self.threads)
                try:
                    report.cases += run_cases(child, name, self.cases[name],
                                              timeout=self.timeout or a.timeout,
                                              stop_early=self.stop_early)
                finally:
                    child.close()
                    shutil.rmtree(tree, ignore_errors=True)
            report.seconds[name] = time.perf_counter() - start
            if not self.quiet:
                ok, total = report.score(name)
                print(f"{name:<26}{f'{ok}/{total}':>8}{report.seconds[name]:6.0f} s  "
                      f"{report.notes.get(name, '')}", flush=True)
        return report


def grade_submission(submission: str | Path, names: list[str] | None = None, **kw) -> Report:
    """Grade one submission with a fresh grader (see `Grader` for the options)."""
    with Grader(names, **kw) as grader:
        return grader.grade(submission)


def self_check(name: str, root: Path = ROOT, *, isolation: str | None = None,
               timeout: int | None = None) -> list[CaseResult]:
    """The visible cases of `name` against the project at `root` as it is (a student's copy), run
    the way grading runs them."""
    if name not in ASSIGNMENTS:
        raise UsageError(f"unknown assignment {name!r}; choose from {', '.join(ASSIGNMENTS)}")
    a = ASSIGNMENTS[name]
    with tempfile.TemporaryDirectory(prefix="tmp") as tmp:
        base = Path(tmp)
        base.chmod(0o755)
        tree = library_tree(base / "library", set(), root)
        child = sandbox.Child(tree, isolation=isolation or sandbox.isolation(), hide=[])
        return run_cases(child, name, load_cases(name, False), timeout=timeout or a.timeout)


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
    summary.append(f"(the code ran in a sandbox: {report.sandbox})")
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
