"""tinyldm: Latent Diffusion Models (Rombach et al., arXiv 2112.10752), small enough to read.

The paper's code, in reading order (each file imports only the ones above it):
    schedule.py          the forward (noising) process: betas, alpha_bar, q_sample, the DDPM
                         posterior (Eq. 7), the eps / x0 / v parameterizations
    blocks.py            the shared building blocks: ResBlock, down/upsampling, attention,
                         transformer block
    autoencoder.py       the first stage (Sec. 3.1): encoder, decoder, KL or VQ regularizer, latent
                         scale factor
    autoencoder_loss.py  its training loss: L1/L2 + perceptual + patch-adversarial with the adaptive
                         weight
    unet.py              the denoiser (Sec. 3.3): a UNet with timestep embedding and cross-attention
    conditioning.py      tau_theta: the text, class and layout encoders, and the null condition for
                         guidance
    ddim.py              the samplers, one function each: ancestral DDPM, DDIM with eta, PLMS,
                         DPM-Solver++(2M); classifier-free guidance; DDIM inversion
    ldm.py               the wiring (Eq. 3): the latent-space loss, generation, the self-contained
                         checkpoint

Then the scripts that run them: train_ae.py, train_ldm.py, sample.py (at the repository's top
level).

Out of the reader's path:
    data/        the shapes dataset and its evaluator, image folders / CelebA / LSUN, the latent
                 cache, the paper's tasks' inputs
    training/    the one trainer both scripts run, the scripts' setup, seeds, EMA, checkpoints,
                 flags, presets, torchrun
    evaluation/  metrics (PSNR, SSIM, FD, KID, precision / recall), feature extractors, image
                 grids, attention maps, the scores each training run ends with
    tools/       python -m tinyldm.tools.{evaluate, bench, course, nbrun}; sample.py's other modes
    cli.py       how every tool ends a user's mistake: one `error:` line (imports nothing of ours)
    files.py     files written whole or not at all, and their digests
    memory.py    memory estimates before sampling, loading or training
"""

__version__ = "0.1.0"
