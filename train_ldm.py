"""Train a latent diffusion model (stage two). NOT IMPLEMENTED YET: this lands with issue #5.

The pieces it will use are already in the library and tested: tinyldm.schedule (the forward
process), tinyldm.unet (the denoiser with cross-attention) and tinyldm.ddim (the samplers).
"""

import sys

if __name__ == "__main__":
    sys.exit("train_ldm.py is not implemented yet (issue #5). See README.md for what works today.")
