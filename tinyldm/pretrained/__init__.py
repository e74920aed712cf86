"""The paper's released models, run by tinyldm's own code: their diffusers-format weights converted
by name.

    from tinyldm.pretrained import load
    model = load("CompVis/ldm-celebahq-256")        # a hub id (needs the `pretrained` extra and
                                                      internet once)
    model = load("path/to/ldm-celebahq-256")        # or a local diffusers-format folder named
                                                      after the release:
    # hf download CompVis/ldm-celebahq-256 --local-dir ldm-celebahq-256
      (the folder's name selects RELEASES' entry)
    images = model.generate(n=4, steps=50)           # (4, 3, 256, 256) in [-1, 1], through
                                                       tinyldm's sampler

    unet.py          diffusers' UNet2DModel (the unconditional and concat-conditioned releases) and
                     UNet2DConditionModel (text-to-image: cross-attention) <-> tinyldm's UNet
    autoencoder.py   diffusers' VQModel / AutoencoderKL (vq-f4, kl-f8) <-> tinyldm's Autoencoder
    ldmbert.py       the text-to-image release's text encoder (LDMBert) and its WordPiece tokenizer

The reverse way (`unet_to_diffusers`, `autoencoder_to_diffusers`) exports a model trained here that
diffusers' classes can express (plain attention, no condition; num_res_blocks + 1 decoder blocks)
for diffusers' pipelines.

A folder is read as diffusers writes it: `model_index.json`, and `unet/`, `vqvae/` (or `vae/`),
`scheduler/`, each with a `config.json` and `diffusion_pytorch_model.safetensors` (read with
safetensors) or `.bin` (read with `torch.load(weights_only=True)`): no code is ever unpickled.

Where the hub's files disagree with how CompVis trained a release, tinyldm follows the paper
(`RELEASES`):

* `CompVis/ldm-celebahq-256` has no `scaling_factor` in its VQ config, so diffusers' LDMPipeline
  divides the latents by its default 0.18215 before decoding and draws broken images; CompVis
  trained this LDM on the VQ latents as they are (`scale_factor` 1.0 in celebahq-ldm-vq-4.yaml's
  LatentDiffusion default, `scale_by_std` off). tinyldm uses 1.0.
* Its scheduler config has `steps_offset` 0; CompVis' DDIM ("uniform" spacing) visits
  t = 1, 21, ..., 981 for 50 steps, i.e. an offset of 1. tinyldm's sampler uses that spacing for
  every model.
* The noise schedule is set from each release's CompVis config (sqrt-linear betas, T = 1000;
  0.0015 to 0.0195 for CelebA-HQ, 0.0015 to 0.0155 for super-resolution, 0.00085 to 0.012 for
  text-to-image), not read.

* The text-to-image release's KL latents are scaled by 0.18215 (txt2img-1p4B-eval.yaml's
  scale_factor, which the hub's VAE config also has).

The text-to-image release adds `bert/` (LDMBert) and `tokenizer/` folders; its `generate` takes
prompts:

    model = load("CompVis/ldm-text2im-large-256")
    images = model.generate(prompts=["a painting of a squirrel eating a burger"],
                            guidance_scale=5.0)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from tinyldm.autoencoder import Autoencoder
from tinyldm.cli import UsageError
from tinyldm.conditioning import ConditionConfig, ConditionEncoder
from tinyldm.ldm import Denoiser, DiffusionConfig, decode_latents, generate, generate_latents
from tinyldm.memory import check_weights
from tinyldm.pretrained.autoencoder import (
    autoencoder_config,
    autoencoder_from_diffusers,
    autoencoder_state_dict,
)
from tinyldm.pretrained.ldmbert import (
    LDMBert,
    LDMBertCondition,
    LDMBertConfig,
    WordPieceTokenizer,
    ldmbert_state_dict,
)
from tinyldm.pretrained.unet import unet_config, unet_from_diffusers, unet_state_dict
from tinyldm.schedule import NoiseSchedule
from tinyldm.unet import UNet

__all__ = ["RELEASES", "PretrainedLDM", "Release", "autoencoder_from_diffusers", "load",
           "unet_from_diffusers"]


@dataclass(frozen=True)
class Release:
    """What tinyldm needs to know about a released model beyond its files (see the module
    docstring)."""
    first_stage: str  # "vq" or "kl"
    scale_factor: float  # latents are multiplied by this before diffusion, divided before decoding
    # channels of a concatenated condition (super-resolution: the low-res image)
    concat_channels: int = 0
    schedule: dict = field(default_factory=lambda: {"schedule": "scaled_linear", "T": 1000,
                                                    "beta_start": 0.0015, "beta_end": 0.0195})
    note: str = ""


RELEASES = {
    "CompVis/ldm-celebahq-256": Release("vq", 1.0, note="unconditional CelebA-HQ faces, 256 px, "
                                                        "LDM-4 (vq-f4)"),
    "CompVis/ldm-super-resolution-4x-openimages": Release(
        "vq", 1.0, concat_channels=3,
        schedule={"schedule": "scaled_linear", "T": 1000, "beta_start": 0.0015,
                  "beta_end": 0.0155},  # models/ldm/bsr_sr/config.yaml
        note="4x super-resolution (the low-res image concatenated to z_t), LDM-4"),
    "CompVis/ldm-text2im-large-256": Release(
        "kl", 0.18215, schedule={"schedule": "scaled_linear", "T": 1000, "beta_start": 0.00085,
                                 "beta_end": 0.012},
        note="text-to-image (LAION-400M, 256 px): LDMBert text encoder, cross-attention UNet, "
             "LDM-8 (kl-f8)"),
}


@dataclass
class PretrainedLDM:
    """A released LDM in tinyldm's modules: `denoiser` (the UNet, and LDMBert for the text-to-image
    release: no condition encoder otherwise), `schedule`, `autoencoder`."""
    denoiser: Denoiser
    schedule: NoiseSchedule
    autoencoder: Autoencoder
    diffusion: DiffusionConfig
    image_size: int
    source: str

    @property
    def latent_size(self) -> int:
        return self.image_size // self.autoencoder.downsample_factor

    def to(self, device: str | torch.device) -> PretrainedLDM:
        self.denoiser, self.autoencoder = self.denoiser.to(device), self.autoencoder.to(device)
        self.schedule = self.schedule.to(device)
        return self

    @property
    def prompted(self) -> bool:
        """True for the text-to-image release: generate() takes prompts."""
        return isinstance(self.denoiser.cond, LDMBertCondition)

    @torch.no_grad()
    def generate(self, n: int = 1, *, prompts: list[str] | None = None, steps: int = 50,
                 eta: float = 0.0, method: str = "ddim", guidance_scale: float = 1.0,
                 concat: Tensor | None = None,
                 generator: torch.Generator | None = None, z_T: Tensor | None = None) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1], sampled with tinyldm's samplers (`method`: ddim, ddpm,
        plms, dpmpp; CompVis' uniform spacing).

        Unconditional releases draw `n` images; the super-resolution release one per `concat` image;
        the text-to-image release one per prompt, with classifier-free guidance against the empty
        prompt when guidance_scale != 1 (CompVis' txt2img script uses 5). `z_T`, if given, is the
        starting noise (one image per z_T[i]) instead of a draw."""
        if self.prompted != (prompts is not None):
            raise ValueError(f"{self.source} {'needs' if self.prompted else 'takes no'} prompts")
        options = dict(steps=steps, eta=eta, method=method, guidance_scale=guidance_scale,
                       generator=generator, concat=concat)
        if z_T is not None:
            z0 = generate_latents(self.denoiser, self.schedule, z_T, prompts, **options)
            return decode_latents(self.autoencoder, z0)
        side = self.latent_size if concat is None else concat.shape[-1]
        return generate(self.denoiser, self.schedule, self.autoencoder, prompts, n=n,
                        latent_size=(side, side), **options)


def _weights(folder: Path) -> dict[str, Tensor]:
    """A component's tensors: safetensors if present, else a PyTorch file read with
    weights_only=True. A file larger than the free memory is refused unread; a file that is not
    one ends in one line naming it."""
    for name in ("diffusion_pytorch_model.safetensors", "model.safetensors",
                 "diffusion_pytorch_model.bin", "pytorch_model.bin"):  # diffusers', transformers'
        path = folder / name
        if not path.exists():
            continue
        check_weights(str(path), path.stat().st_size, reading=True)
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return _refusing(path, "is not a safetensors file", lambda p=path: load_file(str(p)))
        # tensors only, never code
        state = _refusing(path, "is not a PyTorch weights file", lambda p=path: torch.load(
            p, map_location="cpu", weights_only=True))
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise UsageError(f"{path} holds no plain dict of tensors")
        return state
    raise FileNotFoundError("no weights (diffusion_pytorch_model / model .safetensors, or .bin) in "
                            f"{folder}")


# config.json entries read as sizes: each must be a positive whole number (or a list of them)
_SIZES = ("block_out_channels", "sample_size", "in_channels", "out_channels", "layers_per_block",
          "norm_num_groups", "latent_channels", "num_vq_embeddings", "vq_embed_dim",
          "cross_attention_dim", "attention_head_dim", "transformer_layers_per_block",
          "vocab_size", "max_position_embeddings", "d_model", "encoder_layers",
          "encoder_attention_heads", "head_dim", "encoder_ffn_dim", "num_train_timesteps")


def _config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: is {folder.parent} a diffusers-format model "
                                "folder?")
    config = _refusing(path, "is not JSON", lambda: json.loads(path.read_bytes()))
    if not isinstance(config, dict):
        raise UsageError(f"{path} is not a JSON object (a damaged or crafted file)")
    for key in _SIZES:
        value = config.get(key)
        values = value if isinstance(value, list) else [value]
        if value is not None and (not values or not all(
                isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 2**20
                for v in values)):
            raise UsageError(f"{path}: {key} = {value!r} is not a size (a whole number from 1 to "
                             f"2^20, or a list of them): a damaged or crafted file; nothing was "
                             "built from it")
    return config


def _refusing(path: Path, what: str, read):
    """read(), with a file that cannot be read as expected ending in one line naming it."""
    import pickle

    try:
        from safetensors import SafetensorError
    except ImportError:  # without safetensors only .bin files are read
        SafetensorError = OSError  # noqa: N806

    try:
        return read()
    except (ValueError, KeyError, TypeError, AttributeError, IndexError, RuntimeError,
            OverflowError, EOFError, OSError, pickle.UnpicklingError, SafetensorError) as e:
        # json's, safetensors', the zip reader's, a conversion's errors (a bug keeps its traceback)
        reason = str(e).splitlines()[0] if str(e) else ""
        raise UsageError(f"{path} {what} ({type(e).__name__}: {reason}): a damaged or crafted "
                         "file; nothing was built from it") from e


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise UsageError(f"{repo_id!r} is not a local folder, and downloading it needs "
                         "huggingface_hub: pip install -e '.[pretrained]' (or pass the path of a "
                         "downloaded copy)") from e
    try:
        path = Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt"]))
        # a component published only as a .bin: fetch that instead
        for part in ("unet", "vqvae", "vae", "bert"):
            if (path / part).is_dir() and not list((path / part).glob("*.safetensors")):
                path = Path(snapshot_download(repo_id, allow_patterns=[f"{part}/*.bin"]))
        return path
    except Exception as e:  # offline, unknown id, gated: one line that says what happened
        raise UsageError(f"could not download {repo_id!r} ({type(e).__name__}: {e}); where the hub "
                         f"can be reached, run `hf download {repo_id} --local-dir "
                         f"{repo_id.split('/')[-1]}` and pass that folder") from e


def load(id_or_path: str | os.PathLike, *, release: str | None = None,
         device: str | torch.device = "cpu") -> PretrainedLDM:
    """A released LDM from a diffusers-format folder or a hub id, in tinyldm's modules (eval mode,
    on `device`). `release`: which entry of RELEASES a local folder is (default: the folder's name
    matched against the ids; a folder that matches none is read with its own scheduler config and
    the VQ latents unscaled, or a folder `tinyldm.pretrained.export` wrote with the scale factor it
    kept in tinyldm.json).

    Nothing is built before every config has been read, each of its sizes checked, every stored
    tensor matched by name and shape against what the config implies (on the meta device), and
    the weights' total checked against the free memory of the CPU and `device`: a damaged or
    crafted folder ends in one line naming the file."""
    path = Path(id_or_path)
    name = str(id_or_path)
    if not path.exists():
        if name not in RELEASES:
            raise UsageError(f"{name!r} is neither a folder nor a known release "
                             f"({', '.join(RELEASES)})")
        path = _download(name)
    key = release or next((r for r in RELEASES if r.split("/")[-1] == path.name or r == name), None)
    info = RELEASES.get(key) if key else None
    index = (_refusing(path / "model_index.json", "is not JSON",
                       lambda: json.loads((path / "model_index.json").read_bytes()))
             if (path / "model_index.json").exists() else {})
    first_stage_dir = next((path / d for d in ("vqvae", "vae") if (path / d).exists()), None)
    if first_stage_dir is None or not (path / "unet").exists():
        raise FileNotFoundError(f"{path} has no unet/ and vqvae/ (or vae/) folders: not an LDM "
                                "pipeline folder")
    ae_cfg_dict = _config(first_stage_dir)
    regularizer = (info.first_stage if info
                   else ("vq" if "num_vq_embeddings" in ae_cfg_dict else "kl"))
    unet_cfg_dict = _config(path / "unet")
    concat = info.concat_channels if info else max(0, unet_cfg_dict.get("in_channels", 3)
                                                   - unet_cfg_dict.get("out_channels", 3))
    exported = (path / "tinyldm.json").exists()  # a model trained here: its own scale
    scale = (info.scale_factor if info else _exported_scale(path) if exported
             else 1.0 if regularizer == "vq" else ae_cfg_dict.get("scaling_factor", 0.18215))
    # configs -> tinyldm's, stored tensors -> tinyldm's names, each checked against the shapes the
    # config implies on the meta device: nothing is allocated for a config the weights do not fit
    unet_cfg, unet_sd = _refusing(path / "unet", "does not hold the UNet its config.json describes",
                                  lambda: _converted(unet_config(unet_cfg_dict,
                                                                 concat_channels=concat),
                                                     path / "unet", unet_state_dict))
    ae_cfg, ae_sd = _refusing(first_stage_dir, "does not hold the autoencoder its config.json "
                              "describes", lambda: _converted(
                                  autoencoder_config(ae_cfg_dict, regularizer=regularizer),
                                  first_stage_dir, autoencoder_state_dict))
    bert = None
    if (path / "bert").exists():  # the text-to-image release: LDMBert reads the prompt
        if not (path / "tokenizer").exists():
            raise FileNotFoundError(f"{path} has bert/ but no tokenizer/ folder")
        bert_cfg_dict = _config(path / "bert")
        bert = _refusing(path / "bert", "does not hold the LDMBert its config.json describes",
                         lambda: _converted(LDMBertConfig.from_diffusers(bert_cfg_dict),
                                            path / "bert", ldmbert_state_dict))
    parts = [unet_sd, ae_sd] + ([bert[1]] if bert else [])
    check_weights(str(path), sum(4 * t.numel() for sd in parts for t in sd.values()), device)
    schedule = dict(info.schedule) if info else _scheduler(path)
    diffusion = DiffusionConfig(**schedule, prediction="eps")
    unet = UNet(unet_cfg)
    unet.load_state_dict(unet_sd)
    ae = Autoencoder(ae_cfg)
    ae.load_state_dict(ae_sd)
    ae.scale_factor.fill_(scale)
    if bert:
        encoder = LDMBert(bert[0])
        encoder.load_state_dict(bert[1])
        cond = LDMBertCondition(encoder.eval(), WordPieceTokenizer(path / "tokenizer",
                                                                   max_len=bert[0].max_len))
    else:
        cond = ConditionEncoder(ConditionConfig(kind="none"))
    denoiser = Denoiser(unet.eval(), cond).eval()
    image_size = unet_cfg.latent_size * ae.downsample_factor
    return PretrainedLDM(denoiser, diffusion.make_schedule(), ae.eval(), diffusion, image_size,
                         source=f"{name} ({index.get('_class_name', 'a diffusers pipeline')})"
                         ).to(device)


def _exported_scale(folder: Path) -> float:
    """The latent scale factor that `tinyldm.pretrained.export` kept in tinyldm.json."""
    path = folder / "tinyldm.json"
    entry = _refusing(path, "is not JSON", lambda: json.loads(path.read_bytes()))
    scale = entry.get("scale_factor") if isinstance(entry, dict) else None
    if not isinstance(scale, int | float) or not 0 < scale < 1e6:
        raise UsageError(f"{path}: scale_factor must be a positive number, got {scale!r}: a "
                         "damaged or crafted file; nothing was built from it")
    return float(scale)


def _converted(cfg, folder: Path, convert) -> tuple:
    """(cfg, the folder's tensors under tinyldm's names): `convert` refuses any tensor left unused
    or unfilled, or of another shape than `cfg` implies."""
    return cfg, convert(_weights(folder), cfg)


def _scheduler(path: Path) -> dict:
    """An unknown folder's noise schedule: its own scheduler config, diffusers' names mapped to
    tinyldm's."""
    sched_file = path / "scheduler" / "scheduler_config.json"
    sched = (_refusing(sched_file, "is not JSON", lambda: json.loads(sched_file.read_bytes()))
             if sched_file.exists() else {})
    kinds = {"scaled_linear": "scaled_linear", "linear": "linear", "squaredcos_cap_v2": "cosine"}
    if sched.get("beta_schedule", "scaled_linear") not in kinds:
        raise ValueError(f"beta_schedule {sched['beta_schedule']!r} has no tinyldm counterpart")
    return {"schedule": kinds[sched.get("beta_schedule", "scaled_linear")],
            "T": sched.get("num_train_timesteps", 1000),
            "beta_start": sched.get("beta_start"), "beta_end": sched.get("beta_end")}
