"""Measuring and looking at results.

    metrics.py   PSNR, SSIM; Frechet distance, KID, precision / recall on feature vectors
    features.py  the feature extractors those run on
                 (Inception-v3 through pytorch-fid, or a small classifier)
    viz.py       image grids, for PNG files and for the notebooks
    attention_maps.py  what a model's attention layers attend to (cross-attention maps)
"""
