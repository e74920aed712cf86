"""The course kit: marked regions, student copies that hand out no code, and a grader a student
cannot steer: pristine tests in a tree the grader owns, only passes count, timeouts, one broken
region costs only its own assignment, and every plausible wrong answer in `mutants.py` loses points
while the reference keeps them all."""

import ast
import csv
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from tinyldm.course import kit
from tinyldm.course.__main__ import grade_folder, main, write_autograder
from tinyldm.course.mutants import MUTANTS

pytestmark = pytest.mark.slow  # grades submissions in subprocesses, every mutant included

pytest.importorskip("diffusers",
                    reason="the ddim_step grading compares against it: pip install -e '.[dev]'")


def test_every_assignment_is_marked_and_has_three_tests_and_mutants():
    for a in kit.ASSIGNMENTS.values():
        text = (kit.ROOT / a.file).read_text()
        mine = [r for r in kit.regions(text) if r[0] == a.name]
        # solution lines between markers
        assert mine and all(last > first + 1 for _, first, last, _ in mine)
        stubbed = kit.stub(text, {a.name})
        ast.parse(stubbed)  # still valid Python
        # the markers stay
        assert [r[0] for r in kit.regions(stubbed)] == [r[0] for r in kit.regions(text)]
        assert stubbed.count(f"assignment {a.name}: ") == len(mine)
        assert kit.stub(text, set()) == text
        assert all((kit.ROOT / f).exists() for f in a.tests)
        assert len(MUTANTS[a.name]) >= 3
    assert set(MUTANTS) == set(kit.ASSIGNMENTS)


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
            assert not (out / rel).exists(), rel  # instructor only (hidden tests, mutants)
            continue
        same = (kit.ROOT / rel).read_bytes() == (out / rel).read_bytes()
        assert same == (rel not in changed), rel
    # No line of a reference solution is left anywhere in its file.
    for a in kit.ASSIGNMENTS.values():
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
    # No git there: the file-walk fallback.
    again = kit.make_student_copy(tmp_path / "from-a-copy", root=out)
    assert (again / "tinyldm/ddim.py").exists() and not (again / ".git").exists()


def test_check_solution_refuses_what_reaches_the_test_process():
    assert kit.check_solution("    return x + 1\n") is None
    assert "SyntaxError" in kit.check_solution("    return 0.5 * (\n")
    for bad in ["    pytest.skip()\n", "    import os\n", "    __import__('pytest').skip()\n",
                "    open('/tmp/x', 'w')\n", "    sys.exit(0)\n", "    x.__class__\n"]:
        assert kit.check_solution(bad), bad


def _full_marks(report):
    return all(c.passed for c in report.cases) and report.cases


def test_a_submission_the_student_tried_to_steer(tmp_path):
    """A student copy with kl_term solved, vq_lookup stubbed, a visible test edited to
    `assert True`, pytest.skip() as the 'solution' of adaptive_weight, a SyntaxError in
    classifier_free_guidance, ddim_step solved (same file), and code changed outside a region: each
    is graded on its own, by the instructor's tests."""
    copy = kit.make_student_copy(tmp_path / "student")
    reference = {a.file: (kit.ROOT / a.file).read_text() for a in kit.ASSIGNMENTS.values()}

    def solve(name, body=None):
        a = kit.ASSIGNMENTS[name]
        text = (copy / a.file).read_text()
        body = body or kit.bodies(reference[a.file], name)
        (copy / a.file).write_text(kit.with_bodies(text, name, body))

    solve("kl_term")
    visible_test = copy / kit.ASSIGNMENTS["vq_lookup"].tests[0]
    visible_test.write_text("def test_nothing():\n    assert True\n")
    solve("adaptive_weight", ["    pytest.skip('no')\n"])
    solve("ddim_step")
    solve("classifier_free_guidance", ["    return pred_u + guidance_scale * (pred_c - pred_u\n"])
    text = (copy / "tinyldm/autoencoder.py").read_text()
    changed = text.replace('"""Nearest-neighbour', '"""Changed. Nearest-neighbour')
    (copy / "tinyldm/autoencoder.py").write_text(changed)
    names = ["kl_term", "vq_lookup", "adaptive_weight", "ddim_step", "classifier_free_guidance"]
    report = kit.grade_submission(copy, names, quiet=True)
    scores = {n: report.score(n) for n in names}
    assert scores["kl_term"][0] == scores["kl_term"][1] == 4
    # The broken region beside it costs nothing.
    assert scores["ddim_step"][0] == scores["ddim_step"][1] == 4
    # The edited test is ignored.
    assert scores["vq_lookup"] == (0, 4) and "not implemented" in report.notes["vq_lookup"]
    assert scores["adaptive_weight"][0] == 0
    assert "'pytest' is not allowed" in report.notes["adaptive_weight"]
    assert scores["classifier_free_guidance"][0] == 0
    assert "SyntaxError" in report.notes["classifier_free_guidance"]
    assert "changed outside its regions" in report.notes["kl_term"]


def test_only_a_pass_earns_a_point(tmp_path):
    """Skipped, xfailed, failed and never-run tests all score 0 (the report parser, on a tree of its
    own)."""
    tree = tmp_path / "tree"
    (tree / "t").mkdir(parents=True)
    (tree / "t" / "test_x.py").write_text(
        "import pytest\n"
        "def test_pass():\n    pass\n"
        "def test_skip():\n    pytest.skip('x')\n"
        "@pytest.mark.xfail\ndef test_xfail():\n    assert False\n"
        "def test_fail():\n    assert False\n")
    nodes = [f"t/test_x.py::test_{n}" for n in ("pass", "skip", "xfail", "fail", "missing")]
    out = kit._run_cases(tree, nodes, timeout=30, grace=30, threads=1, stop_early=False)
    assert {n.split("_")[-1]: ok for n, (ok, _) in out.items()} == {
        "pass": True, "skip": False, "xfail": False, "fail": False, "missing": False}


def test_an_endless_loop_times_out_with_a_message(tmp_path):
    folder = tmp_path / "loop"
    folder.mkdir()
    text = (kit.ROOT / "tinyldm/autoencoder.py").read_text()
    loop = "        while True:\n            pass\n"
    (folder / "autoencoder.py").write_text(kit.with_bodies(text, "kl_term", [loop]))
    report = kit.grade_submission(folder, ["kl_term"], timeout=3, grace=5, quiet=True)
    assert report.score("kl_term") == (0, 4)
    assert all("ran past its 3 s limit" in c.output for c in report.cases)
    # a loop that swallows the time limit's exception is stopped from outside
    swallow = ("        while True:\n"
               "            try:\n"
               "                while True:\n"
               "                    pass\n"
               "            except BaseException:\n"
               "                pass\n")
    (folder / "autoencoder.py").write_text(kit.with_bodies(text, "kl_term", [swallow]))
    report = kit.grade_submission(folder, ["kl_term"], timeout=2, grace=3, quiet=True)
    assert report.score("kl_term") == (0, 4)
    assert all("stopped after" in c.output for c in report.cases)


def test_a_missing_reference_library_stops_grading(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(SystemExit, match="grading needs diffusers"):
        kit.Grader(["ddim_step"])


def test_results_json_follows_the_schema_and_a_folder_of_submissions_gives_one_csv(tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    folder = tmp_path / "submissions"
    text = (kit.ROOT / "tinyldm/autoencoder.py").read_text()
    wrong = ["        return 0.5 * (self.mean.pow(2)).sum(dim=(1, 2, 3))\n"]
    for student, body in [("ada", None), ("bob", wrong), ("cy", ["        return (\n"])]:
        (folder / student).mkdir(parents=True)
        submitted = kit.with_bodies(text, "kl_term", body) if body else text
        (folder / student / "autoencoder.py").write_text(submitted)
    rows = grade_folder(folder, ["kl_term"], tmp_path / "grades.csv")
    table = list(csv.DictReader(open(tmp_path / "grades.csv")))
    assert [r["submission"] for r in table] == ["ada", "bob", "cy"]
    assert [r["kl_term"] for r in table][0] == "4/4"
    assert table[1]["kl_term"] != "4/4" and table[2]["kl_term"] == "0/4"
    assert "SyntaxError" in table[2]["notes"]
    assert rows[0]["total"] == 4
    main(["grade", "--submission", str(folder / "bob"), "--only", "kl_term",
          "--json", str(tmp_path / "r.json")])
    results = json.loads((tmp_path / "r.json").read_text())
    jsonschema.validate(results, kit.RESULTS_SCHEMA)
    assert len(results["tests"]) == 4
    assert results["score"] == sum(t["score"] for t in results["tests"])
    # hidden tests too
    assert {t["visibility"] for t in results["tests"]} == {"visible", "after_published"}


def test_the_autograder_bundle_grades_a_submission_as_gradescope_would(tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    bundle = tmp_path / "bundle"
    archive = write_autograder(bundle, ["kl_term", "classifier_free_guidance"])
    assert archive.exists() and (bundle / "setup.sh").exists()
    assert os.access(bundle / "run_autograder", os.X_OK)
    assert (bundle / "source" / kit.HIDDEN).is_dir()
    home = tmp_path / "autograder"  # Gradescope's /autograder, laid out as it is
    (home / "submission").mkdir(parents=True)
    (home / "source").symlink_to(bundle / "source")
    submitted = (kit.ROOT / "tinyldm/autoencoder.py").read_text()
    (home / "submission" / "autoencoder.py").write_text(submitted)
    env = {**os.environ, "AUTOGRADER_ROOT": str(home), "PYTHON": sys.executable}
    subprocess.run(["bash", str(bundle / "run_autograder")], env=env, check=True,
                   capture_output=True)
    results = json.loads((home / "results" / "results.json").read_text())
    jsonschema.validate(results, json.loads((bundle / "results.schema.json").read_text()))
    by = {}
    for t in results["tests"]:
        by.setdefault(t["name"].split(":")[0], []).append(t["score"])
    # ddim.py not submitted
    assert by["kl_term"] == [1.0] * 4 and set(by["classifier_free_guidance"]) == {0.0}


def test_the_reference_scores_full_marks_and_every_wrong_answer_loses_points(tmp_path):
    """Every mutant in mutants.py, graded as a submission by the same grader (two graders in
    parallel, stopping at an assignment's first failed test): below full marks; the reference
    itself: full marks."""
    jobs = kit.mutant_submissions(tmp_path)
    half = [jobs[0::2], jobs[1::2]]

    def run(part):
        with kit.Grader(threads=1, stop_early=True, quiet=True) as grader:
            return [(name, label, grader.grade(folder, only=[name]).score(name))
                    for name, label, folder in part]

    with ThreadPoolExecutor(2) as pool:
        results = [r for part in pool.map(run, half) for r in part]
    wrong = [(n, label, s) for n, label, s in results
             if (label == "(the reference)") != (s[0] == s[1])]
    assert not wrong, wrong
    assert len(results) == sum(len(m) + 1 for m in MUTANTS.values())
