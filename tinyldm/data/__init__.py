"""Data: where images, captions and the task inputs come from, and the latent cache.

    shapes.py            the embedded default: procedural shapes with captions, classes, boxes,
                         maps, and the exact evaluator that scores generated images against their
                         prompts
    images.py            your images: a folder (with class sub-folders or captions), CelebA, LSUN
    example_folders.py   folders of real photographs to try that on, from scikit-image's sample
                         images
    latents.py           the latent cache: the training set encoded once by the frozen autoencoder
    image_conditions.py  the image-like conditions concatenated to z_t (semantic maps, low-res
                         images, inpainting masks) and the operations around them (composite,
                         tiling)
    tasks.py             each task's cached inputs, held-out items and score, shared by the scripts
    order.py             the data order and each step's named random streams, functions of
                         (seed, step)
"""
