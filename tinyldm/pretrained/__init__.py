"""The paper's released models, run by tinyldm's own code: their diffusers-format weights converted by name.

    unet.py          diffusers' UNet2DModel (the unconditional and concat-conditioned releases) -> tinyldm's UNet
    autoencoder.py   diffusers' VQModel / AutoencoderKL (vq-f4, kl-f8) -> tinyldm's Autoencoder
"""
