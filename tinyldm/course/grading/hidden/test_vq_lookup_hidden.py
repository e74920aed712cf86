"""vq_lookup, hidden: each code is its own nearest code."""

import torch

from tinyldm.autoencoder import VectorQuantizer


def test_the_codes_map_to_themselves():
    torch.manual_seed(0)
    q = VectorQuantizer(12, 3, beta=0.25, restart_threshold=0.0, usage_decay=0.99).eval()
    with torch.no_grad():
        q.codebook.weight.copy_(torch.randn(12, 3) * torch.linspace(0.2, 4.0, 12)[:, None])
    z = q.codebook.weight.detach().T.reshape(1, 3, 3, 4)  # the 12 codes as a 3 x 4 latent image
    assert torch.equal(q.lookup(z).flatten(), torch.arange(12))
