"""What a training loop needs around its step: the device (`pick_device`), seeds (`seed_everything`;
each step's own draws come from the named streams of `tinyldm.data.order`), the EMA of the weights,
a log (`JSONLLogger`) and stopping on a signal (`GracefulStop`). The loop itself, which uses all of
these, is `tinyldm.training.trainer.Trainer`.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..cli import UsageError


def pick_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda if available, else mps, else cpu; any other name is checked and returned."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available (try --device auto)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r} requested but MPS is not available (try --device auto)")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (third-party code draws from the global RNG)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# EMA of weights


class EMA:
    """shadow <- decay_t * shadow + (1 - decay_t) * param,
    decay_t = min(decay, (1 + t) / (10 + t))."""

    def __init__(self, model: nn.Module, decay: float = 0.999):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for p_ema, p in zip(self.model.parameters(), model.parameters(), strict=True):
            p_ema.lerp_(p.detach(), 1.0 - d)
        for b_ema, b in zip(self.model.buffers(), model.buffers(), strict=True):
            b_ema.copy_(b)  # running statistics, codebook usage, ...: copied, not averaged

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates,
                "model": self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.num_updates = float(state["decay"]), int(state["num_updates"])
        self.model.load_state_dict(state["model"])


# ----------------------------------------------------------------------------------------------
# Logging


class JSONLLogger:
    """Appends one JSON object per call to `path`; `resume_step` drops records with step > it. With
    `tensorboard` (a folder), every number is also written as a TensorBoard scalar (and `image` adds
    a picture): the optional `tensorboard` package, `pip install 'tinyldm[tensorboard]'`, then
    `tensorboard --logdir <folder>`."""

    def __init__(self, path: str | os.PathLike, *, resume_step: int | None = None,
                 tensorboard: str | os.PathLike | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if _record_step(line) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.writer = None
        if tensorboard is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise UsageError("--tensorboard needs the tensorboard package: pip install "
                                 "'tinyldm[tensorboard]' (or pip install tensorboard), or train "
                                 "without --tensorboard") from e
            # purge_step: on resume, TensorBoard hides the events the previous run wrote after the
            # checkpoint
            self.writer = SummaryWriter(str(tensorboard),
                                        purge_step=None if resume_step is None else resume_step + 1)

    def log(self, **record: Any) -> None:
        plain = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(plain) + "\n")
        if self.writer is not None and "step" in plain:
            for k, v in plain.items():
                if k != "step" and isinstance(v, int | float) and not isinstance(v, bool):
                    self.writer.add_scalar(k, v, plain["step"])
            self.writer.flush()

    def image(self, tag: str, path: str | os.PathLike, step: int) -> None:
        """Show a saved PNG (a sample or reconstruction grid) in TensorBoard's image tab; nothing
        without it."""
        if self.writer is not None:
            from PIL import Image

            self.writer.add_image(tag, np.asarray(Image.open(path).convert("RGB")), step,
                                  dataformats="HWC")
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _record_step(line: str) -> float:
    try:
        return float(json.loads(line).get("step", -1))
    except (ValueError, AttributeError):
        return math.inf  # unreadable lines (a torn write) are dropped on resume


# ----------------------------------------------------------------------------------------------
# Stopping on a signal


class GracefulStop:
    """Within `with GracefulStop() as stop:`, SIGINT and SIGTERM set `stop.signal` instead of
    killing the process; the loop checks `stop.requested` after each step, writes a checkpoint and
    exits. A second signal raises KeyboardInterrupt at once (nothing more is written). Outside the
    main thread, where Python cannot take signals, it does nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopped at once")
        self.signal = signum
        print(f"\n{signal.Signals(signum).name}: finishing this step, then writing a checkpoint "
              "(press Ctrl-C again to stop at once, without one)", file=sys.stderr, flush=True)

    @property
    def requested(self) -> bool:
        return self.signal is not None


def resume_command(script: str, argv: list[str]) -> str:
    """The command line that continues a run started with `argv`: the same flags plus --resume."""
    args, i = [], 0
    while i < len(argv):
        # with its optional path (train_ae.py): the checkpoint is named by --out anyway
        if argv[i] == "--resume":
            i += 2 if i + 1 < len(argv) and not argv[i + 1].startswith("--") else 1
            continue
        if not argv[i].startswith("--resume="):
            args.append(argv[i])
        i += 1
    args.append("--resume")
    return f"python {script} {' '.join(shlex.quote(a) for a in args)}"
