"""Sample images from a trained latent diffusion model. NOT IMPLEMENTED YET: this lands with issue #5.

The sampler itself is ready: tinyldm.ddim.sample (DDPM / DDIM with eta, classifier-free guidance).
"""

import sys

if __name__ == "__main__":
    sys.exit("sample.py is not implemented yet (issue #5). See README.md for what works today.")
