"""The documentation's commands exist: every flag a page shows is one its entry point accepts.

A documented command is a line of a fenced code block, or an inline `code` span, in README.md,
docs/*.md or notebooks/README.md, that starts with `python `, `python3 `, `torchrun ` or `bash .ci/`
(also after `VAR=value` and after `&&`). Its entry point is a script (`train_ldm.py`), a module
(`-m tinyldm.course`, with a sub-command such as `student` when the module has them) or torchrun
(its own flags, then the script's). Each entry point's `--help` runs once, in a subprocess from the
repository root, and every `--flag` of the command must be an option of that help text.
`bash .ci/gpu_check STAGE` takes only the stages the script knows. The file map (docs/files.md,
which the README links) must name files that exist, and every module of the package; the pages'
relative links and images must point at files (and headings) that exist.
"""

import importlib.util
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
         ROOT / "notebooks" / "README.md"]
# every file, one row each (the README keeps a short map of the folders)
FILE_MAP = ROOT / "docs" / "files.md"
GPU_CHECK_STAGES = ("fetch", "1", "2", "3", "4", "5")  # the cases of .ci/gpu_check
SEPARATORS = {"&&", "||", ";", "|"}
FLAG = re.compile(r"--[A-Za-z0-9][\w-]*")


# --- finding the commands -------------------------------------------------------------------------

def commands_in(text: str) -> list[tuple[int, list[str]]]:
    """(line number, tokens) of every command in a markdown text, one per `&&`-separated part."""
    lines = text.splitlines()
    candidates, prose, fenced, i = [], [], False, 0
    while i < len(lines):
        line = lines[i].strip()
        if line.startswith(("```", "~~~")):
            fenced = not fenced
            prose.append("")
        elif fenced:
            start = i
            # a command continued on the next line
            while line.endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line[:-1] + " " + lines[i].strip()
                prose.append("")
            candidates.append((start + 1, line))
            prose.append("")
        else:
            prose.append(lines[i])
        i += 1
    text = "\n".join(prose)  # fenced lines blanked, so line numbers still count
    # a span may cross one line break
    for m in re.finditer(r"(?<!`)`([^`\n]+(?:\n[^`\n]+)?)`(?!`)", text):
        candidates.append((text.count("\n", 0, m.start()) + 1, " ".join(m.group(1).split())))
    found = []
    for lineno, line in candidates:
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:  # an unbalanced quote: good enough for finding flags
            tokens = line.split()
        part: list[str] = []
        for token in [*tokens, "&&"]:
            if token in SEPARATORS:
                while part and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", part[0]):  # DRY=1 bash ...
                    part = part[1:]
                if is_command(part):
                    found.append((lineno, part))
                part = []
            else:
                part.append(token)
    return found


def is_command(tokens: list[str]) -> bool:
    if len(tokens) >= 2 and tokens[0] in ("python", "python3", "torchrun"):
        return True
    return len(tokens) >= 2 and tokens[0] == "bash" and tokens[1].startswith(".ci/")


def documented_commands() -> list[tuple[str, list[str]]]:
    return [(f"{page.relative_to(ROOT)}:{lineno}", tokens)
            for page in PAGES for lineno, tokens in commands_in(page.read_text(encoding="utf-8"))]


# --- what an entry point accepts ------------------------------------------------------------------

@cache
def help_text(argv: tuple[str, ...]) -> str:
    """The `--help` output of `python <argv>` run from the repository root."""
    out = subprocess.run([sys.executable, *argv, "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=180)
    assert out.returncode == 0, f"python {' '.join(argv)} --help failed:\n{out.stderr[-2000:]}"
    return out.stdout


def accepted_flags(text: str) -> set[str]:
    """The options of an argparse-style help text: those in the usage block and those that start an
    option line (both spellings of `--a-b, --a_b`), never words of the description."""
    usage = text.split("\n\n", 1)[0]
    flags = set(FLAG.findall(usage))
    lines = text.splitlines()
    headers = [i for i, line in enumerate(lines)
               if line.rstrip() in ("options:", "optional arguments:")]
    for line in lines[headers[0] if headers else 0:]:
        if re.match(r"\s{2,}-", line):
            flags.update(FLAG.findall(re.split(r"\s{2,}", line.strip())[0]))
    return flags


def sub_commands(text: str) -> set[str]:
    """The choices of a sub-command positional (`{list,student,grade}`), if the help has one."""
    m = re.search(r"^positional arguments:\n\s+\{([\w,-]+)\}", text, re.M)
    return set(m.group(1).split(",")) if m else set()


TORCHRUN = ("-m", "torch.distributed.run")


def python_entry(tokens: list[str]) -> tuple[tuple[str, ...] | None, list[str], list[str]]:
    """(help argv or None, the tokens after the entry point, problems) for `python ...` tokens."""
    if tokens[1] == "-c":
        return None, [], []
    if tokens[1] == "-m":
        module, rest = tokens[2], tokens[3:]
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # a parent package is missing
            found = False
        return (("-m", module), rest, []) if found else (None, [], [f"no module {module}"])
    script = tokens[1]
    if not script.endswith(".py"):
        return None, [], [f"unrecognised entry point {script!r}"]
    if not (ROOT / script).is_file():
        return None, [], [f"no script {script}"]
    return (script,), tokens[2:], []


def split_torchrun(tokens: list[str]) -> tuple[list[str], list[str]]:
    """torchrun's own flags, and the script's command as `python script.py ...` (empty without a
    script)."""
    scripts = [i for i, t in enumerate(tokens) if t.endswith(".py")]
    if not scripts:
        return [t for t in tokens[1:] if t.startswith("--")], []
    return [t for t in tokens[1:scripts[0]] if t.startswith("--")], ["python", *tokens[scripts[0]:]]


def check(tokens: list[str]) -> list[str]:
    """What is wrong with a documented command: unknown flags, entry points, sub-commands or
    stages."""
    if tokens[0] == "bash":
        if not (ROOT / tokens[1]).is_file():
            return [f"no script {tokens[1]}"]
        if tokens[1] == ".ci/gpu_check" and (len(tokens) < 3 or tokens[2] not in GPU_CHECK_STAGES):
            return [f"gpu_check stage {tokens[2:3]} is not one of {GPU_CHECK_STAGES}"]
        return []
    checks: list[tuple[tuple[str, ...], list[str]]] = []  # (help argv, the flags used with it)
    if tokens[0] == "torchrun":
        torchrun_flags, tokens = split_torchrun(tokens)
        checks.append((TORCHRUN, torchrun_flags))
        if not tokens:
            return ["torchrun without a script"]
    argv, rest, problems = python_entry(tokens)
    if argv is None:
        return problems
    # a positional: a sub-command, if the entry point has them
    if rest and not rest[0].startswith("-"):
        choices = sub_commands(help_text(argv))
        if choices and rest[0] not in choices:
            return [f"{' '.join(argv)}: no sub-command {rest[0]!r} (has {sorted(choices)})"]
        if choices:
            argv, rest = (*argv, rest[0]), rest[1:]
    checks.append((argv, [t for t in rest if t.startswith("--") and t != "--"]))
    for help_argv, used in checks:
        if used:
            known = accepted_flags(help_text(help_argv))
            problems += [flag for flag in (t.split("=", 1)[0] for t in used) if flag not in known]
    return problems


def help_argvs(tokens: list[str]) -> set[tuple[str, ...]]:
    """The top-level help texts a command needs (a sub-command's help is fetched when it is met)."""
    if tokens[0] == "bash":
        return set()
    argvs = set()
    if tokens[0] == "torchrun":
        argvs.add(TORCHRUN)
        tokens = split_torchrun(tokens)[1]
        if not tokens:
            return argvs
    argv = python_entry(tokens)[0]
    return argvs | ({argv} if argv is not None else set())


# --- the tests ------------------------------------------------------------------------------------

COMMANDS = documented_commands()


@pytest.fixture(scope="module", autouse=True)
def _help_texts_in_parallel():
    """Each help starts Python and imports torch: run them side by side once; the tests read the
    cache."""
    argvs = set().union(*(help_argvs(tokens) for _, tokens in COMMANDS))
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(help_text, sorted(argvs)))


@pytest.mark.slow
def test_the_pages_show_commands():
    where = {w.split(":")[0] for w, _ in COMMANDS}
    assert "README.md" in where and len(COMMANDS) >= 40, sorted(where)
    assert (any(t[0] == "torchrun" for _, t in COMMANDS)
            and any(t[:2] == ["bash", ".ci/gpu_check"] for _, t in COMMANDS))


@pytest.mark.slow
@pytest.mark.parametrize("where, tokens", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_documented_command_exists(where, tokens):
    assert check(tokens) == [], f"{where}: {shlex.join(tokens)}"


def first_documented(prefix: list[str]) -> list[str]:
    """A copy of the first documented command that starts with `prefix`."""
    matches = [tokens for _, tokens in COMMANDS if tokens[:len(prefix)] == prefix]
    assert matches, f"no documented command starts with {prefix}"
    return list(matches[0])


@pytest.mark.parametrize("prefix, bad", [
    (["python", "sample.py"], "--cfg"),  # the guidance flag's old name
    (["python", "train_ldm.py"], "--no-ema"),  # dashes where the scripts use underscores
    (["python", "train_ae.py"], "--not_a_flag"),
    (["python", "-m", "tinyldm.tools.evaluate"], "--cfg"),
    (["python", "-m", "tinyldm.course", "student"], "--json"),  # grade's flag, not student's
    (["python", "-m", "tinyldm.tools.bench"], "--diffusers-modes"),
    (["torchrun"], "--not_a_flag"),
])
def test_a_wrong_flag_in_a_documented_command_is_caught(prefix, bad):
    tokens = first_documented(prefix)
    assert check(tokens) == []
    assert check([*tokens, bad, "1"]) == [bad]


def test_a_wrong_torchrun_flag_is_checked_against_torchrun():
    tokens = first_documented(["torchrun"])
    script = [i for i, t in enumerate(tokens) if t.endswith(".py")][0]
    # torchrun takes both spellings
    assert check([*tokens[:script], "--nproc-per-node=2", *tokens[script:]]) == []
    # the script's flag
    assert check([*tokens[:script], "--preset", "shapes", *tokens[script:]]) == ["--preset"]


@pytest.mark.parametrize("command, problem", [
    ("python train_vae.py --steps 3", "no script train_vae.py"),
    ("python -m tinyldm.bench --smoke", "no module tinyldm.bench"),
    ("python -m tinyldm.course teach --out x", "no sub-command 'teach'"),
    ("bash .ci/gpu_check 6", "gpu_check stage ['6']"),
    ("bash .ci/gpu_check", "gpu_check stage []"),
])
def test_a_wrong_entry_point_is_caught(command, problem):
    problems = check(shlex.split(command))
    assert len(problems) == 1 and problem in problems[0], problems


def test_commands_are_found_in_blocks_spans_and_chains():
    text = ("Run `python sample.py --ckpt a.pt\n--n 8` or:\n\n```bash\n"
            "pip install -e . && python train_ae.py --smoke \\\n"
            "    --out x   # a comment --not_a_flag\n"
            "DRY=1 bash .ci/gpu_check 1\necho python\n```\n")
    assert commands_in(text) == [
        (5, ["python", "train_ae.py", "--smoke", "--out", "x"]),
        (7, ["bash", ".ci/gpu_check", "1"]),
        (1, ["python", "sample.py", "--ckpt", "a.pt", "--n", "8"]),
    ]


# --- the file map ---------------------------------------------------------------------------------

def file_map_paths(page: str) -> list[str]:
    """The paths in the first column of a page's "File map" table."""
    section = re.search(r"^## File map\n(.*?)(?=^## |\Z)", page, re.M | re.S)
    assert section, "the page has no '## File map' section"
    rows = [line for line in section.group(1).splitlines() if line.startswith("| `")]
    return [path for row in rows for path in re.findall(r"`([^`]+)`", row.split("|")[1])]


def test_file_map_names_existing_files():
    paths = file_map_paths(FILE_MAP.read_text(encoding="utf-8"))
    assert len(paths) >= 30, paths
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert not missing, f"the file map names files that do not exist: {missing}"


def test_file_map_names_every_module_and_script():
    named = set(file_map_paths(FILE_MAP.read_text(encoding="utf-8")))
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "tinyldm").rglob("*.py")
               if p.name != "__init__.py"
               # the kit's grading tests: named as a folder
               and "tinyldm/course/grading/" not in p.as_posix()}
    scripts = {p.name for p in ROOT.glob("*.py")}
    assert modules - named == set() and scripts - named == set(), (
        "missing from docs/files.md's file map")


def test_the_readme_links_the_file_map():
    assert "](docs/files.md)" in (ROOT / "README.md").read_text(encoding="utf-8")


def test_file_map_check_catches_a_missing_file():
    readme = ("## File map\n\n| file | what |\n|---|---|\n| `tinyldm/schedule.py` | x |\n"
              "| `tinyldm/old.py` | y |\n")
    assert file_map_paths(readme) == ["tinyldm/schedule.py", "tinyldm/old.py"]
    assert [p for p in file_map_paths(readme) if not (ROOT / p).exists()] == ["tinyldm/old.py"]


# --- links between the pages ----------------------------------------------------------------------

def heading_anchors(markdown: str) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces as
    hyphens."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"^```.*?^```", "", markdown, flags=re.M | re.S),
                          re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def broken_links(page: Path) -> list[str]:
    """Relative links and images of a page whose file, or heading, does not exist."""
    text = page.read_text(encoding="utf-8")
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(target)
        elif (anchor and file.suffix == ".md"
              and anchor not in heading_anchors(file.read_text(encoding="utf-8"))):
            broken.append(target)
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_and_images_resolve(page):
    assert broken_links(page) == []


def test_a_broken_link_is_caught(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    page = tmp_path / "page.md"
    page.write_text("# Quick start (Fig. 1)\n"
                    "![x](a.png) [ok](#quick-start-fig-1) [gone](b.md) [anchor](#nowhere)\n")
    assert broken_links(page) == ["b.md", "#nowhere"]
