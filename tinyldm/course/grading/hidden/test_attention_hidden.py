"""attention, hidden: a UNet built with fused_attention=False runs the student's attention, and
trains like the fused kernel."""

import torch
import torch.nn.functional as F

from tinyldm import blocks
from tinyldm.course.grading._helpers import randomise, tiny_unet


def test_the_unet_runs_this_attention_when_told(monkeypatch):
    unet = randomise(tiny_unet(context_dim=16), 1).eval()
    explicit_unet = tiny_unet(context_dim=16, fused_attention=False).eval()
    explicit_unet.load_state_dict(unet.state_dict())
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(2, 3, 8, 8, generator=g), torch.tensor([10, 700])
    context = torch.randn(2, 5, 16, generator=g)
    mask = torch.tensor([[True] * 5, [True] * 2 + [False] * 3])
    calls = []
    original = blocks.attention_weights
    counted = lambda *a, **k: calls.append(1) or original(*a, **k)  # noqa: E731
    monkeypatch.setattr(blocks, "attention_weights", counted)
    with torch.no_grad():
        fused = unet(x, t, context=context, context_mask=mask)
        assert not calls
        explicit = explicit_unet(x, t, context=context, context_mask=mask)
    assert calls and torch.allclose(explicit, fused, atol=1e-4 * float(fused.abs().max()))


def test_a_short_training_run_with_this_attention_matches_the_fused_kernel():
    def run(explicit: bool) -> list[float]:
        unet = tiny_unet(context_dim=16, seed=3, fused_attention=not explicit)
        opt = torch.optim.Adam(unet.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(4)
        table = torch.randn(4, 1, 16, generator=g)  # one context token per class
        losses = []
        for _ in range(25):
            x = torch.randn(16, 3, 8, 8, generator=g)
            labels = torch.randint(0, 4, (16,), generator=g)
            target = x * 0.5 + labels.float().view(16, 1, 1, 1) / 4
            t = torch.randint(0, 1000, (16,), generator=g)
            loss = F.mse_loss(unet(x, t, context=table[labels]), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        return losses

    fused, explicit = run(False), run(True)
    gap = max(abs(a - b) / a for a, b in zip(fused, explicit, strict=True))
    assert gap < 1e-3, (fused[-3:], explicit[-3:])
