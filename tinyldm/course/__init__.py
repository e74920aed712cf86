"""Course kit: student copies with chosen pieces cut out, graded in a tree the instructor owns.

    python -m tinyldm.course list                       # the assignments and their tests
    python -m tinyldm.course student --out ../hw1 --only ddim_step classifier_free_guidance
    python -m tinyldm.course grade --submission ../hw1  # a student copy, or a folder of their files
    python -m tinyldm.course grade --submission ../hw1 --json results.json  # Gradescope's format
    python -m tinyldm.course grade --folder submissions/ --csv grades.csv
                                                        # one sub-folder per student
    python -m tinyldm.course autograder --out bundle/   # a Gradescope autograder (setup.sh, ...)
    python -m tinyldm.course mutants                    # the wrong answers and what they score

`kit.py` holds the assignments and the grader, `mutants.py` the plausible wrong answers that the
kit's own tests grade, `grading/` the grading tests (`grading/hidden/` never goes into a student
copy). docs/course.md is the instructor's guide.
"""

from tinyldm.course.kit import (
    ASSIGNMENTS,
    Assignment,
    grade_submission,
    make_student_copy,
    results_json,
)

__all__ = ["ASSIGNMENTS", "Assignment", "grade_submission", "make_student_copy", "results_json"]
