"""Speed paths: the same computations as the readable code, arranged to run faster on a GPU.

* `graphed_sampler`: `tinyldm.ddim.ddim_sample`'s whole loop recorded once as one CUDA graph and
  replayed. A small UNet is launch-bound (each of its few hundred kernels per step costs more to
  launch from Python than to run), so replaying the recorded launches is several times faster than
  the loop itself.
* `torch.compile` needs nothing here: the scripts call `model.compile()` in place (`--compile`), so
  the state_dict keys, and with them the checkpoints, stay the same.

Each path is tested against the plain code it replaces (tests/test_bench.py; the CUDA cases need a
GPU).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from tinyldm.ddim import ModelFn, ddim_sample
from tinyldm.schedule import NoiseSchedule


def graphed_sampler(model: ModelFn, schedule: NoiseSchedule, x_T: Tensor,
                    **sample_options) -> Callable[[Tensor], Tensor]:
    """`ddim_sample(model, schedule, x, **sample_options)` as a function of x whose whole loop is
    one CUDA graph.

    A small UNet is launch-bound: 50 steps x a few hundred kernels each cost more in CPU launch
    overhead than in GPU work. Recording the loop once (`torch.cuda.graph`) and replaying it
    launches everything at once. What the recording fixes: the shape of `x_T`, the steps, and the
    condition tensors in `sample_options` (read from their memory at every replay). Only
    deterministic DDIM (eta = 0) is recorded, since fresh noise would need the generator's state
    inside the graph. Autocast is read once, at recording: the replays run in the precision the
    caller had then. On a CPU there is nothing to record: the returned function is `ddim_sample`.
    """
    if x_T.device.type != "cuda":
        return lambda x: ddim_sample(model, schedule, x, **sample_options)
    if sample_options.get("eta", 0.0) != 0:
        raise ValueError("graphed_sampler records deterministic DDIM only (eta=0)")
    if sample_options.get("callback") is not None:
        raise ValueError("a recorded loop cannot call back into Python: drop `callback`")
    static_x = x_T.clone()
    # Autocast keeps bf16 copies of the weights in a cache that is emptied when the caller's
    # `with autocast` ends; a graph that read them would replay from freed memory. Record with the
    # same autocast settings but no cache, so the casts themselves are part of the graph.
    recording_autocast = torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"),
                                        enabled=torch.is_autocast_enabled("cuda"),
                                        cache_enabled=False)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    # Warm-up off the recording: lazy initialisation, kernel selection.
    with torch.cuda.stream(side), recording_autocast:
        ddim_sample(model, schedule, static_x, **sample_options)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), recording_autocast:
        static_out = ddim_sample(model, schedule, static_x, **sample_options)

    def run(x: Tensor) -> Tensor:
        if x.shape != static_x.shape:
            raise ValueError(f"the graph was recorded for x_T of shape {tuple(static_x.shape)}, "
                             f"got {tuple(x.shape)}")
        static_x.copy_(x)
        graph.replay()
        return static_out.clone()

    return run
