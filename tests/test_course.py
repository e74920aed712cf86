"""The course kit: every assignment's region is marked, stubbing is the only change, the untouched library
scores full marks, and a copy with one assignment stubbed fails that assignment's tests and no other's."""

import ast

import pytest

from tinyldm.tools import course


def test_every_assignment_is_marked_in_its_file():
    for a in course.ASSIGNMENTS.values():
        text = (course.ROOT / a.file).read_text()
        mine = [r for r in course.regions(text) if r[0] == a.name]
        assert mine and all(last > first + 1 for _, first, last, _ in mine)  # solution lines between markers
        stubbed = course.stub(text, {a.name})
        ast.parse(stubbed)  # still valid Python
        assert f"assignment {a.name}: " in stubbed and stubbed.count("NotImplementedError") == \
            text.count("NotImplementedError") + len(mine)
        assert course.stub(text, set()) == text  # nothing chosen: nothing changes


def test_markers_must_pair():
    with pytest.raises(ValueError, match="has no END"):
        course.regions("# BEGIN ASSIGNMENT x\ny = 1\n")
    with pytest.raises(ValueError, match="without its BEGIN"):
        course.regions("y = 1\n# END ASSIGNMENT x\n")


def test_student_copy_changes_only_the_regions(tmp_path):
    out = course.make_student_copy(tmp_path / "copy", ["kl_term"])
    for rel in course.tracked_files(course.ROOT):
        original, copied = (course.ROOT / rel).read_bytes(), (out / rel).read_bytes()
        assert (original == copied) == (rel != "tinyldm/autoencoder.py"), rel
    assert "kl_term" in (out / "ASSIGNMENTS.md").read_text()
    with pytest.raises(SystemExit, match="not empty"):
        course.make_student_copy(out, ["kl_term"])
    with pytest.raises(SystemExit, match="unknown assignments"):
        course.make_student_copy(tmp_path / "other", ["backprop"])


def test_grading_full_marks_and_each_stub_fails_only_itself(tmp_path):
    scores = course.grade()
    assert all(ok == total for ok, total in scores.values()), scores
    for name in course.ASSIGNMENTS:
        copy = course.make_student_copy(tmp_path / name, [name])
        scores = course.grade(root=copy)
        assert scores[name][0] == 0, (name, scores)  # every one of its own tests fails
        others = {n: s for n, s in scores.items() if n != name}
        assert all(ok == total for ok, total in others.values()), (name, others)
