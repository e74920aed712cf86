"""Course kit: student copies with chosen pieces cut out, graded where no student code decides.

    python -m tinyldm.course list                       # the assignments and their tests
    python -m tinyldm.course student --out ../hw1 --only ddim_step classifier_free_guidance
    python -m tinyldm.course check ddim_step            # a student: the visible cases, with hints
    python -m tinyldm.course grade --submission ../hw1  # a student copy, or a folder of their files
    python -m tinyldm.course grade --submission ../hw1 --json results.json  # Gradescope's format
    python -m tinyldm.course grade --folder submissions/ --csv grades.csv
                                                        # one sub-folder per student
    python -m tinyldm.course autograder --out bundle/   # a Gradescope autograder (setup.sh, ...)
    python -m tinyldm.course mutants                    # the wrong answers and what they score

`kit.py` holds the assignments and the grader; `sandbox.py` the child process a student's code runs
in, `probe.py` what runs there (library calls on data); `grading/` the grading cases
(`grading/hidden/` never goes into a student copy); `mutants.py` the wrong answers that the kit's
own tests grade. docs/course.md is the instructor's guide.
"""

from tinyldm.course.kit import (
    ASSIGNMENTS,
    Assignment,
    grade_submission,
    make_student_copy,
    results_json,
)

__all__ = ["ASSIGNMENTS", "Assignment", "grade_submission", "make_student_copy", "results_json"]
