"""tinyldm: Latent Diffusion Models (Rombach et al., arXiv 2112.10752), small enough to read.

One idea per module:
    schedule.py  the forward (noising) process: betas, alpha_bar, q_sample, posterior, SNR
    unet.py      the denoiser: a UNet with timestep embedding and cross-attention
    ddim.py      samplers: ancestral DDPM, DDIM (with eta), classifier-free guidance, inversion
"""

__version__ = "0.1.0"
