"""The course kit: marked regions, student copies that hand out no code, and a grader whose verdict
no student code can reach. The attacks below are ways a student can try to steer a grader; each
must score no more than an answer of zeros."""

import ast
import csv
import json
import os
import subprocess
import sys
import textwrap
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO

import numpy as np
import pytest
import torch

from tinyldm.course import kit, probe, sandbox
from tinyldm.course.__main__ import grade_folder, main, write_autograder
from tinyldm.course.mutants import DEGENERATE, MUTANTS

AUTOENCODER = (kit.ROOT / "tinyldm/autoencoder.py").read_text()
KL_REFERENCE = textwrap.dedent(kit.bodies(AUTOENCODER, "kl_term")[0])
needs_namespaces = pytest.mark.skipif(
    sys.platform != "linux" or sandbox.isolation() != "namespaces",
    reason="this machine cannot make namespaces")


def sandbox_processes() -> list[int]:
    """The processes running as the sandbox's user."""
    found = []
    for pid in sandbox._processes():
        try:
            with open(f"/proc/{pid}/status") as f:
                uid = next(int(line.split()[1]) for line in f if line.startswith("Uid:"))
        except (OSError, StopIteration):
            continue
        found += [pid] if uid == sandbox.SANDBOX_UID else []
    return found


def kl_submission(folder, body: str):
    """A folder holding autoencoder.py with `body` (unindented lines) as the kl_term region."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = "".join(f"        {line}\n" if line.strip() else "\n" for line in body.splitlines())
    (folder / "autoencoder.py").write_text(kit.with_bodies(AUTOENCODER, "kl_term", [lines]))
    return folder


def test_every_assignment_is_marked_and_has_cases_mutants_and_degenerate_answers():
    for a in kit.ASSIGNMENTS.values():
        text = (kit.ROOT / a.file).read_text()
        mine = [r for r in kit.regions(text) if r[0] == a.name]
        assert mine and all(last > first + 1 for _, first, last, _ in mine)
        stubbed = kit.stub(text, {a.name})
        ast.parse(stubbed)  # still valid Python
        assert [r[0] for r in kit.regions(stubbed)] == [r[0] for r in kit.regions(text)]
        assert stubbed.count(f"assignment {a.name}: ") == len(mine)
        assert kit.stub(text, set()) == text
        visible, hidden = kit.load_cases(a.name, False), kit.load_cases(a.name, True)
        assert visible and hidden and len(visible) + len(hidden) >= 3, a.name
        assert all(case.__doc__ for case in visible + hidden)  # the hint a student sees
        assert len(MUTANTS[a.name]) >= 3 and len(DEGENERATE[a.name]) == 3
    assert set(MUTANTS) == set(DEGENERATE) == set(kit.ASSIGNMENTS)


def test_markers_must_pair():
    with pytest.raises(ValueError, match="has no END"):
        kit.regions("# BEGIN ASSIGNMENT x\ny = 1\n")
    with pytest.raises(ValueError, match="without its BEGIN"):
        kit.regions("y = 1\n# END ASSIGNMENT x\n")


def test_a_student_copy_changes_only_the_regions_and_hands_out_no_solution_code(tmp_path):
    out = kit.make_student_copy(tmp_path / "copy")
    files = kit.project_files(kit.ROOT)
    changed = {a.file for a in kit.ASSIGNMENTS.values()}
    for rel in files:
        if rel.startswith(kit.INSTRUCTOR_ONLY):
            assert not (out / rel).exists(), rel  # hidden cases, mutants
            continue
        same = (kit.ROOT / rel).read_bytes() == (out / rel).read_bytes()
        assert same == (rel not in changed), rel
    for a in kit.ASSIGNMENTS.values():  # no line of a reference solution is left in its file
        stubbed = (out / a.file).read_text()
        for body in kit.bodies((kit.ROOT / a.file).read_text(), a.name):
            for line in body.splitlines():
                code = line.split("#")[0].strip()
                if len(code) > 12:
                    assert code not in stubbed, (a.name, code)
    assert "ddim_step" in (out / "ASSIGNMENTS.md").read_text()
    with pytest.raises(SystemExit, match="not empty"):
        kit.make_student_copy(out)
    with pytest.raises(SystemExit, match="unknown assignments"):
        kit.make_student_copy(tmp_path / "other", ["backprop"])
    again = kit.make_student_copy(tmp_path / "from-a-copy", root=out)  # no git: the file walk
    assert (again / "tinyldm/ddim.py").exists() and not (again / ".git").exists()


def test_a_grading_tree_holds_no_reference_solution_and_no_case(tmp_path):
    tree = kit.library_tree(tmp_path / "lib", set(kit.ASSIGNMENTS))
    assert not (tree / kit.GRADING).exists() and not (tree / "tinyldm/course/mutants.py").exists()
    for a in kit.ASSIGNMENTS.values():
        text = (tree / a.file).read_text()
        assert all("NotImplementedError" in b for b in kit.bodies(text, a.name))
    assert (tree / "tinyldm/course/probe.py").exists()


def test_only_regular_files_inside_the_submission_are_read(tmp_path):
    folder = tmp_path / "sub"
    (folder / "tinyldm").mkdir(parents=True)
    (folder / "tinyldm/ddim.py").write_text("x = 1\n")
    assert kit.read_submitted(folder, "tinyldm/ddim.py") == "x = 1\n"
    assert kit.read_submitted(folder, "tinyldm/blocks.py") is None
    (folder / "blocks.py").write_text("y = 2\n")  # by its name at the top
    assert kit.read_submitted(folder, "tinyldm/blocks.py") == "y = 2\n"
    (folder / "autoencoder.py").symlink_to(kit.ROOT / "tinyldm/autoencoder.py")  # the reference
    with pytest.raises(SystemExit, match="symbolic link"):
        kit.read_submitted(folder, "tinyldm/autoencoder.py")
    other = tmp_path / "sub2"
    other.mkdir()
    (other / "tinyldm").symlink_to(kit.ROOT / "tinyldm")  # a linked folder
    with pytest.raises(SystemExit, match="symbolic link"):
        kit.read_submitted(other, "tinyldm/schedule.py")
    os.mkfifo(folder / "ldm.py")  # a pipe: refused without blocking on it
    with pytest.raises(SystemExit, match="not a regular file"):
        kit.read_submitted(folder, "tinyldm/ldm.py")
    (folder / "unet.py").write_bytes(b"#" * (kit.MAX_SUBMITTED_BYTES + 1))
    with pytest.raises(SystemExit, match="over the limit"):
        kit.read_submitted(folder, "tinyldm/unet.py")


def test_messages_carry_data_and_never_code():
    values = {"a": torch.arange(6.0).view(2, 3), "n": 3, "s": "eps", "flag": True,
              "i": torch.tensor([1, 2], dtype=torch.int64)}
    back = probe.decode(probe.encode(values))
    assert torch.equal(back["a"], values["a"]) and torch.equal(back["i"], values["i"])
    assert back["n"] == 3 and back["s"] == "eps" and back["flag"] is True
    pickled = BytesIO()  # an object array is a pickle: refused
    np.savez(pickled, x=np.array([{"code": 1}], dtype=object))
    with pytest.raises(ValueError):
        probe.decode(pickled.getvalue())
    compressed = BytesIO()  # compressed members could expand past any limit: refused
    np.savez_compressed(compressed, x=np.zeros(10))
    with pytest.raises(ValueError, match="uncompressed"):
        probe.decode(compressed.getvalue())
    with pytest.raises(zipfile.BadZipFile):
        probe.decode(b"not an archive")


@pytest.mark.slow
def test_the_reference_scores_full_marks_zeros_score_nothing_and_every_mutant_loses_points(
        tmp_path):
    """Every mutant (one plausible mistake) and every degenerate answer (zeros, a constant, a
    random draw of the right shape), graded as a submission: the reference earns every point, each
    mutant loses at least one, each degenerate answer earns none."""
    jobs = kit.mutant_submissions(tmp_path / "m") + kit.degenerate_submissions(tmp_path / "d")
    half = [jobs[0::2], jobs[1::2]]

    def run(part):  # a mutant need only lose a point: its grading stops at the first
        with kit.Grader(threads=1, quiet=True) as full, \
                kit.Grader(threads=1, quiet=True, stop_early=True) as early:
            graded = [(name, label, folder, (early if label != "(the reference)" and "degenerate"
                                             not in folder.name else full).grade(
                folder, only=[name])) for name, label, folder in part]
            return [(name, label, folder, report.score(name),
                     [(c.test, c.output) for c in report.cases if not c.passed])
                    for name, label, folder, report in graded]

    with ThreadPoolExecutor(2) as pool:
        results = [r for part in pool.map(run, half) for r in part]
    wrong = []
    for name, label, folder, (ok, total), failed in results:
        if label == "(the reference)":  # with what the reference's failed cases said
            wrong += [] if ok == total else [(name, label, ok, total, failed)]
        elif "degenerate" in folder.name:
            wrong += [] if ok == 0 else [(name, label, ok, total)]
        elif ok == total:
            wrong.append((name, label, ok, total))
    assert not wrong, wrong
    assert len(results) == sum(len(m) + 1 for m in MUTANTS.values()) + 3 * len(DEGENERATE)


@pytest.mark.slow
@needs_namespaces
def test_the_sandbox_sees_no_grader_no_project_no_network_and_runs_unprivileged(tmp_path):
    """A submission that reports what it can see (in its error message, the one text of its own
    that reaches a report)."""
    spy = """import os, socket
seen = [f"uid={os.getuid()}", f"procs={sorted(p for p in os.listdir('/proc') if p.isdigit())}"]
seen.append(f"project={os.path.exists('ROOT/tinyldm/autoencoder.py')}")
seen.append(f"hidden={os.path.exists('ROOT/tinyldm/course/grading')}")
try:
    socket.create_connection(("127.0.0.1", 22), timeout=2)
    seen.append("network=yes")
except OSError:
    seen.append("network=no")
seen.append(f"env={sorted(os.environ)}")
raise RuntimeError(" ".join(seen))""".replace("ROOT", str(kit.ROOT))
    report = kit.grade_submission(kl_submission(tmp_path / "spy", spy), ["kl_term"], threads=1,
                                  quiet=True)
    seen = report.cases[0].output
    assert "project=False" in seen and "hidden=False" in seen and "network=no" in seen
    assert "procs=['1']" in seen  # alone in its PID namespace
    assert ("env=['HOME', 'LANG', 'MKL_NUM_THREADS', 'OMP_NUM_THREADS', 'PATH', "
            "'PYTHONDONTWRITEBYTECODE', 'PYTHONHASHSEED', 'TMPDIR']") in seen
    if os.geteuid() == 0:
        assert f"uid={sandbox.SANDBOX_UID}" in seen


ATTACKS = {
    # each ends by returning zeros (or nothing): what it adds is the attack
    "patches torch.allclose to accept anything": """
torch.allclose = lambda *a, **k: True
torch.equal = lambda *a, **k: True
return torch.zeros(self.mean.shape[0])""",
    "replaces the probe's reply with its own, through getattr": """
mods = getattr(getattr(torch, "sy" + "s"), "modules")
p = mods["tinyldm.course.probe"]
send = p.write_message
p.write_message = lambda stream, values: send(stream, {"passed": True, "score": 4})
return torch.zeros(self.mean.shape[0])""",
    "reads the reference from the grader's argv or the project, and runs it": """
import os, re
found = None
for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
    try:
        argv = open(f"/proc/{pid}/cmdline").read().split("\\0")
    except OSError:
        continue
    for a in argv:
        if os.path.isfile(os.path.join(a, "tinyldm/autoencoder.py")):
            found = os.path.join(a, "tinyldm/autoencoder.py")
for guess in ["ROOT/tinyldm/autoencoder.py", "/autograder/source/tinyldm/autoencoder.py"]:
    if os.path.isfile(guess):
        found = guess
if found:
    text = open(found).read()
    body = text.split("# BEGIN ASSIGNMENT kl_term")[1].split("# END ASSIGNMENT kl_term")[0]
    return eval(body.strip().splitlines()[-1].strip().removeprefix("return "))
return torch.zeros(self.mean.shape[0])""",
    "plants a passing report and exits 0": """
import os, sys
for a in sys.argv + [f"{os.getcwd()}/report.xml", "/tmp/report.xml"]:
    try:
        open(a.split("=")[-1], "w").write('<testsuite><testcase name="x"/></testsuite>')
    except OSError:
        pass
os._exit(0)""",
    "unpickles an exec payload that writes outside": """
import pickle
class P:
    def __reduce__(self):
        return (exec, ("open('MARK', 'w').write('ran')",))
torch.serialization.pickle.loads(pickle.dumps(P()))
return torch.zeros(self.mean.shape[0])""",
    "rewrites the library in its tree for the next assignment": """
import os, glob
for f in glob.glob(os.getcwd() + "/tinyldm/*.py"):
    try:
        open(f, "a").write("\\nimport os\\nos._exit(0)\\n")
    except OSError:
        pass
return torch.zeros(self.mean.shape[0])""",
    "prints every case it can find into its error": """
import os
found = []
for top in ["/", os.getcwd()]:
    for d, _, files in os.walk(top):
        if "grading" in d and not d.startswith("/proc"):
            found += [open(os.path.join(d, f), errors="replace").read() for f in files
                      if f.endswith(".py")]
        if len(found) > 3:
            break
raise RuntimeError("LEAK" + "".join(found)[:5000])""",
    "leaves a daemon that holds the reply pipe open": """
import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        time.sleep(600)
    os._exit(0)
return torch.zeros(self.mean.shape[0])""",
}


@pytest.mark.slow
def test_each_attack_scores_no_more_than_zeros_and_leaves_nothing_behind(tmp_path):
    mark = tmp_path / "mark"
    tmp_path.chmod(0o777)  # even where the sandbox's user could write, the payload must not
    with kit.Grader(["kl_term"], threads=1, quiet=True) as grader:
        zeros = grader.grade(kl_submission(tmp_path / "zeros",
                                           "return torch.zeros(self.mean.shape[0])"))
        right = grader.grade(kl_submission(tmp_path / "right", KL_REFERENCE))
        assert zeros.score("kl_term") == (0, 4) and right.score("kl_term") == (4, 4)
        for i, (what, body) in enumerate(ATTACKS.items()):
            body = body.replace("ROOT", str(kit.ROOT)).replace("MARK", str(mark))
            start = time.monotonic()
            report = grader.grade(kl_submission(tmp_path / f"attack{i}", body))
            assert report.score("kl_term")[0] == 0, (what, report.cases)
            assert time.monotonic() - start < 120, what  # the daemon does not hold the grader
            outputs = " ".join(c.output for c in report.cases)
            assert "BEGIN ASSIGNMENT" not in outputs and "def equals_torch" not in outputs, what
            assert not sandbox_processes(), what
        again = grader.grade(kl_submission(tmp_path / "right2", KL_REFERENCE))
        assert again.score("kl_term") == (4, 4)  # nothing an attack did reached a later tree
        linked = tmp_path / "linked"
        linked.mkdir()
        (linked / "autoencoder.py").symlink_to(kit.ROOT / "tinyldm/autoencoder.py")
        report = grader.grade(linked)  # the submission is a link to the reference
        assert report.score("kl_term") == (0, 4) and "symbolic link" in report.notes["kl_term"]
    if os.geteuid() == 0 or sandbox.isolation() == "namespaces":
        assert not mark.exists()


@pytest.mark.slow
def test_an_endless_loop_is_stopped_from_outside_with_a_message(tmp_path):
    swallow = """while True:
    try:
        while True:
            pass
    except BaseException:
        pass"""
    report = kit.grade_submission(kl_submission(tmp_path / "loop", swallow), ["kl_term"],
                                  timeout=3, threads=1, quiet=True)
    assert report.score("kl_term") == (0, 4)
    assert all("ran past its 3 s limit" in c.output for c in report.cases)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["reaper", "user namespace"])
def test_other_isolation_levels_leave_no_process_behind(tmp_path, kind):
    """The reaper (machines without namespaces) and a user namespace (graders that are not root)
    kill a double-forked, setsid daemon at the end of the run."""
    if kind == "user namespace" and not sandbox._unshare_works("--user", "--map-root-user"):
        pytest.skip("no user namespaces here")
    pidfile = "/tmp/daemon.pid" if kind == "user namespace" else str(tmp_path / "daemon.pid")
    folder = kl_submission(tmp_path / "daemon", f"""import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        open("{pidfile}", "w").write(str(os.getpid()))
        time.sleep(600)
    os._exit(0)
time.sleep(0.5)
raise RuntimeError("daemon pid " + open("{pidfile}").read())""")
    tree = kit.library_tree(tmp_path / "lib", set())
    (tree / "tinyldm/autoencoder.py").write_text((folder / "autoencoder.py").read_text())
    options = ({"isolation": "reaper", "drop": False} if kind == "reaper" else
               {"isolation": "namespaces", "drop": False, "userns": True})
    child = sandbox.Child(tree, threads=1, **options)
    with pytest.raises(sandbox.ChildError, match="daemon pid") as error:
        child.call("kl_term", {"mean": torch.zeros(1, 1, 1, 1), "logvar": torch.zeros(1, 1, 1, 1)},
                   deadline=time.monotonic() + 60, limit=60)
    namespace = child.ns
    child.close()
    inner = int(str(error.value).split("daemon pid ")[1].split()[0])
    if kind == "reaper":  # the same PID namespace: the daemon's pid is ours to look up
        assert not os.path.exists(f"/proc/{inner}")
    else:
        assert namespace and not [p for p in sandbox._processes()
                                  if sandbox._ns_of(p) == namespace]


@pytest.mark.slow
def test_a_submission_graded_per_assignment_on_its_own(tmp_path):
    """A student copy with kl_term solved, vq_lookup stubbed, its visible cases edited, a pytest
    call as adaptive_weight's 'solution', a SyntaxError in classifier_free_guidance, ddim_step
    solved (same file), and code changed outside a region."""
    copy = kit.make_student_copy(tmp_path / "student")
    reference = {a.file: (kit.ROOT / a.file).read_text() for a in kit.ASSIGNMENTS.values()}

    def solve(name, body=None):
        a = kit.ASSIGNMENTS[name]
        text = (copy / a.file).read_text()
        (copy / a.file).write_text(kit.with_bodies(text, name, body or kit.bodies(
            reference[a.file], name)))

    solve("kl_term")
    (copy / kit.ASSIGNMENTS["vq_lookup"].tests[0]).write_text("def everything(run, g):\n    pass\n")
    solve("adaptive_weight", ["    pytest.skip('no')\n"])
    solve("ddim_step")
    solve("classifier_free_guidance", ["    return pred_u + guidance_scale * (pred_c - pred_u\n"])
    text = (copy / "tinyldm/autoencoder.py").read_text()
    (copy / "tinyldm/autoencoder.py").write_text(
        text.replace('"""Nearest-neighbour', '"""Changed. Nearest-neighbour'))
    names = ["kl_term", "vq_lookup", "adaptive_weight", "ddim_step", "classifier_free_guidance"]
    report = kit.grade_submission(copy, names, threads=1, quiet=True)
    scores = {n: report.score(n) for n in names}
    assert scores["kl_term"] == (4, 4) and scores["ddim_step"] == (4, 4)
    assert scores["vq_lookup"] == (0, 5) and "not implemented" in report.notes["vq_lookup"]
    assert scores["adaptive_weight"][0] == 0
    assert "pytest" in report.cases[[c.assignment for c in report.cases].index(
        "adaptive_weight")].output
    assert scores["classifier_free_guidance"][0] == 0
    assert "SyntaxError" in report.notes["classifier_free_guidance"]
    assert "changed outside its regions" in report.notes["kl_term"]


def test_a_missing_reference_library_stops_grading(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(SystemExit, match="grading needs diffusers"):
        kit.Grader(["ddim_step"])


@pytest.mark.slow
def test_the_self_check_gives_hints_and_no_reference_code(tmp_path, capsys):
    copy = kit.make_student_copy(tmp_path / "copy", ["kl_term"])
    results = subprocess.run([sys.executable, "-m", "tinyldm.course", "check", "kl_term"],
                             cwd=copy, capture_output=True, text=True, timeout=300)
    assert results.stdout.count("FAIL") == 2 and "hint:" in results.stdout
    assert "NotImplementedError" in results.stdout
    for line in KL_REFERENCE.splitlines():
        code = line.split("#")[0].strip()
        assert not code or code not in results.stdout
    main(["check", "kl_term"])  # the reference
    out = capsys.readouterr().out
    assert out.count("PASS") == 2 and "2/2 visible cases pass" in out


@pytest.mark.slow
def test_results_json_follows_the_schema_and_a_folder_of_submissions_gives_one_csv(tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    folder = tmp_path / "submissions"
    kl_submission(folder / "ada", KL_REFERENCE)
    kl_submission(folder / "bob", "return 0.5 * (self.mean.pow(2)).sum(dim=(1, 2, 3))")
    kl_submission(folder / "cy", "return (")
    (folder / "dee").symlink_to(folder / "ada")  # a linked folder is not a submission
    rows = grade_folder(folder, ["kl_term"], tmp_path / "grades.csv")
    table = list(csv.DictReader(open(tmp_path / "grades.csv")))
    assert [r["submission"] for r in table] == ["ada", "bob", "cy"]
    assert table[0]["kl_term"] == "4/4" and table[1]["kl_term"] != "4/4"
    assert table[2]["kl_term"] == "0/4" and "SyntaxError" in table[2]["notes"]
    assert rows[0]["total"] == 4
    main(["grade", "--submission", str(folder / "bob"), "--only", "kl_term",
          "--json", str(tmp_path / "r.json")])
    results = json.loads((tmp_path / "r.json").read_text())
    jsonschema.validate(results, kit.RESULTS_SCHEMA)
    assert len(results["tests"]) == 4
    assert results["score"] == sum(t["score"] for t in results["tests"])
    assert {t["visibility"] for t in results["tests"]} == {"visible", "after_published"}


@pytest.mark.slow
def test_the_autograder_bundle_writes_results_that_nothing_changes_afterwards(tmp_path):
    """Gradescope's flow, run locally: the submission leaves a daemon that waits for the grader to
    finish and then rewrites results.json. After run_autograder returns, nothing changes it."""
    jsonschema = pytest.importorskip("jsonschema")
    bundle = tmp_path / "bundle"
    archive = write_autograder(bundle, ["kl_term", "classifier_free_guidance"])
    assert archive.exists() and (bundle / "setup.sh").exists()
    assert os.access(bundle / "run_autograder", os.X_OK)
    assert (bundle / "source" / kit.HIDDEN).is_dir()
    home = tmp_path / "autograder"  # Gradescope's /autograder, laid out as it is
    (home / "submission").mkdir(parents=True)
    (home / "source").symlink_to(bundle / "source")
    results_path = home / "results" / "results.json"
    kl_submission(home / "submission", f"""import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        time.sleep(8)
        open("{results_path}", "w").write('{{"score": 1000}}')
    os._exit(0)
{KL_REFERENCE}""")
    env = {**os.environ, "AUTOGRADER_ROOT": str(home), "PYTHON": sys.executable}
    subprocess.run(["bash", str(bundle / "run_autograder")], env=env, check=True,
                   capture_output=True, timeout=600)
    written = results_path.read_text()
    results = json.loads(written)
    jsonschema.validate(results, json.loads((bundle / "results.schema.json").read_text()))
    by = {}
    for t in results["tests"]:
        by.setdefault(t["name"].split(":")[0], []).append(t["score"])
    assert by["kl_term"] == [1.0] * 4  # the daemon is not part of the answer
    assert set(by["classifier_free_guidance"]) == {0.0}  # ddim.py not submitted
    time.sleep(12)
    assert results_path.read_text() == written


def test_unshare_failing_on_its_own_at_start_is_retried_and_nothing_else_is(tmp_path, monkeypatch):
    """`unshare` sometimes fails before the child runs ("sigprocmask unblock failed", seen when
    graders start children from two threads): the start is retried, at most twice. A child that
    ends for any other reason is not retried."""
    from tinyldm.course import sandbox

    child = sandbox.Child(tmp_path, isolation="namespaces")
    tries = []

    def flaky(message, fails):
        def start():
            tries.append(1)
            if len(tries) <= fails:
                raise sandbox.ChildError(message)
        return start

    monkeypatch.setattr(child, "_start", flaky("the process ended (exit code 1): unshare: "
                                               "sigprocmask unblock failed: Invalid argument", 2))
    child.start()
    assert len(tries) == 3
    tries.clear()
    monkeypatch.setattr(child, "_start", flaky("the process ended (exit code 1): unshare: x", 3))
    with pytest.raises(sandbox.ChildError, match="unshare: x"):
        child.start()
    assert len(tries) == 3
    tries.clear()
    monkeypatch.setattr(child, "_start", flaky("the process ended (exit code 1): SyntaxError", 1))
    with pytest.raises(sandbox.ChildError, match="SyntaxError"):
        child.start()
    assert len(tries) == 1
