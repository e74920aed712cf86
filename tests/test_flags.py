"""tinyldm/training/flags.py: every choice-valued flag of train_ae.py, train_ldm.py and sample.py
refuses a typo in one line that names the flag, the typo and every allowed value, before any work;
every value the table allows is one the code accepts."""

import argparse
import contextlib
import dataclasses
import time
from unittest import mock

import pytest
import torch

import sample
import train_ae
import train_ldm
from tinyldm.cli import run
from tinyldm.ldm import LOSSES, DiffusionConfig, ldm_loss
from tinyldm.training.flags import CHOICES, add_config_args, build_config, check_values
from tinyldm.training.run_lock import RunLock
from tinyldm.training.trainer import LR_SCHEDULES, TrainingConfig, lr_at

SCRIPTS = {"train_ae.py": train_ae, "train_ldm.py": train_ldm, "sample.py": sample}
FREE_TEXT: set[str] = set()  # config text fields that take any value (none so far)
# What a value needs besides itself to make a valid config: the identity first stage has z = x.
NEEDS = {("regularizer", "identity"): {"z_channels": 3, "channel_mult": (1,)}}


class _Parsed(Exception):
    """Raised in place of parsing, carrying the parser a script's `parse_args` built."""


def script_flags(module) -> tuple[argparse.ArgumentParser, tuple[type, ...]]:
    """The parser `module.parse_args` builds, and the config classes it turns into flags."""
    classes: list[type] = []

    def recording(parser, *config_classes):
        classes.extend(config_classes)
        add_config_args(parser, *config_classes)

    def stop(parser, *args, **kwargs):
        raise _Parsed(parser)

    with contextlib.ExitStack() as patches:
        patches.enter_context(mock.patch.object(argparse.ArgumentParser, "parse_args", stop))
        if hasattr(module, "add_config_args"):  # sample.py has no config dataclass
            patches.enter_context(mock.patch.object(module, "add_config_args", recording))
        try:
            module.parse_args([])
        except _Parsed as parsed:
            return parsed.args[0], tuple(classes)
    raise AssertionError(f"{module.__name__}.parse_args parsed nothing")


PARSERS = {name: script_flags(module) for name, module in SCRIPTS.items()}


def choice_flags(parser: argparse.ArgumentParser) -> dict[str, tuple[str, ...]]:
    """flag -> allowed values: argparse's `choices=` and the config fields in `CHOICES`."""
    flags = {}
    for action in parser._actions:
        if action.option_strings and action.choices is not None:
            flags[action.dest] = tuple(action.choices)
        elif action.dest in CHOICES:
            flags[action.dest] = CHOICES[action.dest]
    return flags


CASES = [(script, flag, allowed) for script, (parser, _) in PARSERS.items()
         for flag, allowed in choice_flags(parser).items()]


def typo(value: str) -> str:
    """The value with its last two letters swapped, and an extra letter."""
    return value[:-2] + value[-1] + value[-2] + "x" if len(value) > 1 else value + "x"


def test_the_enumeration_finds_every_choice_flag():
    flags = {script: {f for s, f, _ in CASES if s == script} for script in SCRIPTS}
    assert {"lr_schedule", "cond", "task", "posterior", "attention_block", "prediction",
            "schedule", "loss", "ae_preset", "dataset", "preset"} <= flags["train_ldm.py"]
    assert {"lr_schedule", "dataset", "regularizer", "downsample_padding", "rec_loss",
            "lpips_net", "disc_loss", "preset"} <= flags["train_ae.py"]
    assert "sampler" in flags["sample.py"]
    # every text field of the scripts' configs has its values in CHOICES, and every entry of
    # CHOICES is such a field (none left behind by a rename)
    text_fields = {a.dest for parser, _ in PARSERS.values() for a in parser._actions
                   if a.type is str and a.option_strings} - FREE_TEXT
    assert text_fields == set(CHOICES), "list a new text field's values in flags.CHOICES"


@pytest.mark.parametrize("script, flag, allowed", CASES, ids=[f"{s} --{f}" for s, f, _ in CASES])
def test_a_typo_in_a_choice_flag_is_refused_in_one_line_before_any_work(tmp_path, capsys, script,
                                                                          flag, allowed):
    bad = typo(allowed[0])
    assert bad not in allowed
    out = tmp_path / "out"
    if script == "sample.py":
        argv = ["--ckpt", str(tmp_path / "missing.pt"), "--out", str(out / "grid.png")]
    else:
        argv = ["--smoke", "--device", "cpu", "--out", str(out)]
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        run(SCRIPTS[script].main, [*argv, f"--{flag}", bad])
    seconds = time.perf_counter() - start
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    # a config field: "--flag value: must be one of ..."; argparse's choices=: "argument --flag:"
    assert lines[0].startswith((f"error: --{flag} {bad}: ", f"error: argument --{flag}: ")), err
    assert bad in lines[0] and all(value in lines[0] for value in allowed), err
    assert not out.exists() or {p.name for p in out.iterdir()} <= {RunLock.NAME}
    assert seconds < 1.0


def test_every_allowed_value_passes_and_builds_its_config():
    classes = {cls for _, config_classes in PARSERS.values() for cls in config_classes}
    assert classes, "no config classes found behind the scripts' flags"
    owner = {f.name: cls for cls in classes for f in dataclasses.fields(cls)}
    for name, allowed in CHOICES.items():
        for value in allowed:
            check_values({name: value})
            config = build_config(owner[name], {name: value, **NEEDS.get((name, value), {})})
            assert getattr(config, name) == value


def test_each_lr_schedule_is_its_own_schedule_in_lr_at():
    """A value in the table that `lr_at` does not tell apart (its else-branch) would train with
    another schedule; after the warm-up every listed schedule gives its own rates."""
    config = TrainingConfig(lr=1e-3, warmup_steps=2, steps=10, lr_min_ratio=0.1)
    rates = {name: tuple(lr_at(step, dataclasses.replace(config, lr_schedule=name))
                         for step in range(11)) for name in LR_SCHEDULES}
    assert len(set(rates.values())) == len(LR_SCHEDULES)
    assert {rates[name][:2] for name in LR_SCHEDULES} == {(5e-4, 1e-3)}  # the warm-up is shared


def test_each_diffusion_loss_is_its_own_loss_in_ldm_loss():
    """Likewise `--loss` (ldm_loss's else-branch is l1): with a model that predicts eps = 0, each
    listed loss is its closed form of eps."""
    closed_form = {"l2": lambda eps: eps.pow(2).mean(), "l1": lambda eps: eps.abs().mean()}
    config = DiffusionConfig(T=10)
    schedule = config.make_schedule()
    z0, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    t = torch.tensor([0, 9])
    zero_model = lambda z_t, t, condition, concat=None: torch.zeros_like(z_t)  # noqa: E731
    for name in LOSSES:
        loss = ldm_loss(zero_model, schedule, z0, t, eps, None,
                        dataclasses.replace(config, loss=name))
        assert torch.allclose(loss, closed_form[name](eps))
