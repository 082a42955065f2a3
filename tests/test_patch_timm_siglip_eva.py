"""tofu_triton.patch.timm on SigLIP (attention pooling) and Eva / EVA-02 / rope ViTs (rotary positions).

Tiny random models built from the families' real timm configs (``timm.create_model(name,
pretrained=False, ...)`` with a small width and depth), CPU, eval mode.
"""
import pytest
import torch
import torch.nn.functional as F
import timm
from timm.models.eva import EvaAttention

import tofu_triton.patch as tp
from tofu_triton import reference
from tofu_triton.patch.timm_models import merge_positions, rope_attention_forward
from tofu_triton.testing import assert_close, run_in_threads

from conftest import DEVICE, assert_r0_is_unpatched, assert_triton_matches_reference, images

SMALL = dict(pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=10)
FAMILIES = {
    "siglip": ("vit_base_patch16_siglip_224", {}),  # no class token, attention pooling ('map')
    "eva02": ("eva02_tiny_patch14_224", {}),  # EvaAttention, rotary table, avg pooling
    "eva02_map": ("eva02_tiny_patch14_224", dict(global_pool="map")),  # Eva's attention pool sees every token
    "vit_rope": ("vit_small_patch16_rope_224", {}),  # AttentionRope, class token pooling
}


def build(family, seed=0):
    name, extra = FAMILIES[family]
    torch.manual_seed(seed)
    return timm.create_model(name, **SMALL, **extra).eval()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_r0_is_bitwise_unpatched(family):
    assert_r0_is_unpatched(build(family), tp.timm, images())


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("mode", ["tofu", "tome"])
def test_token_counts_follow_the_plan(family, mode):
    model, x = tp.timm(build(family), r=[3, 2, 5, 4], mode=mode), images(2)
    with torch.no_grad():
        logits, info = tp.forward_with_info(model, x, trace_source=True)
    p, n = model.num_prefix_tokens, 16 + model.num_prefix_tokens
    expected = [n]
    for r in [3, 2, 5, 4]:
        n -= min(r, (n - p) // 2)
        expected.append(n)
    assert info.tokens == expected and [s.n_in for s in tp.plan(model)] == expected[:-1]
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    held = info.source.sum(-1, keepdim=True)[:, p:]  # original patches each token holds
    if mode == "tome":
        assert torch.equal(held, info.size[:, p:]) and torch.equal(info.size[:, p:].sum(1), torch.full((2, 1), 16.0))


def test_rope_attention_is_timms_own_forward():
    for family in ("eva02", "vit_rope"):
        attn = build(family).blocks[1].attn
        y = torch.randn(2, 9, 32)
        table = torch.randn(8, 32)  # a rotary table for the 8 non-prefix tokens (head dim 16: sin | cos)
        per_image = torch.randn(2, 1, 8, 32)
        for rope in (None, table, per_image):
            out, k = rope_attention_forward(attn, y, rope, None)
            assert torch.equal(out, attn(y, rope=rope))
            assert k.shape == (2, 2, 9, 16)


def test_positions_follow_the_tokens():
    # pos of the non-prefix tokens; A = even slots, B = odd slots; a merge keeps the B position.
    pos = torch.tensor([[10, 11, 12, 13, 14, 15, 16]])
    match = reference.bipartite_match(torch.tensor([[[0.0, 1], [1, 0], [0, 1], [1, 0], [1, 0], [0, 1], [1, 0],
                                                     [0, 1]]]), 2, protected=1)
    kept_a = match.unm_idx[0].tolist()
    assert merge_positions(pos, match)[0].tolist() == [[10, 12, 14, 16][i] for i in kept_a] + [11, 13, 15]


def _keys(attn, y):
    """Keys after k_norm, computed from the module's weights (test-side, not the patch's code)."""
    B, N, _ = y.shape
    if isinstance(attn, EvaAttention) and attn.q_bias is not None:
        qkv = F.linear(y, attn.qkv.weight, torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)))
    else:
        qkv = attn.qkv(y)
    return attn.k_norm(qkv.reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)[1])


def manual_forward(model, x, r, modes):
    """ToFu through an Eva written out with timm's own modules: each block's attention is timm's
    forward with the rotary rows of the tokens it holds (tracked here) and log(size) as its mask."""
    x, table = model._pos_embed(model.patch_embed(x))
    x = model.norm_pre(x)
    p = model.num_prefix_tokens
    size = torch.ones(*x.shape[:2], 1)
    pos = torch.arange(x.shape[1] - p).expand(x.shape[0], -1)
    merged = False
    for blk, mode in zip(model.blocks, modes):
        mask = size.log()[:, None, None, :, 0] if merged else None
        y = blk.norm1(x)
        x = x + blk.attn(y, rope=table[pos].unsqueeze(1), attn_mask=mask)  # eva02: no layer scale
        match = reference.bipartite_match(_keys(blk.attn, y).mean(1), r, p)
        x, size = reference.merge_tokens(x, match, size, mode)
        a, b = pos[:, 0::2], pos[:, 1::2]
        pos = torch.cat([a.gather(1, match.unm_idx), b], 1)
        merged = merged or mode != "prune"
        x = x + blk.mlp(blk.norm2(x))
    x = model.norm(x)
    pooled = (x[:, p:] * size[:, p:]).sum(1) / size[:, p:].sum(1)  # eva02: avg pooling, size-weighted
    return model.fc_norm(pooled)  # features: eva02's head starts near zero (head_init_scale)


@pytest.mark.parametrize("mode", ["tofu", "tome"])
def test_eva_matches_a_manual_forward_with_rotary_positions(mode):
    model, x = build("eva02"), images(3)
    assert all(blk.gamma_1 is None for blk in model.blocks)
    modes = {"tome": ["mean"] * 4, "tofu": ["prune", "prune", "mlerp", "mlerp"]}[mode]
    with torch.no_grad():
        expected = manual_forward(model, x, 3, modes)
        out, _ = tp.forward_with_info(tp.timm(model, r=3, mode=mode), x, pre_logits=True)
        model.r = 0
        unreduced, _ = tp.forward_with_info(model, x, pre_logits=True)
    assert_close(out, expected, torch.float32, "patched Eva vs manual")
    assert (out - unreduced).abs().max() > 1e-3  # the steps do change the output


def test_sized_attention_pooling_equals_pooling_duplicated_tokens():
    # A token of size s must pool like s copies of it: that is what log(size) on its logit means.
    pool = build("siglip").attn_pool
    tokens = torch.randn(2, 5, 32)
    size = torch.tensor([[1.0, 3, 1, 2, 1], [2.0, 1, 1, 1, 4]])
    duplicated = [torch.repeat_interleave(tokens[b], size[b].long(), dim=0) for b in range(2)]
    with torch.no_grad():
        weighted = pool(tokens, attn_mask=size.log()[:, None, None, :])
        expected = torch.stack([pool(d[None])[0] for d in duplicated])
    assert_close(weighted, expected, torch.float32, "sized pooling vs duplicated tokens")


@pytest.mark.parametrize("family", ["siglip", "eva02_map"])
def test_attention_pooling_uses_sizes_once_tokens_merge(family):
    model, x = tp.timm(build(family), r=3, mode="tome"), images(2)
    with torch.no_grad():
        feats, info = tp.forward_with_info(model, x, pre_logits=True)
        tokens = model.forward_features(x)
        p = 0 if family == "eva02_map" else model.num_prefix_tokens
        expected = model.attn_pool(tokens[:, p:], attn_mask=info.size[:, p:].log()[:, None, None, :, 0])
        unweighted = model.attn_pool(tokens[:, p:])
    assert_close(feats, model.fc_norm(expected), torch.float32, "sized attention pooling")
    assert (feats - model.fc_norm(unweighted)).abs().max() > 1e-4


@pytest.mark.parametrize("family", ["siglip", "eva02"])
def test_triton_backend_agrees_with_reference(family):
    model = tp.timm(build(family).to(DEVICE), r=3, mode="tofu", prune_layers=1)
    assert_triton_matches_reference(model, images(2).to(DEVICE))


@pytest.mark.parametrize("family", ["siglip", "eva02"])
def test_torch_compile_fullgraph_matches_eager(family):
    torch._dynamo.reset()
    model, x = tp.timm(build(family), r=3, mode="tofu"), images(2)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert_close(compiled(x), model(x), torch.float32, "compiled vs eager")


@pytest.mark.parametrize("family", ["eva02", "siglip"])
def test_reentrant_across_threads(family):
    model = tp.timm(build(family), r=3, mode="tofu")
    inputs = [images(2, seed=s) for s in range(4)]
    with torch.no_grad():
        expected = [model(x) for x in inputs]
    results = run_in_threads(model, inputs)
    assert all(torch.equal(a, b) for a, b in zip(results, expected))


def test_models_that_cannot_be_patched_say_why():
    with pytest.raises(TypeError, match="mixed .*rotary"):
        tp.timm(timm.create_model("vit_small_patch16_rope_mixed_224", **SMALL))
    with pytest.raises(TypeError, match="relative position bias"):
        tp.timm(timm.create_model("beit_base_patch16_224", **SMALL))
    with pytest.raises(TypeError, match="global_pool=.prr. is not supported"):
        tp.timm(timm.create_model("vit_base_patch16_224", **SMALL, global_pool="prr"))
