"""The GRAIN model: registry, shapes per mode, paper size, weight-decay groups, export round trip."""

from __future__ import annotations

import pytest
import torch

from grain.config import TRAIN_MODES
from grain.train.model import build_model, list_archs, load_arch, load_model, save_model

EOT = 49407


def _tokens(n: int, ctx: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.zeros(n, ctx, dtype=torch.long)
    t[:, 0] = 49406
    lengths = torch.randint(2, ctx - 1, (n,), generator=g)
    for i, L in enumerate(lengths.tolist()):
        t[i, 1:L] = torch.randint(1, 49000, (L - 1,), generator=g)
        t[i, L] = EOT
    return t


def test_bundled_archs():
    assert {"grain-tiny", "grain-small", "grain-vit-b16"} <= set(list_archs())
    with pytest.raises(ValueError, match="unknown architecture 'nope'.*grain-tiny"):
        load_arch("nope")
    with pytest.raises(ValueError, match="arch.decoder.layerz: unknown key"):
        load_arch("grain-tiny", {"decoder": {"layerz": 1}})
    assert load_arch("grain-tiny", {"decoder": {"layers": 1}})["decoder"]["layers"] == 1


@pytest.mark.parametrize("arch, queries", [("grain-vit-b16-paper", 5), ("grain-vit-b16", 16)])
def test_paper_model_has_the_paper_size(arch, queries):
    torch.manual_seed(0)
    model = build_model(arch)
    n = sum(p.numel() for p in model.parameters())
    assert 170e6 < n < 182e6, n  # METHOD.md: about 176M trainable parameters
    assert model.num_region_queries == queries and len(model.decoder.layers) == 6
    assert model.decoder.query_type == ("learned" if arch.endswith("-paper") else "selected")
    attn = model.clip.visual.transformer.resblocks[0].attn
    assert isinstance(attn.ln_q, torch.nn.LayerNorm) and isinstance(attn.ln_k, torch.nn.LayerNorm), "ViT must use QK-norm"


@pytest.mark.parametrize("mode", list(TRAIN_MODES))
def test_forward_shapes(mode):
    torch.manual_seed(0)
    model = build_model("grain-tiny", mode=mode)
    b, m, ctx, d = 3, 4, model.context_length, model.arch["embed_dim"]
    out = model(torch.randn(b, 3, 64, 64), _tokens(b, ctx, 1), _tokens(m, ctx, 2))
    assert out["image_embed"].shape == (b, d) and out["text_embed"].shape == (b, d) and out["desc_embed"].shape == (m, d)
    for key in ("image_embed", "text_embed", "desc_embed"):
        assert torch.allclose(out[key].norm(dim=-1), torch.ones(out[key].shape[0]), atol=1e-5)
    assert out["logit_scale"].ndim == 0 and abs(out["logit_scale"].item() - 1 / 0.07) < 1e-3
    if mode in ("grain", "no_rd", "no_box"):
        q = model.num_region_queries
        assert out["region_embed"].shape == (b, q, d) and out["boxes"].shape == (b, q, 4)
        assert ((out["boxes"] >= 0) & (out["boxes"] <= 1)).all()
        assert len(out["aux_boxes"]) == len(model.decoder.layers) - 1
    else:
        assert "boxes" not in out and not hasattr(model, "decoder")
    empty = model(torch.randn(b, 3, 64, 64), _tokens(b, ctx, 1), torch.zeros(0, ctx, dtype=torch.long))
    assert empty["desc_embed"].shape == (0, d)


def test_global_embedding_comes_from_the_image_query_not_cls():
    torch.manual_seed(0)
    model = build_model("grain-tiny").eval()
    x = torch.randn(2, 3, 64, 64)
    before = model.encode_image(x)["image_embed"]
    with torch.no_grad():
        model.image_proj.mul_(-1)  # only the image-query projection changes
    after = model.encode_image(x)["image_embed"]
    assert torch.allclose(before, -after, atol=1e-6)


def test_anchored_queries_start_on_a_grid():
    torch.manual_seed(0)
    model = build_model("grain-tiny", decoder={"query_type": "anchored", "num_region_queries": 5})
    refs = model.decoder.ref_logits.sigmoid()
    assert refs.shape == (5, 2) and len({tuple(r) for r in refs.tolist()}) == 5
    out = model.encode_image(torch.randn(2, 3, 64, 64))
    assert out["boxes"].shape == (2, 5, 4)


def test_selected_queries_start_from_the_best_scoring_patches():
    """query_type selected: the top-k patch scores pick the patches; each region query starts from its patch's
    token with that patch's position, and predicts its box around the patch centre."""
    torch.manual_seed(0)
    model = build_model("grain-tiny", decoder={"dropout": 0.0}).eval()
    dec = model.decoder
    assert dec.query_type == "selected" and model.num_region_queries == 16
    seen = {}
    dec.layers[0].register_forward_pre_hook(lambda mod, args: seen.update(tgt=args[0], pos=args[2]))
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        memory = model.memory_norm(model.clip.visual(x))
        out = model.encode_image(x)
    logits, index = out["select_logits"], out["select_index"]
    assert logits.shape == (3, 64) and index.shape == (3, 16)
    assert torch.equal(index, logits.topk(16, dim=1).indices)
    for i in range(3):
        assert torch.allclose(seen["tgt"][i, :16], memory[i, 1:][index[i]])  # region queries: the chosen tokens
        assert torch.count_nonzero(seen["tgt"][i, 16]) == 0  # the image query starts at zero
        all_pos = dec.query_positions(1)[0]  # [P+1, D]: one position per patch + the image query's
        assert torch.allclose(seen["pos"][i, :16], all_pos[index[i]]) and torch.allclose(seen["pos"][i, 16], all_pos[-1])
    # another image chooses other patches: the choice depends on the image
    assert not all(torch.equal(index[0].sort().values, index[i].sort().values) for i in (1, 2))
    # with a zero box head the predicted centre is exactly the chosen patch's centre
    with torch.no_grad():
        for p in model.box_head.parameters():
            p.zero_()
        boxes = model.encode_image(x)["boxes"]
    col, row = index % 8, index // 8
    assert torch.allclose(boxes[..., 0], (col + 0.5) / 8, atol=1e-6) and torch.allclose(boxes[..., 1], (row + 0.5) / 8, atol=1e-6)


def test_selected_decoder_checks_its_query_count():
    with pytest.raises(ValueError, match="num_region_queries <= 64"):
        build_model("grain-tiny", decoder={"num_region_queries": 65})


def test_weight_decay_groups():
    model = build_model("grain-tiny")
    decay, no_decay = model.param_groups(0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    dec = {names[id(p)] for p in decay["params"]}
    assert len(nd) + len(dec) == len(names)
    for n in ("clip.logit_scale", "clip.token_embedding.weight", "clip.positional_embedding",
              "clip.visual.class_embedding", "clip.visual.positional_embedding", "decoder.query_embed.weight"):
        assert n in nd, n
    assert all(n.endswith("bias") or "ln" in n or "norm" in n or n in nd for n in nd)
    assert not any(n.endswith(".bias") for n in dec)
    assert "region_proj" in dec and "image_proj" in dec and "clip.visual.proj" in dec
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_the_authors_weight_decay_groups():
    """weight_decay_groups "paper" (their optim_policy): in the towers only 1-D parameters are exempt (token and
    positional embeddings are decayed); in the decoder and heads only ``.bias`` names are (LayerNorm weights, query
    embeddings and attention in-projection biases are decayed) — and train() builds its optimizer with it."""
    from grain.config import TrainConfig
    from grain.train.loop import build_optimizer

    model = build_model("grain-tiny-paper")
    paper, grain = set(model.decayed_names("paper")), set(model.decayed_names("grain"))
    named = dict(model.named_parameters())
    newly = {"clip.token_embedding.weight", "clip.positional_embedding", "clip.visual.positional_embedding",
             "decoder.query_embed.weight", "memory_norm.weight", "decoder.norm.weight", "decoder.layers.0.norm1.weight",
             "decoder.layers.0.self_attn.in_proj_bias"}
    assert newly <= paper and not newly & grain
    assert grain < paper  # the paper decays everything grain decays, and more
    for name in ("clip.logit_scale", "clip.visual.class_embedding", "clip.ln_final.weight", "clip.visual.ln_post.weight",
                 "decoder.layers.0.ffn.0.bias", "box_head.net.0.bias", "memory_norm.bias"):
        assert name in named and name not in paper, name
    tower_exempt = {n for n in named if n.startswith("clip.") and n not in paper}
    assert all(named[n].ndim < 2 for n in tower_exempt)
    opt, _ = build_optimizer(model, TrainConfig(weight_decay_groups="paper"))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(named[n]) for n in paper}
    with pytest.raises(ValueError, match="weight_decay_groups"):
        model.param_groups(0.1, "timm")


def test_arch_options_for_the_authors_towers_and_init():
    """text_act quick_gelu (OpenAI CLIP's activation in the text tower only), vision_init timm (in-projection ≈ 0.02
    std instead of open_clip's ≈ 6x larger), decoder.init xavier, and open_clip's own no_ln_pre / norm_kwargs —
    settable as overrides of an arch that does not name them; a bad value is an error naming the key."""
    from open_clip.transformer import QuickGELU

    torch.manual_seed(0)
    base = build_model("grain-small-paper")
    torch.manual_seed(0)
    paper = build_model("grain-small-paper", text_act="quick_gelu", vision_init="timm", decoder={"init": "xavier"},
                        vision_cfg={"no_ln_pre": True, "norm_kwargs": {"eps": 1e-6}})
    acts = [type(m) for m in paper.clip.transformer.modules() if isinstance(m, (QuickGELU, torch.nn.GELU))]
    assert acts and all(a is QuickGELU for a in acts)
    assert any(isinstance(m, torch.nn.GELU) for m in paper.clip.visual.modules())  # the ViT keeps GELU (timm's)
    assert not any(isinstance(m, QuickGELU) for m in base.modules())
    assert isinstance(paper.clip.visual.ln_pre, torch.nn.Identity) and not isinstance(base.clip.visual.ln_pre, torch.nn.Identity)
    assert paper.clip.visual.ln_post.eps == 1e-6 and base.clip.visual.ln_post.eps == 1e-5

    def in_proj_std(m) -> float:
        return float(next(p for n, p in m.clip.visual.named_parameters() if n.endswith("in_proj_weight")).detach().std())

    assert abs(in_proj_std(paper) - 0.02) < 0.003 and in_proj_std(base) > 4 * in_proj_std(paper)
    w = paper.decoder.layers[0].ffn[3].weight.detach()  # the FFN's output layer: 512 -> 128
    bound = (6 / sum(w.shape)) ** 0.5  # xavier-uniform's bound
    assert float(w.abs().max()) <= bound and float(w.abs().max()) > 0.9 * bound
    # PyTorch's default (kaiming-uniform, bound 1/sqrt(fan_in) = 0.044) is half as wide here
    assert float(base.decoder.layers[0].ffn[3].weight.detach().abs().max()) < 0.5 * bound
    assert sum(p.numel() for p in paper.parameters()) < sum(p.numel() for p in base.parameters())  # no ln_pre
    with pytest.raises(ValueError, match="text_act"):
        build_model("grain-tiny", text_act="relu")
    with pytest.raises(ValueError, match="unknown key"):
        build_model("grain-tiny", vision_cfg={"no_such_key": 1})


@pytest.mark.parametrize("mode", ["grain", "clip"])
def test_export_round_trip(tmp_path, mode):
    torch.manual_seed(0)
    model = build_model("grain-tiny", mode=mode, decoder={"query_type": "anchored"}).eval()
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    x, t = torch.randn(2, 3, 64, 64), _tokens(2, model.context_length, 3)
    a, b = model(x, t), loaded(x, t)
    for key in ("image_embed", "text_embed"):
        assert torch.equal(a[key], b[key])
    assert loaded.mode == mode and not loaded.training
    with pytest.raises(FileNotFoundError, match="not a grain model folder"):
        load_model(tmp_path)


def test_text_encoding_shortcut_equals_open_clip():
    """Deduplicated, context-trimmed text encoding == open_clip's encode_text, values and gradients."""
    torch.manual_seed(0)
    model = build_model("grain-tiny")
    tokens = _tokens(12, model.context_length, 7)
    tokens[5] = tokens[2]
    tokens[9] = tokens[2]
    tokens[:, 20:] = 0  # nothing after position 19 in this batch: the context is cut there
    tokens[3, 1:] = 0
    tokens[3, 1] = EOT
    ours = model.encode_text(tokens)
    ref = model.clip.encode_text(tokens, normalize=True)
    assert torch.allclose(ours, ref, atol=1e-5), float((ours - ref).abs().max())
    w = torch.randn_like(ref)
    g_ours = torch.autograd.grad((ours * w).sum(), model.clip.token_embedding.weight)[0]
    g_ref = torch.autograd.grad((ref * w).sum(), model.clip.token_embedding.weight)[0]
    assert torch.allclose(g_ours, g_ref, atol=1e-5)
