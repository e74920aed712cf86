"""tinyldm/training/loop.py: the per-step seed streams and the warm-up, which exact resume depends on; the log."""

import json
import sys

import pytest
import torch

from tinyldm.training.loop import JSONLLogger, seed_stream, warmup_lr


def test_seed_streams_are_functions_of_seed_and_step_and_never_meet():
    seeds = {(stream, seed, step): seed_stream(seed, step, stream)
             for stream in range(4) for seed in range(3) for step in range(0, 100_000, 997)}
    assert len(set(seeds.values())) == len(seeds)  # no two (stream, seed, step) share a generator seed
    assert seed_stream(7, 12, 1) == 2**40 + 7 * 1_000_003 + 12  # the values the scripts have always used
    assert seed_stream(7, 12, 2) == 2**41 + 7 * 1_000_003 + 12
    assert seed_stream(7, 12) == 7 * 1_000_003 + 12
    draw = lambda s: torch.randn(4, generator=torch.Generator().manual_seed(s))  # noqa: E731
    assert torch.equal(draw(seed_stream(3, 5, 1)), draw(seed_stream(3, 5, 1)))  # same step: same draws


def test_warmup_is_linear_then_constant():
    lrs = [warmup_lr(step, 1e-3, 4) for step in range(6)]
    assert lrs == [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3]
    assert warmup_lr(0, 1e-3, 0) == 1e-3  # no warm-up


def test_tensorboard_mirrors_the_log_and_forgets_what_a_resume_replaces(tmp_path):
    """--tensorboard: every number of log.jsonl is a scalar at its step; a resumed run purges the events written
    after its checkpoint, like the JSONL log drops those lines."""
    pytest.importorskip("tensorboard")
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = JSONLLogger(tmp_path / "log.jsonl", tensorboard=tmp_path / "tb")
    for step in (1, 2, 3):
        log.log(step=step, loss=1.0 / step, lr=1e-3)
    Image.new("RGB", (6, 4), (255, 0, 0)).save(tmp_path / "grid.png")
    log.image("samples", tmp_path / "grid.png", 3)
    log.close()
    log = JSONLLogger(tmp_path / "log.jsonl", resume_step=2, tensorboard=tmp_path / "tb")  # resumed at step 2
    log.log(step=3, loss=0.25, lr=1e-3)
    log.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert {"loss", "lr"} <= set(events.Tags()["scalars"]) and events.Tags()["images"] == ["samples"]
    assert [(e.step, round(e.value, 4)) for e in events.Scalars("loss")] == [(1, 1.0), (2, 0.5), (3, 0.25)]
    assert [json.loads(line)["loss"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [1.0, 0.5, 0.25]


def test_tensorboard_without_its_package_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(SystemExit, match=r"pip install 'tinyldm\[tensorboard\]'"):
        JSONLLogger(tmp_path / "log.jsonl", tensorboard=tmp_path / "tb")
