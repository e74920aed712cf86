"""Released first stages in the diffusers format -> tinyldm's `Autoencoder`: the config, and every
tensor by name.

`CompVis/ldm-celebahq-256` and the super-resolution release use diffusers' `VQModel` (vq-f4), the
text-to-image release `AutoencoderKL` (kl-f8). Both are the CompVis Encoder / Decoder that tinyldm's
autoencoder follows, so the conversion is a renaming, plus one reshaping: diffusers' mid-block
attention has separate q, k, v linear layers where tinyldm's single-head `AttnBlock` has one 1x1
conv, `qkv`, whose weight is their concatenation.

    diffusers                                     tinyldm
    encoder.down_blocks[i].resnets[j]             encoder.down[k]
                                                  (k counts ResBlocks and Downsamples)
    encoder.down_blocks[i].downsamplers[0].conv   encoder.down[k].conv
    {en,de}coder.mid_block.resnets[0 / 1]         {en,de}coder.mid.0 / mid.2
    {en,de}coder.mid_block.attentions[0]          {en,de}coder.mid.1
                                                  (norm, qkv = [to_q; to_k; to_v], proj)
    decoder.up_blocks[n].resnets[j]               decoder.up[k]
                                                  (n = 0 is the lowest resolution, as in tinyldm)
    decoder.up_blocks[n].upsamplers[0].conv       decoder.up[k].conv
    {en,de}coder.conv_norm_out                    {en,de}coder.norm_out
    quant_conv, post_quant_conv                   quant_conv, post_quant_conv
    quantize.embedding.weight                     quantizer.codebook.weight

What the releases need that tinyldm's defaults do not have, and so set here: the 1x1 `quant_conv` /
`post_quant_conv` (`quant_conv=True`), downsampling convs padded on the right and bottom only
(`downsample_padding="asymmetric"`), and one more ResBlock per decoder level (`decoder_res_blocks`).
The scale factor is *not* read from the diffusers config: see `tinyldm.pretrained` for each model's.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from tinyldm.autoencoder import Autoencoder, AutoencoderConfig

_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
           "conv_shortcut": "skip"}


def autoencoder_config(config: Mapping, *, regularizer: str) -> AutoencoderConfig:
    """tinyldm's AutoencoderConfig for a diffusers VQModel (`regularizer="vq"`) or AutoencoderKL
    ("kl") config."""
    widths = tuple(config["block_out_channels"])
    for key, want in (("down_block_types", "DownEncoderBlock2D"),
                      ("up_block_types", "UpDecoderBlock2D")):
        if any(t != want for t in config[key]):
            raise ValueError(f"{key} {config[key]}: only {want} converts")
    if config.get("act_fn", "silu") != "silu" or config.get("norm_type", "group") != "group":
        raise ValueError("only act_fn='silu' and norm_type='group' convert")
    if any(w % widths[0] for w in widths):
        raise ValueError(f"block_out_channels {widths} are not multiples of the first")
    c = config.get("latent_channels", 3 if regularizer == "vq" else 4)
    if regularizer == "vq" and config.get("vq_embed_dim") not in (None, c):
        raise ValueError(f"vq_embed_dim {config['vq_embed_dim']} differs from latent_channels {c}; "
                         "tinyldm's quant_conv keeps the width")
    if regularizer == "kl" and not (config.get("use_quant_conv", True)
                                    and config.get("use_post_quant_conv", True)):
        raise ValueError("an AutoencoderKL without quant_conv / post_quant_conv: not a CompVis "
                         "release layout")
    nrb = config.get("layers_per_block", 1)
    return AutoencoderConfig(
        in_channels=config.get("in_channels", 3), base_channels=widths[0],
        channel_mult=tuple(w // widths[0] for w in widths), num_res_blocks=nrb,
        decoder_res_blocks=nrb + 1,
        z_channels=c, mid_attention=config.get("mid_block_add_attention", True),
        norm_groups=config.get("norm_num_groups", 32), regularizer=regularizer,
        n_codes=config.get("num_vq_embeddings", 256) if regularizer == "vq" else 1024,
        quant_conv=True, downsample_padding="asymmetric")


def _attention(state: Mapping[str, Tensor], src: str, dst: str, out: dict, used: set) -> None:
    """diffusers' to_q / to_k / to_v / to_out.0 (linear) and group_norm -> tinyldm's norm, qkv and
    proj (1x1 convs)."""
    names = [f"{src}.{n}.{leaf}" for n in ("to_q", "to_k", "to_v") for leaf in ("weight", "bias")]
    used.update(names + [f"{src}.to_out.0.weight", f"{src}.to_out.0.bias",
                         f"{src}.group_norm.weight", f"{src}.group_norm.bias"])
    qkv = ("to_q", "to_k", "to_v")
    # (3C, C, 1, 1)
    out[f"{dst}.qkv.weight"] = torch.cat([state[f"{src}.{n}.weight"] for n in qkv])[..., None, None]
    out[f"{dst}.qkv.bias"] = torch.cat([state[f"{src}.{n}.bias"] for n in qkv])
    out[f"{dst}.proj.weight"] = state[f"{src}.to_out.0.weight"][..., None, None]
    out[f"{dst}.proj.bias"] = state[f"{src}.to_out.0.bias"]
    out[f"{dst}.norm.weight"] = state[f"{src}.group_norm.weight"]
    out[f"{dst}.norm.bias"] = state[f"{src}.group_norm.bias"]


def _levels(prefixes: dict, src: str, resampler: str, dst: str, levels: int, blocks: int) -> None:
    """diffusers' `src`[n].resnets[j] and `src`[n].`resampler`[0] -> the flat Sequential `dst` of
    tinyldm, in which each level's ResBlocks are followed by its Downsample / Upsample (all levels
    but the last)."""
    k = 0
    for n in range(levels):
        for j in range(blocks):
            for a, b in _RESNET.items():
                prefixes[f"{src}.{n}.resnets.{j}.{a}"] = f"{dst}.{k}.{b}"
            k += 1
        if n < levels - 1:
            prefixes[f"{src}.{n}.{resampler}.0.conv"] = f"{dst}.{k}.conv"
            k += 1


def key_map(cfg: AutoencoderConfig) -> dict[str, str]:
    """diffusers tensor name prefix -> tinyldm name prefix, for every layer but the mid-block
    attention (reshaped)."""
    prefixes = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv",
                "quantize.embedding": "quantizer.codebook"}
    levels = len(cfg.channel_mult)
    for part in ("encoder", "decoder"):
        for leaf in ("conv_in", "conv_out"):
            prefixes[f"{part}.{leaf}"] = f"{part}.{leaf}"
        prefixes[f"{part}.conv_norm_out"] = f"{part}.norm_out"
        for r, m in ((0, 0), (1, 2)):
            for a, b in _RESNET.items():
                prefixes[f"{part}.mid_block.resnets.{r}.{a}"] = f"{part}.mid.{m}.{b}"
    _levels(prefixes, "encoder.down_blocks", "downsamplers", "encoder.down", levels,
            cfg.num_res_blocks)
    _levels(prefixes, "decoder.up_blocks", "upsamplers", "decoder.up", levels,
            cfg.decoder_res_blocks or cfg.num_res_blocks)
    return prefixes


def autoencoder_state_dict(state: Mapping[str, Tensor],
                           cfg: AutoencoderConfig) -> dict[str, Tensor]:
    """A diffusers VQModel / AutoencoderKL state dict -> tinyldm Autoencoder state dict for `cfg`
    (see `autoencoder_config`); tinyldm's own buffers (codebook usage, latent statistics) get their
    defaults. Raises, naming them, if any diffusers tensor is left unused or any tinyldm tensor
    unfilled, or if a shape differs."""
    prefixes = key_map(cfg)
    with torch.device("meta"):  # the target's names and shapes, without allocating its weights
        target = Autoencoder(cfg).state_dict()
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    if cfg.mid_attention:
        for part in ("encoder", "decoder"):
            if f"{part}.mid_block.attentions.0.to_q.weight" in state:
                _attention(state, f"{part}.mid_block.attentions.0", f"{part}.mid.1", out, used)
    for name, tensor in state.items():
        prefix, _, leaf = name.rpartition(".")
        if name in used or prefix not in prefixes:
            continue
        out[f"{prefixes[prefix]}.{leaf}"] = tensor
        used.add(name)
    # tinyldm's own buffers, not in a diffusers model. Codebook usage 1: every released code counts
    # as alive, so fine-tuning does not restart them; the scale factor is set by the loader; no
    # measured latent statistics.
    c = cfg.z_channels
    defaults = {"quantizer.usage": torch.ones(cfg.n_codes), "scale_factor": torch.tensor(1.0),
                "latent_mean": torch.zeros(c), "latent_std": torch.ones(c)}
    out.update({name: value for name, value in defaults.items() if name in target})
    unused = sorted(set(state) - used)
    missing = sorted(set(target) - set(out))
    wrong = [f"{n} {tuple(out[n].shape)} vs {tuple(target[n].shape)}" for n in out
             if n in target and tuple(out[n].shape) != tuple(target[n].shape)]
    if unused or missing or wrong or set(out) - set(target):
        raise ValueError(f"the conversion does not cover the model: {len(unused)} diffusers "
                         f"tensors unused ({unused[:5]}), {len(missing)} tinyldm tensors unfilled "
                         f"({missing[:5]}), shapes differ: {wrong[:3]}, unknown: "
                         f"{sorted(set(out) - set(target))[:3]}")
    return out


def build_autoencoder(config: Mapping, state: Mapping[str, Tensor], *, regularizer: str,
                      scale_factor: float = 1.0) -> Autoencoder:
    """tinyldm's Autoencoder (eval mode) from a diffusers VQModel / AutoencoderKL config dict and
    state dict, with `scale_factor` (the LDM multiplies latents by it; see `tinyldm.pretrained` for
    each release's)."""
    cfg = autoencoder_config(config, regularizer=regularizer)
    weights = autoencoder_state_dict(state, cfg)  # checked against cfg's shapes before building
    ae = Autoencoder(cfg)
    ae.load_state_dict(weights)
    ae.scale_factor.fill_(scale_factor)
    return ae.eval()


def autoencoder_from_diffusers(model, *, regularizer: str,
                               scale_factor: float = 1.0) -> Autoencoder:
    """A diffusers VQModel / AutoencoderKL (an instance) -> tinyldm's Autoencoder with the same
    weights (eval mode)."""
    return build_autoencoder(dict(model.config), model.state_dict(), regularizer=regularizer,
                             scale_factor=scale_factor)


def autoencoder_to_diffusers(ae: Autoencoder):
    """tinyldm's Autoencoder -> a diffusers VQModel (VQ) or AutoencoderKL (KL) with the same weights
    (eval mode), its `scaling_factor` set to tinyldm's. Without tinyldm's `quant_conv`, diffusers'
    1x1 convs are identities. diffusers' decoder always has num_res_blocks + 1 ResBlocks per level:
    a tinyldm decoder with fewer gets identity blocks (last conv zero) appended per level, the same
    function. diffusers' encoder always pads asymmetrically: a tinyldm autoencoder with the default
    symmetric padding exports an exact decoder (all that sampling needs) and an encoder that differs
    at the borders (encode with tinyldm)."""
    import diffusers

    cfg = ae.config
    if cfg.regularizer == "identity":
        raise ValueError("the identity first stage has nothing to export")
    decoder_blocks = cfg.decoder_res_blocks or cfg.num_res_blocks
    if decoder_blocks > cfg.num_res_blocks + 1:
        raise ValueError(f"diffusers' decoder has num_res_blocks + 1 = {cfg.num_res_blocks + 1} "
                         f"ResBlocks per level; this one has {decoder_blocks}")
    common = dict(in_channels=cfg.in_channels, out_channels=cfg.in_channels,
                  block_out_channels=tuple(cfg.base_channels * m for m in cfg.channel_mult),
                  down_block_types=("DownEncoderBlock2D",) * len(cfg.channel_mult),
                  up_block_types=("UpDecoderBlock2D",) * len(cfg.channel_mult),
                  layers_per_block=cfg.num_res_blocks,
                  latent_channels=cfg.z_channels, norm_num_groups=cfg.norm_groups,
                  mid_block_add_attention=cfg.mid_attention, scaling_factor=float(ae.scale_factor))
    if cfg.regularizer == "vq":
        model = diffusers.VQModel(**common, num_vq_embeddings=cfg.n_codes,
                                  vq_embed_dim=cfg.z_channels)
    else:
        model = diffusers.AutoencoderKL(**common)
    inverse = {ours: theirs for theirs, ours in key_map(cfg).items()}
    skip = ("quantizer.usage", "scale_factor", "latent_mean", "latent_std")
    state = {}
    for name, tensor in ae.state_dict().items():
        prefix, _, leaf = name.rpartition(".")
        if name in skip or prefix.endswith(("mid.1.qkv", "mid.1.proj", "mid.1.norm")):
            continue
        state[f"{inverse[prefix]}.{leaf}"] = tensor
    for part in ("encoder", "decoder") if cfg.mid_attention else ():
        src, dst = f"{part}.mid.1", f"{part}.mid_block.attentions.0"
        ours = ae.state_dict()
        # q, k, v
        weights, biases = ours[f"{src}.qkv.weight"].chunk(3), ours[f"{src}.qkv.bias"].chunk(3)
        for n, w, b in zip(("to_q", "to_k", "to_v"), weights, biases, strict=True):
            state[f"{dst}.{n}.weight"], state[f"{dst}.{n}.bias"] = w[:, :, 0, 0], b
        state[f"{dst}.to_out.0.weight"] = ours[f"{src}.proj.weight"][:, :, 0, 0]
        state[f"{dst}.to_out.0.bias"] = ours[f"{src}.proj.bias"]
        state[f"{dst}.group_norm.weight"] = ours[f"{src}.norm.weight"]
        state[f"{dst}.group_norm.bias"] = ours[f"{src}.norm.bias"]
    # A decoder with fewer ResBlocks per level than diffusers' num_res_blocks + 1 (tinyldm's
    # default: as many as the encoder) gets identity blocks after its own at each level: a ResBlock
    # whose last conv is zero returns its input exactly (x + 0; in and out widths are equal there,
    # so there is no shortcut conv).
    own = model.state_dict()
    for n in range(len(cfg.channel_mult)):
        for j in range(decoder_blocks, cfg.num_res_blocks + 1):
            block = f"decoder.up_blocks.{n}.resnets.{j}"
            for name, tensor in own.items():
                if name.startswith(block + "."):
                    state[name] = (torch.zeros_like(tensor) if name.startswith(block + ".conv2.")
                                   else tensor)
    if not cfg.quant_conv:  # tinyldm has no 1x1 convs around the latent: diffusers' are identities
        for name in ("quant_conv", "post_quant_conv"):
            weight = model.state_dict()[f"{name}.weight"]
            state[f"{name}.weight"] = torch.eye(weight.shape[0])[:, :, None, None]
            state[f"{name}.bias"] = torch.zeros(weight.shape[0])
    model.load_state_dict(state)  # strict: every tensor of both sides accounted for
    return model.eval()
