"""The paper's text-to-image release through tinyldm: LDMBert and its WordPiece tokenizer, the
cross-attention UNet at the release's full size, and the whole guided sampling loop, each against
diffusers / transformers on random weights, offline."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers",
                                reason="the reference implementation: pip install -e '.[dev]'")
transformers = pytest.importorskip("transformers",
                                   reason="diffusers' LDMBert needs it: pip install -e '.[dev]'")
pytest.importorskip("tokenizers", reason="the WordPiece tokenizer: pip install -e '.[dev]'")

from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import (  # noqa: E402
    LDMBertConfig,
    LDMBertModel,
)
from test_pretrained import KL_F8, randomised  # noqa: E402

from tinyldm.pretrained import load  # noqa: E402
from tinyldm.pretrained.ldmbert import (  # noqa: E402
    LDMBert,
    WordPieceTokenizer,
    key_map,
    ldmbert_from_diffusers,
    ldmbert_state_dict,
)
from tinyldm.pretrained.ldmbert import LDMBertConfig as OurConfig  # noqa: E402
from tinyldm.pretrained.unet import unet_config, unet_from_diffusers, unet_state_dict  # noqa: E402
from tinyldm.unet import UNet  # noqa: E402

# The released text-to-image UNet (CompVis txt2img-1p4B-eval.yaml, as diffusers names it): 8 heads
# at every level, transformer blocks at the three upper levels, cross-attention to 1280-wide LDMBert
# tokens, GroupNorm eps 1e-5.
TEXT2IM_UNET = dict(sample_size=32, in_channels=4, out_channels=4,
                    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                    attention_head_dim=8, cross_attention_dim=1280, norm_eps=1e-5,
                    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "painting", "of", "squirrel", "##s",
         "eat", "##ing", "burger", "!", ",", ".", "cafe", "the", "red", "un", "##known", "photo",
         "-", "'", "dog", "##gy", "on"]


@pytest.fixture
def vocab(tmp_path):
    (tmp_path / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    return tmp_path


PROMPTS = ["A painting of squirrels eating a burger!", "", "Café, unknown zebra.",
           "  THE  doggy's photo-on-a-cafe ", "a " * 100, "e\u0301a\u0301t\u00ecng\tthe\nred"]


def test_the_tokenizer_gives_berts_ids(vocab):
    """Against transformers' pure-Python BertTokenizer (the algorithm the release was trained with):
    lower case, accents stripped, punctuation split, longest piece first, unknown words -> [UNK],
    cut to 77 with [SEP] kept."""
    reference = transformers.BertTokenizerLegacy(str(vocab / "vocab.txt"), do_lower_case=True)
    want = reference(PROMPTS, padding="max_length", max_length=77, truncation=True,
                     return_tensors="pt").input_ids
    ours = WordPieceTokenizer(vocab)
    got = ours(PROMPTS)
    assert got.shape == (len(PROMPTS), 77) and torch.equal(got, want)
    assert ours.pieces("Squirrels eating") == ["squirrel", "##s", "eat", "##ing"]
    assert ours.truncated(PROMPTS) == [False, False, False, False, True, False]
    # [SEP] kept when cut; "" is [CLS] [SEP] [PAD]...
    assert got[4, -1] == 3 and got[1, :3].tolist() == [2, 3, 0]


def test_a_saved_tokenizer_folder_reads_the_same(vocab, tmp_path):
    """What save_pretrained writes today (tokenizer.json, no vocab.txt) reads as the release's
    vocab.txt does."""
    transformers.BertTokenizer(str(vocab / "vocab.txt")).save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved" / "vocab.txt").exists()
    assert torch.equal(WordPieceTokenizer(tmp_path / "saved")(PROMPTS),
                       WordPieceTokenizer(vocab)(PROMPTS))
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor vocab.txt"):
        WordPieceTokenizer(tmp_path / "saved" / "nothing-here")


def _reference_bert(**kw) -> LDMBertModel:
    config = LDMBertConfig(**{"vocab_size": len(WORDS), "max_position_embeddings": 77, **kw})
    return randomised(LDMBertModel(config))


def test_ldmbert_computes_what_diffusers_computes():
    """Reduced depth and width (same structure: inner attention width narrower than the model, no
    q/k/v bias)."""
    reference = _reference_bert(d_model=96, encoder_layers=3, encoder_attention_heads=4,
                                head_dim=16, encoder_ffn_dim=384)
    ours = ldmbert_from_diffusers(reference)
    ids = torch.randint(0, len(WORDS), (3, 77), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = reference(ids).last_hidden_state, ours(ids)
        other = ours(ids.roll(1, dims=1))
    assert want.abs().max() > 0.5 and (got - want).abs().max() < 1e-5 * float(want.abs().max())
    assert (other - want).abs().max() > 0.1  # token order (the positions) matters


@pytest.mark.slow
def test_the_full_size_ldmbert_computes_what_diffusers_computes():
    """The release's size (32 layers, 1280 wide, 30522 tokens: 543 M parameters with the unused LM
    head)."""
    reference = randomised(LDMBertModel(LDMBertConfig()))
    state = reference.state_dict()
    assert sum(v.numel() for v in state.values()) > 500e6
    cfg = OurConfig.from_diffusers(reference.config.to_dict())
    converted = ldmbert_state_dict(state, cfg)
    assert (set(converted) == set(LDMBert(cfg).state_dict())
            and len(converted) == len(state) - 2)  # all but to_logits
    ours = ldmbert_from_diffusers(reference)
    ids = torch.randint(0, 30522, (2, 77), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = reference(ids).last_hidden_state, ours(ids)
    assert (got - want).abs().max() < 1e-5 * float(want.abs().max())


def test_ldmbert_conversion_names_what_is_wrong():
    reference = _reference_bert(d_model=32, encoder_layers=2, encoder_attention_heads=2, head_dim=8,
                                encoder_ffn_dim=64)
    state, cfg = reference.state_dict(), OurConfig.from_diffusers(reference.config.to_dict())
    assert len(key_map(cfg)) == len(state) - 2
    with pytest.raises(ValueError,
                       match=r"1 tinyldm tensors unfilled \(\['layers.1.to_v.weight'\]"):
        ldmbert_state_dict({k: v for k, v in state.items()
                            if k != "model.layers.1.self_attn.v_proj.weight"}, cfg)
    with pytest.raises(ValueError, match="1 diffusers tensors unused"):
        ldmbert_state_dict({**state, "model.layers.2.fc1.weight": torch.zeros(1)}, cfg)
    with pytest.raises(ValueError, match="activation_function"):
        OurConfig.from_diffusers({"activation_function": "relu"})


# ----------------------------------------------------------------------------------------------
# the UNet

def test_every_tensor_of_the_full_size_text2im_unet_is_mapped():
    """At full size (872 M parameters, on the meta device): every diffusers tensor has one place,
    every slot is filled, and the shape is the paper's: 320 channels, mult 1, 2, 4, 4, 8 heads
    of 40 / 80 / 160."""
    with torch.device("meta"):
        reference = diffusers.UNet2DConditionModel(**TEXT2IM_UNET)
    cfg = unet_config(dict(reference.config))
    assert (cfg.channels, cfg.channel_mult, cfg.attn_resolutions, cfg.num_heads,
            cfg.context_dim) == (320, (1, 2, 4, 4), (32, 16, 8), 8, 1280)
    state = reference.state_dict()
    converted = unet_state_dict(state, cfg)
    n = sum(v.numel() for v in converted.values())
    assert len(converted) == len(state) and 871e6 < n < 873e6
    with torch.device("meta"):
        assert set(converted) == set(UNet(cfg).state_dict())


@pytest.mark.slow
def test_the_full_size_text2im_unet_computes_what_diffusers_computes():
    """The release's UNet at its size, random weights, a 77 x 1280 context: the same eps to float32
    rounding."""
    reference = randomised(diffusers.UNet2DConditionModel(**TEXT2IM_UNET))
    ours = unet_from_diffusers(reference)
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(1, 4, 32, 32, generator=g), torch.randn(1, 77, 1280, generator=g)
    with torch.no_grad():
        want = reference(x, torch.tensor([500]), encoder_hidden_states=context).sample
        got = ours(x, torch.tensor([500]), context=context)
    assert want.abs().max() > 0.5 and (got - want).abs().max() < 1e-5 * float(want.abs().max())


# ----------------------------------------------------------------------------------------------
# the whole loop

def _text2im_pipeline(vocab, folder, *, steps_offset: int = 1):
    """An LDMTextToImagePipeline with the release's structure at a small width and random weights,
    saved as diffusers saves it."""
    bert = _reference_bert(d_model=32, encoder_layers=2, encoder_attention_heads=2, head_dim=16,
                           encoder_ffn_dim=64)
    unet = randomised(diffusers.UNet2DConditionModel(**{**TEXT2IM_UNET, "sample_size": 8,
                                                        "cross_attention_dim": 32,
                                                        "block_out_channels": (32, 64, 64, 64),
                                                        "norm_num_groups": 8,
                                                        "attention_head_dim": 2}), 2)
    vae = randomised(diffusers.AutoencoderKL(**KL_F8, block_out_channels=(32, 32, 64, 64),
                                             norm_num_groups=8), 3)
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012,
                                        beta_schedule="scaled_linear", clip_sample=False,
                                        set_alpha_to_one=True, steps_offset=steps_offset)
    tokenizer = transformers.BertTokenizer(str(vocab / "vocab.txt"))
    pipe = diffusers.LDMTextToImagePipeline(vqvae=vae, bert=bert, tokenizer=tokenizer, unet=unet,
                                            scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder)
    return pipe


@pytest.mark.parametrize("guidance", [1.0, 6.0])
def test_a_saved_text2im_pipeline_samples_the_same_images_through_tinyldm(vocab, tmp_path,
                                                                          guidance):
    """Diffusers' LDMTextToImagePipeline (DDIM, 10 steps, CompVis' spacing) and tinyldm's sampler on
    the loaded folder, same prompts and starting noise: the same images, with and without
    classifier-free guidance."""
    folder = tmp_path / "ldm-text2im-large-256"
    pipe = _text2im_pipeline(vocab, folder)
    model = load(folder)
    assert abs(float(model.autoencoder.scale_factor) - 0.18215) < 1e-7 and model.image_size == 64
    prompts = ["a painting of a squirrel eating a burger", "a red doggy on the cafe"]
    want = pipe(prompts, num_inference_steps=10, guidance_scale=guidance,
                generator=torch.Generator().manual_seed(0), output_type="np").images
    # what the pipeline drew
    z_T = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    got = (model.generate(prompts=prompts, steps=10, guidance_scale=guidance, z_T=z_T) + 1) / 2
    want = torch.from_numpy(want).permute(0, 3, 1, 2)
    assert want.std() > 0.05 and (got - want).abs().max() < 1e-4
    other = (model.generate(prompts=prompts[::-1], steps=10, guidance_scale=guidance,
                            z_T=z_T) + 1) / 2
    assert (other - want).abs().max() > 1e-2  # the prompt is really read


def test_the_sample_script_takes_prompts_for_the_text_release(vocab, tmp_path, capsys):
    import sample

    folder = tmp_path / "ldm-text2im-large-256"
    _text2im_pipeline(vocab, folder)
    r = sample.main(["--pretrained", str(folder), "--prompt", "a red doggy", "--prompt",
                     "a squirrel " * 80, "--n", "2", "--steps", "3", "--guidance", "5",
                     "--device", "cpu", "--out", str(tmp_path / "g.png")])
    assert r["images"] == 4 and (tmp_path / "g.png").exists()
    assert "1 prompt(s) longer than the model's 77 tokens are cut there" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="text-to-image: pass at least one --prompt"):
        sample.main(["--pretrained", str(folder), "--device", "cpu"])


def test_pytorch_bin_weights_load_without_unpickling_code_and_missing_extras_are_named(
        vocab, tmp_path, monkeypatch):
    """A folder whose LDMBert is a pytorch_model.bin (transformers' older format) loads through
    torch.load(weights_only=True); a missing `tokenizers` is one clear line."""
    import sys

    folder = tmp_path / "ldm-text2im-large-256"
    pipe = _text2im_pipeline(vocab, folder)
    for f in (folder / "bert").glob("*.safetensors"):
        f.unlink()
    # what older transformers wrote
    torch.save(pipe.bert.state_dict(), folder / "bert" / "pytorch_model.bin")
    ids = torch.randint(0, len(WORDS), (1, 77), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got, want = load(folder).denoiser.cond.bert(ids), pipe.bert(ids).last_hidden_state
    assert (got - want).abs().max() < 1e-5 * float(want.abs().max())
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(SystemExit,
                       match=r"needs the `tokenizers` package: pip install -e '.\[pretrained\]'"):
        load(folder)


def test_a_hub_download_fetches_bin_weights_only_where_there_are_no_safetensors(vocab, tmp_path,
                                                                                monkeypatch):
    """What `load("CompVis/...")` asks the hub for, with snapshot_download replaced by a local
    copy."""
    import shutil
    import sys
    import types

    from tinyldm.pretrained import _download

    folder = tmp_path / "hub"
    pipe = _text2im_pipeline(vocab, folder)
    for f in (folder / "bert").glob("*.safetensors"):
        f.unlink()
    asked = []

    def snapshot_download(repo_id, allow_patterns):
        asked.append(allow_patterns)
        return str(folder)

    monkeypatch.setitem(sys.modules, "huggingface_hub",
                        types.SimpleNamespace(snapshot_download=snapshot_download))
    assert _download("CompVis/ldm-text2im-large-256") == folder
    assert asked == [["*.json", "*.safetensors", "*.txt"], ["bert/*.bin"]]
    del pipe
    shutil.rmtree(folder)
