"""Released UNets in the diffusers format -> tinyldm's `UNet`: the config, and every tensor by name.

The paper's unconditional and concat-conditioned models (`CompVis/ldm-celebahq-256`,
`CompVis/ldm-super-resolution-4x-openimages`) are published as diffusers' `UNet2DModel`. Its layout
is the CompVis one that tinyldm's UNet follows, so the conversion is a renaming, block for block:

    diffusers                                       tinyldm
    time_embedding.linear_1 / linear_2              time_mlp.0 / time_mlp.2
    conv_in                                         conv_in
    down_blocks[i].resnets[j], .attentions[j]       down[k][0], down[k][1]
                                                    (k counts the stages in order)
    down_blocks[i].downsamplers[0].conv             down[k][0].conv
    mid_block.resnets[0], .attentions[0], .resnets[1]  mid[0], mid[1], mid[2]
    up_blocks[n].resnets[j], .attentions[j]         up[k][0], up[k][1]
                                                    (n = levels - 1 - level)
    up_blocks[n].upsamplers[0].conv                 up[k][-1].conv
    conv_norm_out, conv_out                         out.0, out.2

    ResnetBlock2D: norm1 conv1 time_emb_proj norm2 conv2 conv_shortcut
        -> norm1 conv1 emb_proj norm2 conv2 skip
    Attention: group_norm to_q to_k to_v to_out.0 -> norm attn.to_q attn.to_k attn.to_v attn.to_out

Cross-attention UNets (diffusers' UNet2DConditionModel: CrossAttn blocks, a Transformer2DModel per
attention layer) map the same way onto tinyldm's `attention_block="transformer"`: norm, proj_in,
proj_out, and in each transformer block norm1 / attn1 (self) / norm2 / attn2 (cross) / norm3 /
ff.net.0.proj, ff.net.2 (GEGLU) -> norm1 / self_attn / norm2 / cross_attn / norm3 / ff.proj_in,
ff.proj_out. diffusers gives a head *count* per level there; tinyldm takes one head width
(`head_dim`) or one head count (`num_heads`) for all levels.

What the released models need that tinyldm's defaults do not have, and so set here: GroupNorm eps
1e-5 (`norm_eps`) and biases on q / k / v (`qkv_bias`). Anything else in the diffusers config that
tinyldm cannot express (another timestep embedding, class embeddings, resampling by ResBlocks) is
refused with its name. `unet_state_dict` checks coverage both ways: every diffusers tensor is used
once, every tinyldm tensor filled. `unet_to_diffusers` goes the other way: plain-attention
unconditional UNets to UNet2DModel, cross-attention UNets (tinyldm's class- and text-conditional
models) to UNet2DConditionModel.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from tinyldm.unet import UNet, UNetConfig, head_width

_RESNET = {"norm1": "norm1", "conv1": "conv1", "time_emb_proj": "emb_proj", "norm2": "norm2",
           "conv2": "conv2", "conv_shortcut": "skip"}
_ATTENTION = {"group_norm": "norm", "to_q": "attn.to_q", "to_k": "attn.to_k", "to_v": "attn.to_v",
              "to_out.0": "attn.to_out"}
# diffusers UNet2DModel settings that tinyldm's UNet has only in one form: (config key, the value it
# must have)
_FIXED = {"time_embedding_type": "positional", "flip_sin_to_cos": True, "freq_shift": 0,
          "center_input_sample": False, "downsample_padding": 1, "downsample_type": "conv",
          "upsample_type": "conv", "act_fn": "silu", "mid_block_scale_factor": 1,
          "class_embed_type": None, "num_class_embeds": None, "time_embedding_dim": None,
          # UNet2DConditionModel only: its extras that tinyldm's cross-attention UNet does not have
          "encoder_hid_dim": None, "addition_embed_type": None, "use_linear_projection": False,
          "only_cross_attention": False, "dual_cross_attention": False, "upcast_attention": False,
          "resnet_skip_time_act": False, "time_cond_proj_dim": None, "conv_in_kernel": 3,
          "conv_out_kernel": 3, "attention_type": "default", "cross_attention_norm": None,
          "class_embeddings_concat": False, "mid_block_only_cross_attention": None,
          "reverse_transformer_layers_per_block": None}
# down / up / mid block types of the two diffusers classes: (attention kind, with attention,
# without, mid block)
_KINDS = {"plain": ("AttnDownBlock2D", "AttnUpBlock2D", "UNetMidBlock2D"),
          "transformer": ("CrossAttnDownBlock2D", "CrossAttnUpBlock2D", "UNetMidBlock2DCrossAttn")}
_TRANSFORMER = {"norm1": "norm1", "attn1.to_q": "self_attn.to_q", "attn1.to_k": "self_attn.to_k",
                "attn1.to_v": "self_attn.to_v", "attn1.to_out.0": "self_attn.to_out",
                "norm2": "norm2", "attn2.to_q": "cross_attn.to_q", "attn2.to_k": "cross_attn.to_k",
                "attn2.to_v": "cross_attn.to_v", "attn2.to_out.0": "cross_attn.to_out",
                "norm3": "norm3", "ff.net.0.proj": "ff.proj_in", "ff.net.2": "ff.proj_out"}


def unet_config(config: Mapping, *, concat_channels: int = 0) -> UNetConfig:
    """tinyldm's UNetConfig for a diffusers UNet2DModel config (its config.json as a dict).
    `concat_channels`: how many of the input channels are a concatenated condition (the
    super-resolution model's low-res image: 3)."""
    for key, value in _FIXED.items():
        if config.get(key, value) != value:
            raise ValueError(f"this diffusers UNet has {key}={config[key]!r}; tinyldm's UNet "
                             f"supports only {value!r}")
    widths = tuple(config["block_out_channels"])
    if any(w % widths[0] for w in widths):
        raise ValueError(f"block_out_channels {widths} are not multiples of the first")
    down, up = tuple(config["down_block_types"]), tuple(config["up_block_types"])
    kind = "transformer" if config.get("cross_attention_dim") else "plain"
    attn_down, attn_up, mid_type = _KINDS[kind]
    if config.get("mid_block_type", mid_type) != mid_type:
        raise ValueError(f"mid_block_type {config['mid_block_type']!r}: this model converts with "
                         f"{mid_type!r}")
    attn = [t == attn_down for t in down]
    if any(t not in ("DownBlock2D", attn_down) for t in down):
        raise ValueError(f"down_block_types {down}: only DownBlock2D and {attn_down} convert")
    if list(up) != [attn_up if a else "UpBlock2D" for a in reversed(attn)]:
        raise ValueError(f"up_block_types {up} do not mirror down_block_types {down}")
    shift = config.get("resnet_time_scale_shift", "default")
    if shift not in ("default", "scale_shift"):
        raise ValueError(f"resnet_time_scale_shift={shift!r}: tinyldm has 'default' (added) and "
                         "'scale_shift' (AdaGN)")
    if shift == "scale_shift" and config.get("add_attention", True):
        raise ValueError("resnet_time_scale_shift='scale_shift' with a middle attention block: "
                         "diffusers builds that attention without its GroupNorm, which tinyldm's "
                         "(and CompVis') always has")
    if config.get("attn_norm_num_groups") not in (None, config.get("norm_num_groups", 32)):
        raise ValueError("attn_norm_num_groups differs from norm_num_groups; tinyldm uses one "
                         "group count")
    size = config["sample_size"]
    size = size[0] if isinstance(size, list | tuple) else size
    head_dim, num_heads = _heads(config, widths, attn, kind)
    depth = config.get("transformer_layers_per_block", 1)
    if not isinstance(depth, int):
        raise ValueError(f"transformer_layers_per_block {depth}: tinyldm has one depth for every "
                         "level")
    return UNetConfig(
        in_channels=config.get("in_channels", 3 if kind == "plain" else 4) - concat_channels,
        out_channels=config.get("out_channels", 3 if kind == "plain" else 4),
        concat_channels=concat_channels, latent_size=size, channels=widths[0],
        channel_mult=tuple(w // widths[0] for w in widths),
        num_res_blocks=config.get("layers_per_block", 2),
        attn_resolutions=tuple(size // 2**i for i, a in enumerate(attn) if a),
        mid_attention=config.get("add_attention", True), head_dim=head_dim, num_heads=num_heads,
        transformer_depth=depth,
        attention_block=kind, context_dim=config.get("cross_attention_dim"),
        dropout=config.get("dropout", 0.0),
        scale_shift_norm=shift == "scale_shift", norm_groups=config.get("norm_num_groups", 32),
        norm_eps=config.get("norm_eps", 1e-5), qkv_bias=kind == "plain")


def _heads(config: Mapping, widths: tuple[int, ...], attn: list[bool],
           kind: str) -> tuple[int, int | None]:
    """tinyldm's (head_dim, num_heads). UNet2DModel's `attention_head_dim` is a head width; in
    UNet2DConditionModel it is (for historical reasons) the head *count*, per level or for all,
    unless `num_attention_heads` is given. One head width at every attention level -> head_dim; one
    head count -> num_heads; neither -> refused."""
    if kind == "plain":
        return config.get("attention_head_dim") or widths[-1], None
    heads = config.get("num_attention_heads") or config.get("attention_head_dim") or 8
    heads = [heads] * len(widths) if isinstance(heads, int) else list(heads)
    used = ([(w, h) for w, h, a in zip(widths, heads, attn, strict=True) if a]
            + [(widths[-1], heads[-1])])  # + mid
    if any(w % h for w, h in used):
        raise ValueError(f"{heads} heads do not divide the widths {widths}")
    if len({w // h for w, h in used}) == 1:
        return used[0][0] // used[0][1], None
    if len({h for _, h in used}) == 1:
        return used[0][0] // used[0][1], used[0][1]
    raise ValueError(f"{heads} heads on widths {widths}: neither one head width nor one head count "
                     "at every level")


def key_map(cfg: UNetConfig) -> dict[str, str]:
    """diffusers tensor name prefix -> tinyldm name prefix, for every block of a UNet built from
    `cfg`."""
    levels, nrb = len(cfg.channel_mult), cfg.num_res_blocks
    level_res = [cfg.latent_size // 2**i for i in range(levels)]
    names = {"time_embedding.linear_1": "time_mlp.0", "time_embedding.linear_2": "time_mlp.2",
             "conv_in": "conv_in", "conv_norm_out": "out.0", "conv_out": "out.2"}

    # plain attention, or a Transformer2DModel of `depth` blocks
    def attention_block(src: str, dst: str) -> None:
        if cfg.attention_block == "plain":
            names.update({f"{src}.{a}": f"{dst}.{b}" for a, b in _ATTENTION.items()})
            return
        names.update({f"{src}.{leaf}": f"{dst}.{leaf}" for leaf in ("norm", "proj_in", "proj_out")})
        for d in range(cfg.transformer_depth):
            names.update({f"{src}.transformer_blocks.{d}.{a}": f"{dst}.blocks.{d}.{b}" for a, b in
                          _TRANSFORMER.items()})

    # resnets[j] (+ attentions[j]) -> one stage
    def block(src: str, j: int, dst: str, attention: bool) -> None:
        for a, b in _RESNET.items():
            names[f"{src}.resnets.{j}.{a}"] = f"{dst}.0.{b}"
        if attention:
            attention_block(f"{src}.attentions.{j}", f"{dst}.1")

    k = 0
    for i in range(levels):
        for j in range(nrb):
            block(f"down_blocks.{i}", j, f"down.{k}", level_res[i] in cfg.attn_resolutions)
            k += 1
        if i < levels - 1:
            names[f"down_blocks.{i}.downsamplers.0.conv"] = f"down.{k}.0.conv"
            k += 1
    for a, b in _RESNET.items():
        names[f"mid_block.resnets.0.{a}"] = f"mid.0.{b}"
        names[f"mid_block.resnets.1.{a}"] = f"mid.{2 if cfg.mid_attention else 1}.{b}"
    if cfg.mid_attention:
        attention_block("mid_block.attentions.0", "mid.1")
    k = 0
    for n, i in enumerate(reversed(range(levels))):
        attention = level_res[i] in cfg.attn_resolutions
        for j in range(nrb + 1):
            block(f"up_blocks.{n}", j, f"up.{k}", attention)
            if i > 0 and j == nrb:
                names[f"up_blocks.{n}.upsamplers.0.conv"] = f"up.{k}.{2 if attention else 1}.conv"
            k += 1
    return names


def unet_state_dict(state: Mapping[str, Tensor], cfg: UNetConfig) -> dict[str, Tensor]:
    """A diffusers UNet2DModel / UNet2DConditionModel state dict -> tinyldm UNet state dict for
    `cfg` (see `unet_config`). Raises, naming them, if any diffusers tensor is left unused or any
    tinyldm tensor unfilled, or if a shape differs."""
    prefixes = key_map(cfg)
    with torch.device("meta"):  # the target's names and shapes, without allocating its weights
        target = UNet(cfg).state_dict()
    out, unused = {}, []
    for name, tensor in state.items():
        prefix, _, leaf = name.rpartition(".")
        if prefix not in prefixes:
            unused.append(name)
            continue
        new = f"{prefixes[prefix]}.{leaf}"
        if new not in target:
            unused.append(name)
            continue
        if tuple(target[new].shape) != tuple(tensor.shape):
            raise ValueError(f"{name} {tuple(tensor.shape)} -> {new} {tuple(target[new].shape)}: "
                             "shapes differ")
        out[new] = tensor
    missing = sorted(set(target) - set(out))
    if unused or missing:
        raise ValueError(f"the conversion does not cover the model: {len(unused)} diffusers "
                         f"tensors unused ({unused[:5]}), {len(missing)} tinyldm tensors unfilled "
                         f"({missing[:5]})")
    return out


def build_unet(config: Mapping, state: Mapping[str, Tensor], *, concat_channels: int = 0) -> UNet:
    """tinyldm's UNet (eval mode) from a diffusers UNet's config dict and state dict."""
    cfg = unet_config(config, concat_channels=concat_channels)
    weights = unet_state_dict(state, cfg)  # checked against cfg's shapes before building
    unet = UNet(cfg)
    unet.load_state_dict(weights)
    return unet.eval()


def unet_from_diffusers(model, *, concat_channels: int = 0) -> UNet:
    """A diffusers UNet2DModel or UNet2DConditionModel (an instance) -> tinyldm's UNet with the same
    weights, in eval mode. A conditional model's `context` is what diffusers calls
    `encoder_hidden_states`."""
    return build_unet(dict(model.config), model.state_dict(), concat_channels=concat_channels)


def diffusers_unet_config(cfg: UNetConfig) -> dict:
    """The diffusers config of a tinyldm UNet: UNet2DModel's for plain attention without a
    condition, UNet2DConditionModel's (it has `cross_attention_dim`) for transformer blocks that
    cross-attend to a context (tinyldm's class- and text-conditional models). Refused, with the
    reason, where neither can express it."""
    levels = len(cfg.channel_mult)
    widths = tuple(cfg.channels * m for m in cfg.channel_mult)
    attn = [cfg.latent_size // 2**i in cfg.attn_resolutions for i in range(levels)]
    if cfg.num_classes:
        raise ValueError("a class embedding added to the timestep embedding "
                         "(UNetConfig.num_classes) does not export")
    common = dict(sample_size=cfg.latent_size, in_channels=cfg.in_channels + cfg.concat_channels,
                  out_channels=cfg.out_channels, block_out_channels=widths,
                  layers_per_block=cfg.num_res_blocks,
                  norm_num_groups=cfg.norm_groups, norm_eps=cfg.norm_eps, dropout=cfg.dropout,
                  resnet_time_scale_shift="scale_shift" if cfg.scale_shift_norm else "default")
    if cfg.attention_block == "transformer":
        if cfg.context_dim is None:
            raise ValueError("transformer blocks without cross-attention have no diffusers "
                             "counterpart (diffusers' transformer blocks always cross-attend): "
                             "only conditional transformer UNets export")
        if not cfg.mid_attention:
            raise ValueError("UNet2DConditionModel's middle block always has a transformer "
                             "(mid_attention=False)")
        heads = tuple(w // head_width(cfg, w) if w % head_width(cfg, w) == 0 else 1 for w in widths)
        return dict(common, cross_attention_dim=cfg.context_dim,
                    transformer_layers_per_block=cfg.transformer_depth,
                    # UNet2DConditionModel's name for the head *count* per level
                    attention_head_dim=heads,
                    down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D"
                                           for a in attn),
                    up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D"
                                         for a in reversed(attn)))
    if cfg.scale_shift_norm and cfg.mid_attention:
        raise ValueError("scale_shift_norm with a middle attention block: diffusers would drop "
                         "that block's GroupNorm")
    head_widths = ({head_width(cfg, w) for w, a in zip(widths, attn, strict=True) if a}
                   | {head_width(cfg, widths[-1])})
    if len(head_widths) > 1:
        raise ValueError(f"head widths {sorted(head_widths)} differ between levels; UNet2DModel "
                         "has one head width")
    return dict(common, attention_head_dim=head_widths.pop(), add_attention=cfg.mid_attention,
                down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
                up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)))


def unet_to_diffusers(unet: UNet):
    """tinyldm's UNet -> a diffusers UNet2DModel (plain attention, no condition) or
    UNet2DConditionModel (cross-attention; tinyldm's `context` is its `encoder_hidden_states`) with
    the same weights, in eval mode. A plain UNet without q / k / v biases gets zero biases, which
    diffusers' plain attention always has."""
    import diffusers

    cfg = unet.cfg
    config = diffusers_unet_config(cfg)
    model = (diffusers.UNet2DConditionModel if "cross_attention_dim" in config
             else diffusers.UNet2DModel)(**config)
    inverse = {ours: theirs for theirs, ours in key_map(cfg).items()}
    state = {}
    for name, tensor in unet.state_dict().items():
        prefix, _, leaf = name.rpartition(".")
        state[f"{inverse[prefix]}.{leaf}"] = tensor
    for name, tensor in model.state_dict().items():
        if (name not in state and name.endswith(("to_q.bias", "to_k.bias", "to_v.bias"))
                and not cfg.qkv_bias):
            state[name] = torch.zeros_like(tensor)
    model.load_state_dict(state)  # strict: every tensor of both sides accounted for
    return model.eval()
