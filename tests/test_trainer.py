"""tinyldm/training/trainer.py on a toy problem: the loop both scripts run (learning rate, EMA, log
windows, grids, checkpoints, a loss that turns NaN, the time budget), in a fraction of a second."""

import json
import math

import pytest
import torch

from tinyldm.cli import UsageError
from tinyldm.training.loop import EMA
from tinyldm.training.trainer import Checkpoints, Grids, Trainer, TrainingConfig, lr_at


def toy(tmp_path, **fields):
    """A linear model fitted to y = 3x with SGD, and a Trainer around it (one process, CPU)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(1, 1, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    config = TrainingConfig(**{"batch_size": 8, "steps": 12, "lr": 0.1, "log_every": 4,
                               "sample_every": 6, "ckpt_every": 5, **fields})
    ema = EMA(model, decay=0.5)
    trainer = Trainer(config, model, ema, {opt: config.lr}, tmp_path)
    lrs, losses = [], []

    def step(i):
        lrs.append(opt.param_groups[0]["lr"])
        x = torch.randn(config.batch_size, 1, generator=torch.Generator().manual_seed(i))
        loss = (model(x) - 3 * x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        return {"loss": loss.detach()}

    return trainer, model, ema, step, lrs, losses


def run(trainer, train_step, *, start, save, sample=None):
    """trainer.run with the callbacks a script adds: checkpoints through `save`, and grids through
    `sample` every `sample_every` steps."""
    argv = ["--steps", "12"]
    trainer.callbacks = [Checkpoints(trainer.out / "toy.pt", save, "train_toy.py", argv)]
    if sample is not None:
        trainer.add_callback(Grids(sample, trainer.config.sample_every))
    return trainer.run(train_step, start=start)


def test_the_loop_sets_the_rate_averages_the_log_window_and_keeps_the_cadences(tmp_path):
    trainer, model, ema, step, lrs, losses = toy(tmp_path, warmup_steps=2)
    saved, grids = [], []

    def sample(i):
        grids.append(i)
        path = tmp_path / f"grid_{i}.png"
        from tinyldm.evaluation.viz import save_image_grid
        return save_image_grid(torch.zeros(1, 3, 4, 4), path, nrow=1)

    done = run(trainer, step, start=0, save=saved.append, sample=sample)
    assert done == 12 and lrs == [lr_at(i, trainer.config) for i in range(12)]
    assert lrs[:3] == [0.05, 0.1, 0.1]
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [4, 8, 12]
    for r, window in zip(records, (losses[0:4], losses[4:8], losses[8:12]), strict=True):
        assert r["loss"] == pytest.approx(sum(window) / 4, rel=1e-6)  # the window's mean
    assert records[-1]["lr"] == 0.1 and all(r["img_per_s"] > 0 for r in records)
    # checkpoints every 5 steps but never at the end (the script writes that one); grids every 6,
    # not at the last step either (the script draws it)
    assert saved == [5, 10] and grids == [6]
    assert not (tmp_path / "loss.png").exists()  # one record at step 6: no curve yet
    Grids(sample, 6).now(trainer)  # what the scripts do after the loop
    assert grids == [6, 12] and (tmp_path / "loss.png").exists()
    assert ema.num_updates == 12 and not torch.equal(ema.model.weight, model.weight)
    assert abs(model.weight.item() - 3) < abs(0.0 - 3)  # it learned something


def test_a_loss_that_turns_nan_stops_before_the_next_checkpoint(tmp_path):
    trainer, model, ema, step, lrs, losses = toy(tmp_path, log_every=10, ckpt_every=5)
    saved = []

    def poisoned(i):
        logs = step(i)
        return {"loss": logs["loss"] * math.nan} if i == 7 else logs

    # the window since the last log record holds the bad step
    with pytest.raises(UsageError, match=r"loss is nan in steps 1-10: stopping"):
        run(trainer, poisoned, start=0, save=saved.append)
    assert saved == [5]  # step 10's checkpoint, which would hold blown-up weights, is not written


def test_the_time_budget_checkpoints_and_returns_early(tmp_path):
    trainer, model, ema, step, lrs, losses = toy(tmp_path, steps=1000, max_minutes=1e-9,
                                                 ckpt_every=500)
    saved = []
    done = run(trainer, step, start=0, save=saved.append)
    assert done == 1 and saved == [1]


def test_a_finished_run_does_nothing_and_a_resumed_one_continues_the_schedule(tmp_path, capsys):
    trainer, model, ema, step, lrs, losses = toy(tmp_path, warmup_steps=20, steps=12)
    assert run(trainer, step, start=12, save=lambda i: None) == 12 and not lrs
    assert "already trained for 12 steps" in capsys.readouterr().out
    run(trainer, step, start=7, save=lambda i: None)
    assert lrs == [lr_at(i, trainer.config) for i in range(7, 12)]  # the warm-up where it was


def test_a_loss_that_diverges_stops_before_the_next_checkpoint(tmp_path):
    """With `diverge`, a logged loss above its first window and 10x its best stops the run in one
    line; the checkpoint written before it is the last one. A loss that only wobbles does not."""
    trainer, model, ema, step, lrs, losses = toy(tmp_path, steps=40, log_every=4, ckpt_every=6)
    trainer.diverge = 10.0
    saved = []

    def exploding(i):  # from step 26 on, 100x what the untrained model's first steps had
        logs = step(i)
        return {"loss": torch.tensor(100 * max(losses[:4])) if i >= 25 else logs["loss"]}

    with pytest.raises(UsageError, match=r"loss diverged: .* in steps 25-28, above its first"):
        run(trainer, exploding, start=0, save=saved.append)
    assert saved == [6, 12, 18, 24]  # nothing after the loss blew up
    trainer, model, ema, step, lrs, losses = toy(tmp_path / "b", steps=40, log_every=4)
    trainer.diverge = 10.0
    g = torch.Generator().manual_seed(0)

    def wobbling(i):  # settles near 0, then noise of up to 5x its level: no stop
        return {"loss": torch.tensor(1.0 / (1 + i) + 0.05 * float(torch.rand(1, generator=g)) * 5)}

    assert run(trainer, wobbling, start=0, save=lambda i: None) == 40


def test_a_non_finite_loss_under_bf16_names_the_autocast(tmp_path):
    trainer, model, ema, step, lrs, losses = toy(tmp_path, amp=True, log_every=2)
    trainer.device = torch.device("cuda")  # what --amp acts on; the toy still runs on the CPU
    trainer.autocast = lambda: torch.autocast("cpu", enabled=False)
    with pytest.raises(UsageError, match=r"under bf16 autocast: .*\(--amp false to check\)"):
        run(trainer, lambda i: {"loss": torch.tensor(math.inf)}, start=0, save=lambda i: None)


def test_callbacks_hear_each_event_at_its_step_and_nothing_else(tmp_path):
    """A callback gets only the events it has a method for: on_step_end after every step but the
    last (the script draws the last grid itself), on_checkpoint every ckpt_every steps and not at
    the end (the script writes the last checkpoint). An object with no such method is never
    called."""
    trainer, model, ema, step, lrs, losses = toy(tmp_path, steps=12, ckpt_every=5)
    heard = []

    class Listener:
        def on_step_end(self, t):
            heard.append(("step", t.step))

        def on_checkpoint(self, t):
            heard.append(("checkpoint", t.step))

    trainer.add_callback(Listener())
    trainer.add_callback(object())  # hears nothing, breaks nothing
    assert trainer.run(step, start=0) == 12
    assert [s for e, s in heard if e == "step"] == list(range(1, 12))
    assert [s for e, s in heard if e == "checkpoint"] == [5, 10]
    # the checkpoint of a step comes after that step's grids and quality points
    assert heard.index(("checkpoint", 5)) == heard.index(("step", 5)) + 1
