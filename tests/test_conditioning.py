"""The condition encoder tau: tokenizer, text transformer, class embedder, layout set transformer,
null condition and dropout."""

import pytest
import torch

from tinyldm.conditioning import ConditionConfig, ConditionEncoder, Tokenizer, split_words
from tinyldm.unet import UNet, UNetConfig

CAPTIONS = ["a red circle in the top left", "top left: a small blue square",
            "a green triangle in the center"]


def text_encoder(**kw) -> ConditionEncoder:
    tok = Tokenizer.from_texts(CAPTIONS)
    return ConditionEncoder(ConditionConfig(kind="text", context_dim=32, vocab=tok.vocab,
                                            max_len=12, layers=2, head_dim=16, **kw))


def test_tokenizer_round_trip_and_unknown_words():
    assert split_words("Top left: a RED circle.") == ["top", "left", ":", "a", "red", "circle", "."]
    tok = Tokenizer.from_texts(CAPTIONS)
    ids, mask = tok(["a red circle", "top left: a purple hexagon"], max_len=10)
    assert ids.shape == mask.shape == (2, 10)
    assert [tok.vocab[i] for i in ids[0, : mask[0].sum()]] == ["<bos>", "a", "red", "circle",
                                                               "<eos>"]
    assert mask[1].sum() == 8 and (ids[1, 8:] == 0).all()
    assert tok.unknown_words("top left: a purple hexagon") == ["purple", "hexagon"]
    # unknown words become <unk>, they are not dropped
    assert (ids[1] == tok.index["<unk>"]).sum() == 2
    with pytest.raises(ValueError, match="max_len"):
        tok(["a red circle in the top left"], max_len=5)
    assert Tokenizer(tok.vocab).vocab == tok.vocab  # what a checkpoint stores rebuilds it


def test_text_context_ignores_padding_and_depends_on_words():
    enc = text_encoder().eval()
    with torch.no_grad():
        batch = enc(["a red circle", CAPTIONS[2]])
        alone = enc(["a red circle"])
        n = 5  # <bos> a red circle <eos>
        # always max_len
        assert batch["context"].shape == (2, 12, 32) and alone["context"].shape == (1, 12, 32)
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
    mask = torch.rand(2_000, generator=g) < 0.1
    # exactly the masked captions become the null one
    dropped = enc.drop(["a red circle"] * 2_000, mask)
    assert [c == "" for c in dropped] == mask.tolist() and 0 < mask.sum() < 2_000

    cls = ConditionEncoder(ConditionConfig(kind="class", context_dim=16, num_classes=5))
    labels = torch.randint(0, 5, (2_000,), generator=g)
    mask = torch.rand(2_000, generator=g) < 0.25
    out = cls.drop(labels, mask)
    assert torch.equal(out == 5, mask)  # class 5: the null class
    assert torch.equal(out[~mask], labels[~mask])
    ctx = cls(torch.tensor([0, 5]))["context"]
    assert ctx.shape == (2, 1, 16) and not torch.allclose(ctx[0], ctx[1])
    with pytest.raises(ValueError, match="class ids"):
        cls(torch.tensor([6]))
    assert ConditionEncoder(ConditionConfig(kind="none"))(None) == {}


def test_text_encoder_trains_jointly_with_the_unet():
    """The LDM objective (Eq. 3) sends gradient through the UNet's cross-attention into tau."""
    enc = text_encoder()
    unet = UNet(UNetConfig(latent_size=8, channels=32, channel_mult=(1, 2), num_res_blocks=1,
                           attn_resolutions=(8,), head_dim=16, context_dim=enc.context_dim,
                           norm_groups=8))
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


# --- layouts -------------------------------------------------------------------------------------

def layout_encoder(**kw) -> ConditionEncoder:
    base = dict(kind="layout", context_dim=32, num_classes=6, max_objects=5, layers=2, head_dim=16)
    return ConditionEncoder(ConditionConfig(**{**base, **kw}))


def layout(box_classes: list[list[int]], boxes: list[list[list[float]]]) -> dict:
    return {"box_classes": torch.tensor(box_classes), "boxes": torch.tensor(boxes)}


def cross_attention_unet() -> UNet:
    """A tiny UNet reading a 32-wide context, with its zero-initialised output layers given
    weights."""
    unet = UNet(UNetConfig(latent_size=8, channels=32, channel_mult=(1, 2), num_res_blocks=1,
                           attn_resolutions=(8, 4), head_dim=16, context_dim=32,
                           norm_groups=8)).eval()
    with torch.no_grad():
        for p in unet.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return unet


# Three objects and two padded slots in between (padding may sit anywhere; its box is never read).
LAYOUT = layout([[2, -1, 5, 2, -1]], [[[0.1, 0.1, 0.3, 0.4], [0, 0, 0, 0], [0.5, 0.2, 0.9, 0.6],
                                       [0.6, 0.6, 0.8, 0.9], [0, 0, 0, 0]]])


def test_layout_is_a_set():
    """No positions across objects: permuting them permutes the tokens and leaves eps_theta
    unchanged."""
    enc, unet = layout_encoder().eval(), cross_attention_unet()
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([300])
    perm = torch.tensor([3, 4, 0, 2, 1])
    permuted = {"box_classes": LAYOUT["box_classes"][:, perm], "boxes": LAYOUT["boxes"][:, perm]}
    with torch.no_grad():
        a, b = enc(LAYOUT), enc(permuted)
        assert a["context"].shape == (1, 6, 32)  # the null slot + max_objects
        assert a["context_mask"].tolist() == [[False, True, False, True, True, False]]
        assert torch.equal(b["context_mask"][:, 1:], a["context_mask"][:, 1:][:, perm])
        assert torch.allclose(b["context"][:, 1:], a["context"][:, 1:][:, perm], atol=1e-5)
        assert torch.allclose(unet(x, t, **a), unet(x, t, **b), atol=1e-5)
        # Not invariant because every token is the same: the two objects of class 2 differ by their
        # boxes.
        assert (a["context"][0, 1] - a["context"][0, 4]).abs().max() > 0.1


def test_layout_padding_is_never_read():
    enc, unet = layout_encoder().eval(), cross_attention_unet()
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([300])
    real = LAYOUT["box_classes"][0] >= 0
    # K = 3
    short = {"box_classes": LAYOUT["box_classes"][:, real], "boxes": LAYOUT["boxes"][:, real]}
    garbage = {"box_classes": LAYOUT["box_classes"], "boxes": LAYOUT["boxes"].clone()}
    # out of range: not checked, not read
    garbage["boxes"][0, ~real] = torch.tensor([7.0, -3.0, float("nan"), 0.5])
    with torch.no_grad():
        a, b, c = enc(LAYOUT), enc(short), enc(garbage)
        assert b["context_mask"][0].tolist() == [False, True, True, True, False, False]
        assert torch.allclose(b["context"][0, 1:4], a["context"][0, 1:][real], atol=1e-5)
        assert torch.allclose(c["context"], a["context"], atol=1e-6)
        assert torch.equal(c["context_mask"], a["context_mask"])
        out = unet(x, t, **a)
        assert torch.allclose(unet(x, t, **b), out, atol=1e-5)
        assert torch.allclose(unet(x, t, **c), out, atol=1e-5)
        # Padding is the same as leaving the slots out of the context altogether.
        assert torch.allclose(unet(x, t, context=a["context"][:, a["context_mask"][0]]), out,
                              atol=1e-5)


def test_moving_or_relabelling_one_object_changes_the_context():
    enc, unet = layout_encoder().eval(), cross_attention_unet()
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([300])
    moved = {"box_classes": LAYOUT["box_classes"], "boxes": LAYOUT["boxes"].clone()}
    moved["boxes"][0, 2, [0, 2]] += 0.05  # object 2 slides right by 5% of the image
    relabelled = {"box_classes": LAYOUT["box_classes"].clone(), "boxes": LAYOUT["boxes"]}
    relabelled["box_classes"][0, 2] = 1
    with torch.no_grad():
        a, out = enc(LAYOUT), unet(x, t, **enc(LAYOUT))
        for other in (moved, relabelled):
            b = enc(other)
            # the changed object's token
            assert (b["context"][0, 3] - a["context"][0, 3]).abs().max() > 0.05
            # and, through attention, the others
            assert (b["context"][0, 1] - a["context"][0, 1]).abs().max() > 1e-3
            assert (unet(x, t, **b) - out).abs().max() > 1e-4


def test_layout_null_condition_and_dropout():
    enc = layout_encoder().eval()
    null = enc(enc.null_condition(3))
    assert null["context_mask"].tolist() == [[True] + [False] * 5] * 3  # one learned null token
    assert torch.allclose(null["context"][0], null["context"][2])
    cond = enc(LAYOUT)
    # the two halves of a guided batch concatenate
    assert cond["context"].shape[1:] == null["context"].shape[1:]
    assert (cond["context"][0, 1] - null["context"][0, 0]).abs().max() > 0.1
    # The null token is a parameter: the empty layout's context gets gradient (it is learned, not
    # fixed).
    enc(enc.null_condition(1))["context"].square().sum().backward()
    assert enc.layout.null.grad.abs().sum() > 0

    g = torch.Generator().manual_seed(0)
    many = {"box_classes": torch.randint(0, 6, (2_000, 3), generator=g),
            "boxes": torch.rand(2_000, 3, 4, generator=g).sort(-1).values}
    mask = torch.rand(2_000, generator=g) < 0.1
    out = enc.drop(many, mask)
    dropped = (out["box_classes"] == -1).all(1)
    assert (torch.equal(dropped, mask)
            and torch.equal(out["boxes"][mask], torch.zeros(int(mask.sum()), 3, 4)))
    assert torch.equal(out["box_classes"][~dropped], many["box_classes"][~dropped])
    assert torch.equal(out["boxes"][~dropped], many["boxes"][~dropped])
    # Dropped rows encode exactly to the null condition; the others to themselves.
    few = {k: v[:16] for k, v in many.items()}
    out = enc.drop(few, torch.arange(16) % 2 == 0)
    dropped = (out["box_classes"] == -1).all(1)
    assert dropped.sum() == 8
    with torch.no_grad():
        ctx, ref, null = enc(out), enc(few), enc(enc.null_condition(16))
    for k in ("context", "context_mask"):
        assert torch.equal(ctx[k][dropped], null[k][dropped])
        assert torch.equal(ctx[k][~dropped], ref[k][~dropped])


@pytest.mark.parametrize("change,match", [
    (lambda d: d["boxes"].__setitem__((0, 0, 2), 1.2), r"\[0, 1\]"),
    (lambda d: d["boxes"].__setitem__((0, 2, 1), -0.1), r"\[0, 1\]"),
    (lambda d: d["boxes"].__setitem__((0, 0, 0), 0.35), "x0 <= x1"),
    (lambda d: d["box_classes"].__setitem__((0, 0), 6), "class ids"),
    (lambda d: d["box_classes"].__setitem__((0, 0), -2), "class ids"),
    (lambda d: d.update(boxes=d["boxes"][..., :3]), "shape"),
    (lambda d: d.update(boxes=d["boxes"][:, :4]), "shape"),
    (lambda d: d.update(box_classes=d["box_classes"][0]), "shape"),
    (lambda d: d.update(box_classes=d["box_classes"].float()), "int64"),
    (lambda d: d.update(box_classes=torch.zeros(1, 6, dtype=torch.long),
                        boxes=torch.zeros(1, 6, 4)), "max_objects"),
])
def test_bad_layouts_are_rejected(change, match):
    enc = layout_encoder()
    bad = {k: v.clone() for k, v in LAYOUT.items()}
    change(bad)
    with pytest.raises(ValueError, match=match):
        enc(bad)
    with pytest.raises(ValueError, match="dict"):
        enc((LAYOUT["box_classes"], LAYOUT["boxes"]))


def test_layout_tokens_carry_the_box_position():
    """A small head on the pooled context learns where a single object is (Fourier features are
    decodable)."""
    enc = layout_encoder(layers=1)
    head = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 2))
    opt = torch.optim.Adam([*enc.parameters(), *head.parameters()], lr=3e-3)

    def batch(n: int) -> tuple[dict, torch.Tensor]:
        centre, half = 0.1 + 0.8 * torch.rand(n, 2), 0.02 + 0.08 * torch.rand(n, 1)
        boxes = torch.cat([centre - half, centre + half], dim=1)  # (n, 4): x0, y0, x1, y1
        return {"box_classes": torch.randint(0, 6, (n, 1)), "boxes": boxes[:, None]}, centre

    def predict(cond: dict) -> torch.Tensor:
        out = enc(cond)
        mask = out["context_mask"][..., None].float()
        return head((out["context"] * mask).sum(1) / mask.sum(1))  # mean over the real tokens

    for _ in range(300):
        cond, centre = batch(64)
        loss = (predict(cond) - centre).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    cond, centre = batch(1000)
    with torch.no_grad():
        mse = (predict(cond) - centre).square().mean().item()
    assert mse < 0.05 * centre.var(0).mean().item()  # explains > 95% of the variance of the centre
