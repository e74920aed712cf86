"""vq_lookup: the nearest code and the straight-through estimator (VQ-VAE Eqs. 1-3)."""

import torch

from tinyldm.autoencoder import VectorQuantizer


def _quantizer(seed=0):
    torch.manual_seed(seed)
    q = VectorQuantizer(16, 4, beta=0.25, restart_threshold=0.0, usage_decay=0.99).eval()
    with torch.no_grad():  # codes of very different norms: the ||e||^2 term decides many lookups
        q.codebook.weight.copy_(torch.randn(16, 4) * torch.linspace(0.1, 3.0, 16)[:, None])
    return q


def test_indices_are_the_nearest_codes():
    q = _quantizer()
    z = torch.randn(2, 4, 5, 6, generator=torch.Generator().manual_seed(1)) * 1.5
    want = torch.cdist(z.permute(0, 2, 3, 1).reshape(-1, 4),
                       q.codebook.weight).argmin(1).reshape(2, 5, 6)
    assert torch.equal(q.lookup(z), want)


def test_the_output_value_is_the_code():
    q = _quantizer(2)
    z = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(3))
    out = q(z)
    assert torch.allclose(out.z_q, q.codebook.weight[out.indices].permute(0, 3, 1, 2), atol=1e-6)


def test_the_gradient_passes_straight_through_to_z_e():
    q = _quantizer(4)
    z = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(5), requires_grad=True)
    weights = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(6))
    (q(z).z_q * weights).sum().backward()
    assert z.grad is not None and torch.allclose(z.grad, weights)
