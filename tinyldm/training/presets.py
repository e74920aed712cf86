"""The named presets of train_ae.py (`AE_PRESETS`) and train_ldm.py (`LDM_PRESETS`): plain dicts of
field -> value over the scripts' config dataclasses; each photo preset's values carry a comment
naming the released CompVis config file they follow. `--smoke` lays `AE_SMOKE` / `LDM_SMOKE` over
any preset: a seconds-long CPU run through the same code. The list, and what each preset reaches
with dates and machines: docs/scripts.md.
"""

# ----------------------------------------------------------------------------------------------
# train_ae.py: the first stage

# shapes: sized for the CPU (its time and held-out PSNR: docs/scripts.md). L2 rather than the
# paper's L1: on small objects over a flat background L1's per-pixel median is the
# background for a long time, and PSNR is an L2 measure. The discriminator joins for the last 300
# steps at a small weight.
_SHAPES_AE = dict(
    dataset="shapes", image_size=32, n_train=50_000, n_eval=256, batch_size=32, steps=800,
    lr=1e-3, lr_schedule="cosine", lr_min_ratio=0.02, warmup_steps=50, log_every=50,
    sample_every=200, ckpt_every=400, stats_images=512,
    base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, z_channels=4,
    mid_attention=False, norm_groups=8,
    rec_loss="l2", perceptual_weight=0.0, disc_start=500, disc_weight=0.1,
    disc_channels=32, disc_layers=2,
)
AE_PRESETS: dict[str, dict] = {
    "shapes": _SHAPES_AE,
    "shapes_vq": {**_SHAPES_AE, "regularizer": "vq", "n_codes": 512},
    # Your own images on a CPU: the shapes recipe at 32 px on --data DIR
    # (`python train_ae.py --data DIR` picks it).
    "folder": {**_SHAPES_AE, "dataset": "folder", "n_train": 0},
    # GPU-sized shapes: 64 px -> 16 x 16 x 4 latents (what train_ldm.py's shapes64 preset uses).
    "shapes64": {**_SHAPES_AE, "image_size": 64, "batch_size": 64, "steps": 6000, "lr": 5e-4,
                 "sample_every": 1000, "ckpt_every": 2000, "n_eval": 1000, "stats_images": 4096,
                 "base_channels": 64, "num_res_blocks": 2, "mid_attention": True,
                 "norm_groups": 32, "disc_start": 4000, "disc_channels": 64, "disc_layers": 3},
}
# The paper's first stages, each value from the released CompVis configs (CompVis/latent-diffusion,
# models/first_stage_models/{kl-f4,kl-f8,vq-f4}/config.yaml) unless marked "ours":
#   ddconfig: ch 128, ch_mult (1,2,4) for f=4 or (1,2,4,4) for f=8, num_res_blocks 2 (their
#   Decoder runs num_res_blocks + 1 = 3 per level), attention only in the middle block
#   (attn_resolutions []), dropout 0;
#   kl-f4: embed_dim 3; kl-f8: embed_dim 4; vq-f4: embed_dim 3, n_embed 8192;
#   loss: L1 + LPIPS (perceptual_weight 1) + PatchGAN (3 layers, 64 channels, hinge), and
#     KL: kl_weight 1e-6, disc_start 50001, disc_weight 0.5 (LPIPSWithDiscriminator);
#     VQ: codebook_weight 1.0, disc_start 0, disc_weight 0.75 (VQLPIPSWithDiscriminator);
#   base_learning_rate 4.5e-6, multiplied by the batch size as their main.py does (scale_lr);
#   Adam (0.5, 0.9).
# Ours: the image sizes (64 / 128 / 256 px instead of 256 crops), batch sizes and step counts,
# which fit one GPU.
_PAPER_AE = dict(
    n_train=0, n_eval=1000, num_workers=4, log_every=100, sample_every=2000, ckpt_every=5000,
    stats_images=4096, ema_decay=0.0, base_channels=128, channel_mult=(1, 2, 4), num_res_blocks=2,
    decoder_res_blocks=3, z_channels=3, mid_attention=True, dropout=0.0, rec_loss="l1",
    perceptual_weight=1.0, disc_layers=3, disc_channels=64, disc_loss="hinge", kl_weight=1e-6,
    disc_start=50_001, disc_weight=0.5, adam_beta1=0.5, adam_beta2=0.9,
)
_F8 = {"channel_mult": (1, 2, 4, 4), "z_channels": 4}  # kl-f8
_VQ = {"regularizer": "vq", "n_codes": 8192, "codebook_weight": 1.0, "disc_start": 0,
       "disc_weight": 0.75}  # vq-f4


# The photo presets' step counts are for a data set of CelebA's size (its 162,770 training images).
# On fewer images a run keeps their epochs instead (steps * batch / 162,770 passes: 20 for the
# celeba autoencoders, 79 for celeba64's LDM), at least a fifth of the steps (`min_steps`), so that
# a subset is neither passed over thousands of times nor stopped before the model leaves noise. Both
# are choices ("ours"), not measured on a GPU; the quality curve says whether a run wants more.
CELEBA_TRAIN_IMAGES = 162_770


def _in_epochs(steps: int, batch_size: int) -> dict:
    return {"steps": steps, "epochs": round(steps * batch_size / CELEBA_TRAIN_IMAGES, 1),
            "min_steps": steps // 5}


def _paper_ae(dataset: str, size: int, batch_size: int, steps: int) -> dict:
    """Flipped for CelebA and LSUN; your own folder unflipped (a caption may say left or right)."""
    return dict(_PAPER_AE, dataset=dataset, image_size=size, batch_size=batch_size,
                hflip=dataset != "folder", lr=4.5e-6 * batch_size, **_in_epochs(steps, batch_size))


for _data in ("celeba", "lsun"):  # hflip: ours for CelebA; CompVis' LSUN loader flips with p = 0.5
    for _size in (64, 128):
        _base = _paper_ae(_data, _size, batch_size=16, steps=200_000)
        AE_PRESETS[f"{_data}{_size}"] = _base
        AE_PRESETS[f"{_data}{_size}_f8"] = {**_base, **_F8}
        AE_PRESETS[f"{_data}{_size}_vq"] = {**_base, **_VQ}
# Your own images on one GPU (what train_ldm.py's folder64 / folder128 / folder256 use): vq-f4 at 64
# and 128 px (16 x 16 x 3 and 32 x 32 x 3 latents, as the paper's CelebA-HQ / FFHQ / LSUN-bedrooms
# LDM-4s), kl-f8 at 256 px (32 x 32 x 4, as LSUN-churches and Stable Diffusion). No flips: a caption
# may say left or right.
AE_PRESETS["folder64"] = {**_paper_ae("folder", 64, batch_size=32, steps=100_000),
                          **_VQ}
AE_PRESETS["folder128"] = {**_paper_ae("folder", 128, batch_size=16, steps=150_000),
                           **_VQ}
AE_PRESETS["folder256"] = {**_paper_ae("folder", 256, batch_size=8, steps=200_000),
                           **_F8}

# The held-out PSNR under which train_ldm.py says the first stage is not ready: a floor that catches
# an untrained, unfinished or wrongly loaded autoencoder, about 6 dB under what the preset reaches
# (docs/scripts.md, docs/own_images.md); "photos": every other preset, 64-256 px photographs with
# LPIPS and a PatchGAN (a floor only).
AE_GATES_DB = {"shapes": 30.0, "shapes_vq": 27.0, "shapes64": 30.0, "folder": 18.0, "photos": 22.0}

# --smoke shrinks any preset to a seconds-long CPU run. It keeps the preset's loss terms: the
# discriminator joins at step 3, and LPIPS (photo presets) runs with a random backbone, so that no
# weights are downloaded.
AE_SMOKE = dict(
    image_size=16, n_train=64, n_eval=8, batch_size=4, steps=6, warmup_steps=0, log_every=2,
    sample_every=3, ckpt_every=3, stats_images=8, num_workers=0, base_channels=8, num_res_blocks=1,
    norm_groups=4, n_codes=16, lpips_pretrained=False, disc_start=3, disc_channels=8, disc_layers=1,
)


# ----------------------------------------------------------------------------------------------
# train_ldm.py: the second stage

# CPU-sized: 32 px images, f = 4 autoencoder -> 8 x 8 x 4 latents.
# The autoencoder gets 600 steps instead of its preset's 800. The quickstart ("shapes") trains the
# LDM for 1000 steps, so that the whole demo (autoencoder, LDM, evaluation) stays a few minutes on 2
# CPU cores (README); the other tasks and your own images get 1400.
_SHAPES_DEMO = dict(ae_steps=600, n_train=10_000, batch_size=32, steps=1400, lr=1e-3, channels=64,
                    channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8, 4), head_dim=32,
                    context_dim=128, posterior="mean", curve_every=200, curve_images=32)
# The shapes presets train on the posterior mean: the shapes autoencoder's posterior sigma is small
# against its latents' std (docs/scripts.md), so a sample differs from the mean by little.
# The concat-conditioned tasks have no cross-attention to a condition: self-attention at 4 x 4 only,
# no guidance.
_SHAPES_CONCAT = {**_SHAPES_DEMO, "cond": "none", "attn_resolutions": (4,), "max_shapes": 3,
                  "eval_cfg": 1.0}

LDM_PRESETS: dict[str, dict] = {
    "shapes": {**_SHAPES_DEMO, "steps": 1000},
    # The paper's other tasks on shapes (Sec. 4.3-4.5), same model size as the demo; up to 3 objects
    # per image.
    "shapes_class": {**_SHAPES_DEMO, "cond": "class"},
    "shapes_layout": {**_SHAPES_DEMO, "cond": "layout", "max_shapes": 3},
    "shapes_semantic": {**_SHAPES_CONCAT, "task": "semantic"},
    "shapes_sr": {**_SHAPES_CONCAT, "task": "superres"},
    "shapes_inpaint": {**_SHAPES_CONCAT, "task": "inpaint"},
    # Your own images on a CPU (32 px, the demo's model size): `python train_ldm.py --data DIR`
    # picks it. --cond auto reads what the folder holds: captions (metadata.jsonl or .txt) -> text,
    # class sub-folders -> class, else none.
    "folder": {**_SHAPES_DEMO, "dataset": "folder", "ae_preset": "folder", "cond": "auto",
               "n_train": 0, "eval_images": 256, "posterior": "sample"},
    # GPU-sized: 64 px images -> 16 x 16 x 4 latents; the tiny text-to-image UNet whose training
    # speed the benchmark (python -m tinyldm.tools.bench) measures on CUDA.
    "shapes64": dict(image_size=64, ae_preset="shapes64", n_train=50_000, batch_size=256,
                     steps=8000, lr=4e-4, channels=128, channel_mult=(1, 2, 2),
                     attn_resolutions=(16, 8), context_dim=256, curve_every=400,
                     curve_images=128, posterior="mean"),  # see the shapes presets
}

# The paper's photo models, each value from the released CompVis configs (CompVis/latent-diffusion,
# configs/latent-diffusion/{celebahq,ffhq,lsun_bedrooms}-ldm-vq-4.yaml and
# lsun_churches-ldm-kl-8.yaml) unless marked "ours":
#   diffusion: timesteps 1000, linear_start 0.0015, linear_end 0.0195 (churches: 0.0155) on
#     CompVis' "linear" schedule, which is sqrt(beta) linear, "scaled_linear" here; eps prediction;
#     loss L2 (churches: L1);
#   UNet (openaimodel.UNetModel): num_res_blocks 2, channel_mult (1,2,3,4), attention at
#     downsampling factors (2,4,8) of the latent, num_head_channels 32; the unconditional models
#     use its plain AttentionBlock and add the timestep embedding (use_scale_shift_norm False;
#     churches: True);
#   EMA (LitEma) with decay 0.9999 and its warm-up min(decay, (1 + n) / (10 + n)); no lr warm-up
#     (churches: 10k);
#   base_learning_rate 2e-6 multiplied by the batch size (their main.py's scale_lr); the LDM trains
#     on posterior samples of a KL first stage (get_first_stage_encoding) and on pre-quantization
#     latents of a VQ one.
# Ours: 64 / 128 / 256 px instead of 256, so the widths (model_channels 224 there) and batch sizes
# fit one GPU.
_PAPER_LDM = dict(
    n_train=0, schedule="scaled_linear", T=1000, beta_start=0.0015, beta_end=0.0195,
    prediction="eps", loss="l2", num_res_blocks=2, channel_mult=(1, 2, 3, 4), head_dim=32,
    attention_block="plain", scale_shift_norm=False, mid_attention=True, context_dim=None,
    ema_decay=0.9999, warmup_steps=0, posterior="sample", eval_images=1000,
    curve_every=5000, curve_images=256,  # ours: the quality curve, 20 to 40 points a run
)


def _paper_ldm(dataset: str, size: int, *, channels: int, batch_size: int, steps: int) -> dict:
    """The LDM of `dataset` at `size` px on the first stage of the same name (vq-f4 for CelebA and
    LSUN, flipped; for your own folder unflipped, with --cond auto)."""
    latent = size // 4  # f = 4: attention at latent / 2, / 4, / 8 (downsampling factors 2, 4, 8)
    own = dataset == "folder"
    return dict(_PAPER_LDM, dataset=dataset, image_size=size, cond="auto" if own else "none",
                ae_preset=f"folder{size}" if own else f"{dataset}{size}_vq", hflip=not own,
                channels=channels, batch_size=batch_size,
                lr=2e-6 * batch_size, attn_resolutions=(latent // 2, latent // 4, latent // 8),
                **_in_epochs(steps, batch_size))


LDM_PRESETS.update(
    # CelebA-HQ / FFHQ / LSUN-bedrooms LDM-4 (vq-f4 first stage): ours at 64 and 128 px. hflip:
    # CompVis' LSUN loader flips with p = 0.5; ours for CelebA.
    celeba64=_paper_ldm("celeba", 64, channels=128, batch_size=128, steps=100_000),
    celeba128=_paper_ldm("celeba", 128, channels=192, batch_size=96, steps=150_000),
    lsun64=_paper_ldm("lsun", 64, channels=128, batch_size=128, steps=100_000),
    # Your own images on one GPU; --cond auto as in the CPU folder preset. A conditional model gets
    # transformer blocks with cross-attention (the paper's Sec. 3.3; CompVis cin256-v2:
    # use_spatial_transformer, depth 1).
    folder64=_paper_ldm("folder", 64, channels=128, batch_size=128, steps=100_000),
    folder128=_paper_ldm("folder", 128, channels=192, batch_size=96, steps=150_000),
    # 256 px: the kl-f8 first stage (32 x 32 x 4 latents) and lsun_churches-ldm-kl-8's UNet:
    # model_channels 192, channel_mult (1,2,2,4,4), attention at 32, 16, 8, 4, num_heads 8 (here
    # head_dim 32: ours), scale-shift norm, beta_end 0.0155, L1 loss, lr 5e-5 (not scaled), 10k
    # warm-up steps, batch 96.
    folder256={**_paper_ldm("folder", 256, channels=192, batch_size=96, steps=200_000),
               "channel_mult": (1, 2, 2, 4, 4), "attn_resolutions": (32, 16, 8, 4),
               "scale_shift_norm": True, "beta_end": 0.0155, "loss": "l1", "lr": 5e-5,
               "warmup_steps": 10_000},
)
# image_size=32 gives 8 x 8 latents, so the smoke UNet's levels (8, 4) exist for every preset
# (celeba64 too).
LDM_SMOKE = dict(image_size=32, n_train=64, steps=6, batch_size=8, warmup_steps=2, channels=32,
                 channel_mult=(1, 2), attn_resolutions=(4,), context_dim=32, text_layers=1,
                 log_every=2, sample_every=4, ckpt_every=3, eval_images=4, eval_steps=3,
                 feature_steps=5, curve_every=3, curve_images=4)
