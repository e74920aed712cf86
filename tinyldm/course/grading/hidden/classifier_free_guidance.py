"""classifier_free_guidance, hidden: a scale above one extrapolates away from the unconditional
prediction."""

from tinyldm.course.grading import close
from tinyldm.course.grading.classifier_free_guidance import _guided


def scale_two_extrapolates(run, g):
    """At s = 2 the guided prediction is 2 pred_c - pred_u."""
    got, pred_u, pred_c = _guided(run, g, 2.0)
    close(got, 2 * pred_c - pred_u, "the prediction at scale 2", atol=1e-5)


def scale_one_is_the_conditional_model(run, g):
    """At s = 1 the guided prediction is pred_c, and at s = 0 it is pred_u."""
    got, _, pred_c = _guided(run, g, 1.0)
    close(got, pred_c, "the prediction at scale 1", atol=1e-5)
    got, pred_u, _ = _guided(run, g, 0.0)
    close(got, pred_u, "the prediction at scale 0", atol=1e-5)
