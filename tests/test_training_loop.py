"""tinyldm/training and tinyldm/data/order.py: the per-step seed streams and the learning-rate
schedule, which exact resume depends on; the log."""

import json
import sys
from dataclasses import replace

import pytest
import torch

from tinyldm.data.order import Stream, seed_stream
from tinyldm.training.loop import JSONLLogger
from tinyldm.training.trainer import TrainingConfig, lr_at


def test_seed_streams_are_functions_of_seed_and_step_and_never_meet():
    seeds = {(stream, seed, step): seed_stream(seed, step, stream)
             for stream in Stream for seed in range(3) for step in range(0, 100_000, 997)}
    # no two (stream, seed, step) share a generator seed
    assert len(set(seeds.values())) == len(seeds)
    # the values the scripts have always used (before the streams had names)
    assert [int(s) for s in Stream] == [0, 1, 2, 3]
    assert seed_stream(7, 12, Stream.NOISE) == 2**40 + 7 * 1_000_003 + 12
    assert seed_stream(7, 12, Stream.DROP) == 2**41 + 7 * 1_000_003 + 12
    assert seed_stream(7, 12, Stream.MASK) == 7 * 1_000_003 + 12
    draw = lambda s: torch.randn(4, generator=torch.Generator().manual_seed(s))  # noqa: E731
    # same step: same draws
    assert torch.equal(draw(seed_stream(3, 5, Stream.NOISE)), draw(seed_stream(3, 5, Stream.NOISE)))


def test_named_streams_are_distinct_and_never_meet_for_any_seed_and_step_in_range():
    """Closed form: seed_stream(seed, step, s) = 2**40 s + offset(seed, step) with 0 <= offset <
    2**40 for seed < 2**20 and step < 2**30, so two streams' seeds lie in disjoint intervals."""
    values = [int(s) for s in Stream]
    assert len(set(values)) == len(values) == len(Stream.__members__)
    g = torch.Generator().manual_seed(0)
    seeds = [0, 2**20 - 1, *torch.randint(0, 2**20, (20,), generator=g).tolist()]
    steps = [0, 2**30 - 1, *torch.randint(0, 2**30, (20,), generator=g).tolist()]
    for stream in Stream:
        for seed in seeds:
            for step in steps:  # an affine function of seed and step, 2**40 per stream
                offset = seed_stream(seed, step, stream) - 2**40 * int(stream)
                assert offset == seed * 1_000_003 + step
    # the offset grows with seed and step, so its range is [offset(0, 0), offset(max, max)]
    assert seed_stream(0, 0, Stream.MASK) == 0
    assert seed_stream(2**20 - 1, 2**30 - 1, Stream.MASK) < 2**40


def test_warmup_is_linear_then_constant_or_a_cosine_to_the_floor():
    config = TrainingConfig(lr=1e-3, warmup_steps=4, steps=14)
    lrs = [lr_at(step, config) for step in range(6)]
    assert lrs == [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3]
    assert lr_at(0, replace(config, warmup_steps=0)) == 1e-3  # no warm-up
    assert lr_at(3, config, 2e-3) == 2e-3  # another optimizer's base rate (the discriminator's)
    cosine = replace(config, lr_schedule="cosine", lr_min_ratio=0.1)
    # Half-way through the decay (step 4 + 5 of 10): the mean of lr and the floor; at the end, the
    # floor.
    assert (lr_at(9, cosine) == pytest.approx(0.5 * (1e-3 + 1e-4))
            and lr_at(14, cosine) == pytest.approx(1e-4))
    assert lr_at(3, cosine) == 1e-3 and lr_at(4, cosine) == pytest.approx(1e-3)


def test_tensorboard_mirrors_the_log_and_forgets_what_a_resume_replaces(tmp_path):
    """--tensorboard: every number of log.jsonl is a scalar at its step; a resumed run purges the
    events written after its checkpoint, like the JSONL log drops those lines."""
    pytest.importorskip("tensorboard")
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = JSONLLogger(tmp_path / "log.jsonl", tensorboard=tmp_path / "tb")
    for step in (1, 2, 3):
        log.log(step=step, loss=1.0 / step, lr=1e-3)
    Image.new("RGB", (6, 4), (255, 0, 0)).save(tmp_path / "grid.png")
    log.image("samples", tmp_path / "grid.png", 3)
    log.close()
    # resumed at step 2
    log = JSONLLogger(tmp_path / "log.jsonl", resume_step=2, tensorboard=tmp_path / "tb")
    log.log(step=3, loss=0.25, lr=1e-3)
    log.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert ({"loss", "lr"} <= set(events.Tags()["scalars"])
            and events.Tags()["images"] == ["samples"])
    assert ([(e.step, round(e.value, 4)) for e in events.Scalars("loss")]
            == [(1, 1.0), (2, 0.5), (3, 0.25)])
    assert [json.loads(line)["loss"]
            for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [1.0, 0.5, 0.25]


def test_tensorboard_without_its_package_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(SystemExit, match=r"pip install 'tinyldm\[tensorboard\]'"):
        JSONLLogger(tmp_path / "log.jsonl", tensorboard=tmp_path / "tb")
