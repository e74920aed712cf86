"""adaptive_weight, hidden: no reconstruction gradient, no weight."""

from tinyldm.course.grading.adaptive_weight import _inputs, _weight


def zero_when_the_reconstruction_loss_does_not_depend_on_the_layer(run, g):
    """L_rec = 0 x (...) has a zero gradient: lambda = 0; scaled up, lambda scales with it."""
    layer, x = _inputs(g)
    _weight(run, layer, x, 0.0, 1.0, 1e-4, 1e4)
    _weight(run, layer, x, 3.0, 1.0, 1e-4, 1e4)
