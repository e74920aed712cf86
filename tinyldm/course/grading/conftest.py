"""The grading tests' harness: a time limit per test, and a check that the code under test is the
grading tree's.

The grader runs these tests in a temporary copy of the instructor's project (TINYLDM_GRADING_TREE)
holding the student's lines in one assignment's regions; an installed tinyldm from elsewhere must
not be what they test.
"""

import os
import signal
from pathlib import Path

import pytest

import tinyldm


def pytest_configure(config):
    tree = os.environ.get("TINYLDM_GRADING_TREE")
    if tree and Path(tinyldm.__file__).resolve().parents[1] != Path(tree).resolve():
        raise pytest.UsageError(f"tinyldm was imported from {tinyldm.__file__}, not from the "
                                f"grading tree {tree}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    seconds = int(os.environ.get("TINYLDM_TEST_TIMEOUT", "120"))

    def out_of_time(signum, frame):
        raise TimeoutError(f"this test ran past its {seconds} s limit (an endless loop?)")

    previous = signal.signal(signal.SIGALRM, out_of_time)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
