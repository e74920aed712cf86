"""The condition encoder tau: tokenizer, text transformer, class embedder, null condition and dropout."""

import pytest
import torch

from tinyldm.conditioning import ConditionConfig, ConditionEncoder, Tokenizer, split_words
from tinyldm.unet import UNet, UNetConfig

CAPTIONS = ["a red circle in the top left", "top left: a small blue square", "a green triangle in the center"]


def text_encoder(**kw) -> ConditionEncoder:
    tok = Tokenizer.from_texts(CAPTIONS)
    return ConditionEncoder(ConditionConfig(kind="text", context_dim=32, vocab=tok.vocab, max_len=12, layers=2,
                                            head_dim=16, **kw))


def test_tokenizer_round_trip_and_unknown_words():
    assert split_words("Top left: a RED circle.") == ["top", "left", ":", "a", "red", "circle", "."]
    tok = Tokenizer.from_texts(CAPTIONS)
    ids, mask = tok(["a red circle", "top left: a purple hexagon"], max_len=10)
    assert ids.shape == mask.shape == (2, 10)
    assert [tok.vocab[i] for i in ids[0, : mask[0].sum()]] == ["<bos>", "a", "red", "circle", "<eos>"]
    assert mask[1].sum() == 8 and (ids[1, 8:] == 0).all()
    assert tok.unknown_words("top left: a purple hexagon") == ["purple", "hexagon"]
    assert (ids[1] == tok.index["<unk>"]).sum() == 2  # unknown words become <unk>, they are not dropped
    with pytest.raises(ValueError, match="max_len"):
        tok(["a red circle in the top left"], max_len=5)
    assert Tokenizer(tok.vocab).vocab == tok.vocab  # what a checkpoint stores rebuilds it


def test_text_context_ignores_padding_and_depends_on_words():
    enc = text_encoder().eval()
    with torch.no_grad():
        batch = enc(["a red circle", CAPTIONS[2]])
        alone = enc(["a red circle"])
        n = 5  # <bos> a red circle <eos>
        assert batch["context"].shape == (2, 12, 32) and alone["context"].shape == (1, 12, 32)  # always max_len
        assert alone["context_mask"][0].sum() == n
        # Real tokens do not see padding: the same caption gives the same context in any batch.
        assert torch.allclose(batch["context"][0, :n], alone["context"][0, :n], atol=1e-5)
        tok = enc.text.tokenizer
        ids, mask = tok(["a red circle"], 12)
        ids[0, n:] = tok.index["red"]  # garbage where the padding was; the mask still says padding
        with_garbage = enc.text(ids, mask)
        assert torch.allclose(with_garbage[0, :n], alone["context"][0, :n], atol=1e-5)
        # Self-attention mixes words: the <bos> token's output changes with the colour word.
        other = enc(["a blue circle"])
        assert not torch.allclose(other["context"][0, 0], alone["context"][0, 0], atol=1e-4)


def test_null_conditions_and_dropout_rate():
    enc = text_encoder()
    assert enc.null_condition(2) == ["", ""]
    ctx = enc([""])
    assert ctx["context_mask"].sum() == 2  # <bos> <eos>: a learned null, not zeros
    g = torch.Generator().manual_seed(0)
    dropped = enc.drop(["a red circle"] * 20_000, 0.1, generator=g)
    assert sum(c == "" for c in dropped) / 20_000 == pytest.approx(0.1, abs=0.01)

    cls = ConditionEncoder(ConditionConfig(kind="class", context_dim=16, num_classes=5))
    labels = torch.randint(0, 5, (20_000,))
    out = cls.drop(labels, 0.25, generator=g)
    assert (out == 5).float().mean().item() == pytest.approx(0.25, abs=0.01)
    assert torch.equal(out[out != 5], labels[out != 5])
    ctx = cls(torch.tensor([0, 5]))["context"]
    assert ctx.shape == (2, 1, 16) and not torch.allclose(ctx[0], ctx[1])
    with pytest.raises(ValueError, match="class ids"):
        cls(torch.tensor([6]))
    assert ConditionEncoder(ConditionConfig(kind="none"))(None) == {}


def test_text_encoder_trains_jointly_with_the_unet():
    """The LDM objective (Eq. 3) sends gradient through the UNet's cross-attention into tau."""
    enc = text_encoder()
    unet = UNet(UNetConfig(latent_size=8, channels=32, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
                           head_dim=16, context_dim=enc.context_dim, norm_groups=8))
    opt = torch.optim.Adam([*enc.parameters(), *unet.parameters()], lr=1e-3)
    # Two captions, two different targets: the pair can only be fit through the context.
    x, t = torch.zeros(2, 4, 8, 8), torch.tensor([500, 500])
    target = torch.stack([torch.ones(4, 8, 8), -torch.ones(4, 8, 8)])
    for step in range(60):
        loss = (unet(x, t, **enc(CAPTIONS[:2])) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        if step == 10:  # (at step 0 the zero-initialised output layers still block it)
            assert enc.text.token_emb.weight.grad.abs().sum() > 0
        opt.step()
    assert loss.item() < 0.1
