"""tofu_triton.patch.timm on tiny timm ViTs (random init, CPU, eval mode unless stated)."""
import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import ResPostBlock, VisionTransformer

import tofu_triton.patch as tp
from tofu_triton import reference
from tofu_triton.patch.timm_models import attention_forward
from tofu_triton.testing import assert_close, run_in_threads

from conftest import DEVICE, ON_GPU, assert_r0_is_unpatched, assert_triton_matches_reference, images

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=10)
VARIANTS = {
    "vit": dict(),
    "reg_tokens": dict(reg_tokens=3),
    "no_class_token_avg": dict(class_token=False, global_pool="avg"),
    "layerscale": dict(init_values=0.1),
    "qk_norm": dict(qk_norm=True),
    "avg_pool": dict(global_pool="avg"),
    "avgmax_pool": dict(global_pool="avgmax"),
    "no_embed_class": dict(no_embed_class=True, reg_tokens=1),
    "deit_distilled": dict(cls=VisionTransformerDistilled),
}


def tiny(variant="vit", seed=0, **overrides):
    kwargs = {**TINY, **VARIANTS[variant], **overrides}
    cls = kwargs.pop("cls", VisionTransformer)
    torch.manual_seed(seed)
    return cls(**kwargs).eval()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_r0_is_bitwise_unpatched(variant):
    model, x = tiny(variant), images()
    assert_r0_is_unpatched(model, tp.timm, x)
    with torch.no_grad():
        assert torch.equal(model.forward_features(x), tp.unpatch(model).forward_features(x))


def test_r0_is_bitwise_unpatched_without_fused_attention():
    model, x = tiny("layerscale"), images()
    for blk in model.blocks:
        blk.attn.fused_attn = False  # timm's manual softmax path (TIMM_FUSED_ATTN=0)
    assert_r0_is_unpatched(model, lambda m, r: tp.timm(m, r=r, mode="tome"), x)


@pytest.mark.parametrize("variant", ["vit", "reg_tokens", "no_class_token_avg", "deit_distilled"])
@pytest.mark.parametrize("mode", ["tofu", "tome", "prune", "mlerp"])
def test_token_counts_follow_schedule(variant, mode):
    model, x = tp.timm(tiny(variant), r=[3, 2, 5, 4], mode=mode), images(2)
    p = model.num_prefix_tokens
    with torch.no_grad():
        logits, info = tp.forward_with_info(model, x)
    n = 16 + p
    expected = [n]
    for r in [3, 2, 5, 4]:
        n -= min(r, (n - p) // 2)
        expected.append(n)
    assert info.tokens == expected
    assert [s.n_in for s in tp.plan(model)] == expected[:-1]
    assert info.size.shape == (2, expected[-1], 1)
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    assert torch.equal(info.size[:, :p], torch.ones(2, p, 1))
    total = info.size[:, p:].sum(dim=1).squeeze(-1)
    if mode == "prune":
        assert torch.equal(info.size, torch.ones_like(info.size))
    elif mode in ("tome", "mlerp"):
        assert torch.equal(total, torch.full((2,), 16.0))  # merging keeps every patch


def test_schedule_and_mode_can_change_after_patching():
    model, x = tp.timm(tiny(), r=2, mode="tofu"), images(2)
    with torch.no_grad():
        first = tp.forward_with_info(model, x)[1].tokens
        model.r = 4
        model.tofu_mode = "tome"
        second = tp.forward_with_info(model, x)[1].tokens
        fresh = tp.forward_with_info(tp.timm(tiny(), r=4, mode="tome"), x)
        assert torch.equal(model(x), fresh[0])
    assert first == [17, 15, 13, 11, 9] and second == [17, 13, 9, 5, 3] == fresh[1].tokens


def manual_forward(model, x, r, mode):
    """ToMe/ToFu written out from docs/design.md with plain torch: explicit softmax
    with + log(size), reference.token_fusion, size-weighted avg pooling."""
    modes = {"tome": ["mean"] * 4, "tofu": ["prune", "prune", "mlerp", "mlerp"]}[mode]
    x = model._pos_embed(model.patch_embed(x))
    p = model.num_prefix_tokens
    size = torch.ones(*x.shape[:2], 1)
    merged = False
    for blk, step_mode in zip(model.blocks, modes):
        attn, y = blk.attn, blk.norm1(x)
        B, N, C = y.shape
        q, k, v = attn.qkv(y).reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(q), attn.k_norm(k)
        logits = q @ k.transpose(-1, -2) * attn.scale
        if merged:
            logits = logits + size.log()[:, None, None, :, 0]
        y = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, N, C)
        x = x + blk.ls1(attn.proj(y))
        x, size = reference.token_fusion(x, k.mean(1), r, size, step_mode, p)
        merged = merged or step_mode != "prune"
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
    x = model.norm(x)
    if model.global_pool == "avg":
        pooled = (x[:, p:] * size[:, p:]).sum(1) / size[:, p:].sum(1)
    else:
        pooled = x[:, 0]
    return model.head(model.fc_norm(pooled))


@pytest.mark.parametrize("variant", ["vit", "no_class_token_avg", "layerscale", "qk_norm"])
@pytest.mark.parametrize("mode", ["tome", "tofu"])
def test_matches_manual_forward_with_proportional_attention(variant, mode):
    model, x = tiny(variant), images(3)
    with torch.no_grad():
        expected = manual_forward(model, x, 2, mode)
        out = tp.timm(model, r=2, mode=mode)(x)
        without = tp.timm(model, r=2, mode=mode, prop_attn=False)(x)
    assert_close(out, expected, torch.float32, "patched vs manual")
    assert (without - expected).abs().max() > 1e-4  # the mask matters, so the check above has teeth


def test_proportional_bias_is_log_size():
    size = torch.tensor([[1.0, 2.0, 3.5], [4.0, 1.0, 1.0]])[..., None]
    mask = reference.log_size_bias(size, torch.float16)
    assert mask.shape == (2, 1, 1, 3) and mask.dtype == torch.float16
    assert torch.equal(mask, torch.log(size).squeeze(-1)[:, None, None, :].half())


def test_attention_with_mask_equals_manual_softmax():
    attn = tiny("qk_norm").blocks[0].attn
    x = torch.randn(2, 7, 32)
    size = 1 + 3 * torch.rand(2, 7, 1)
    with torch.no_grad():
        out, k = attention_forward(attn, x, reference.log_size_bias(size, x.dtype))
        q, k2, v = attn.qkv(x).reshape(2, 7, 3, 2, 16).permute(2, 0, 3, 1, 4)
        q, k2 = attn.q_norm(q), attn.k_norm(k2)
        weights = (q @ k2.transpose(-1, -2) * attn.scale + size.log().view(2, 1, 1, 7)).softmax(-1)
        expected = attn.proj((weights @ v).transpose(1, 2).reshape(2, 7, 32))
    assert torch.equal(k, k2)
    assert_close(out, expected, torch.float32, "masked attention")


@pytest.mark.parametrize("path", ["vsize", "triton"])
def test_every_attention_path_gives_the_model_of_the_mask_path(path):
    # On DEVICE, where the Triton kernel runs: compiled for a GPU it takes fp16/bf16 (fp32 in the interpreter only).
    dtype = torch.float16 if ON_GPU and path == "triton" else torch.float32
    model, x = tiny().to(DEVICE, dtype), images().to(DEVICE, dtype)
    with torch.no_grad():
        want = tp.timm(model, r=3, mode="tome", attention="mask")(x)
        got = tp.timm(model, r=3, mode="tome", attention=path)(x)
    assert_close(got, want, dtype, f"attention={path}")
    with pytest.raises(ValueError, match="attention must be one of"):
        tp.timm(model, attention="fast")
    model.tofu_attention = "fast"  # set between calls: refused at the call
    with pytest.raises(ValueError, match="tofu_attention must be one of"):
        model(x)


def test_no_mask_before_the_first_merge():
    # Pure prune: sizes stay 1, so prop_attn on/off must give bitwise the same result
    # (the mask is skipped by the schedule, not added as zeros).
    model, x = tiny(), images()
    with torch.no_grad():
        a = tp.timm(model, r=3, mode="prune", prop_attn=True)(x)
        b = tp.timm(model, r=3, mode="prune", prop_attn=False)(x)
    assert torch.equal(a, b)


def test_avg_pooling_is_size_weighted():
    model, x = tp.timm(tiny("no_class_token_avg"), r=3, mode="tome"), images()
    with torch.no_grad():
        feats, info = tp.forward_with_info(model, x, pre_logits=True)
        tokens = model.forward_features(x)
        expected = model.fc_norm((tokens * info.size).sum(1) / info.size.sum(1))
        unweighted = model.fc_norm(tokens.mean(1))
    assert_close(feats, expected, torch.float32, "weighted avg pool")
    assert (feats - unweighted).abs().max() > 1e-4


def test_triton_backend_agrees_with_reference():
    # Triton interpreter on the CPU: keep it tiny.
    model = tp.timm(tiny("reg_tokens").to(DEVICE), r=3, mode="tofu", prune_layers=1)
    assert_triton_matches_reference(model, images(2).to(DEVICE))


def test_the_step_checks_its_arguments_once_per_forward_not_per_block(monkeypatch):
    # Every block's step would check the same backend, device and dtype: host time an eager forward pays per
    # block (docs/design.md §3.3). The patch checks once and the blocks call ops.block_step.
    from tofu_triton import ops

    want = tp.timm(tiny("reg_tokens"), r=3, mode="tofu", backend="reference")(images(2))
    calls = {"step_backend": 0, "token_fusion_step": 0}
    for name in calls:
        fn = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _fn=fn, _name=name, **k: calls.__setitem__(_name, calls[_name] + 1)
                            or _fn(*a, **k))
    model = tp.timm(tiny("reg_tokens").to(DEVICE), r=3, mode="tofu", backend="triton")
    assert_close(model(images(2).to(DEVICE)).cpu(), want, torch.float32, "logits")
    assert calls == {"step_backend": 1, "token_fusion_step": 0}
    with pytest.raises(TypeError, match="x must have dtype"):  # the once-per-forward check still speaks up
        tp.timm(tiny("reg_tokens").to(DEVICE).double(), r=3, backend="triton")(images(2).to(DEVICE).double())


def test_torch_compile_fullgraph_matches_eager():
    # fullgraph=True fails on any graph break. "aot_eager" traces through AOT
    # autograd like Inductor does but skips its C++ compile, which takes minutes
    # on a cold CPU cache (Inductor itself was checked by hand, see the report).
    torch._dynamo.reset()
    model, x = tp.timm(tiny("reg_tokens"), r=3, mode="tofu"), images(2)
    with torch.no_grad():
        eager, info = tp.forward_with_info(model, x, trace_source=True)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
        traced = torch.compile(tp.trace, fullgraph=True, backend="aot_eager")(model, x)
    assert_close(compiled, eager, torch.float32, "compiled vs eager")
    assert_close(traced[0], eager, torch.float32, "compiled trace vs eager")
    assert torch.equal(traced[1], info.source)


def test_torch_compile_follows_r_changes():
    torch._dynamo.reset()
    model, x = tp.timm(tiny(), r=2, mode="tome"), images(2)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        for r, mode in [(2, "tome"), (4, "tofu"), (0, "tofu")]:
            model.r, model.tofu_mode = r, mode
            assert torch.equal(compiled(x), model(x)), (r, mode)


def test_reentrant_across_threads():
    # Threads run one model with different batch sizes at once; every result must
    # equal the sequential one (nothing per call lives on the modules).
    model = tp.timm(tiny("avg_pool"), r=3, mode="tofu")
    inputs = [images(b, seed=b) for b in (1, 2, 5, 3)]
    with torch.no_grad():
        expected = [tp.forward_with_info(model, x, trace_source=True) for x in inputs]
    results = run_in_threads(lambda x: tp.forward_with_info(model, x, trace_source=True), inputs, repeats=5)
    for i, (logits, info) in enumerate(expected):
        assert torch.equal(results[i][0], logits)
        assert torch.equal(results[i][1].source, info.source) and results[i][1].tokens == info.tokens


def test_forward_stores_nothing_on_modules():
    model = tp.timm(tiny(), r=3, mode="tofu")
    before = {name: dict(vars(m)) for name, m in model.named_modules()}
    with torch.no_grad():
        tp.trace(model, images())
    after = {name: dict(vars(m)) for name, m in model.named_modules()}
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].keys() == after[name].keys(), name
        for key, value in before[name].items():
            if isinstance(value, dict):  # _parameters, _buffers, _modules, hooks
                assert value.keys() == after[name][key].keys() and all(
                    value[k] is after[name][key][k] for k in value), (name, key)
            else:
                assert after[name][key] is value or after[name][key] == value, (name, key)


def test_interleaved_calls_with_changing_r():
    model, small, big = tp.timm(tiny(), r=1), images(2, seed=3), images(4, seed=4)
    with torch.no_grad():
        ref_small_r1 = tp.timm(tiny(), r=1)(small)
        ref_big_r4 = tp.timm(tiny(), r=4)(big)
        a = model(small)
        model.r = 4
        b = model(big)
        model.r = 1
        c = model(small)
    assert torch.equal(a, ref_small_r1) and torch.equal(c, ref_small_r1) and torch.equal(b, ref_big_r4)


def test_source_rows_sum_to_sizes():
    for mode in ("tome", "tofu", "prune"):
        model, x = tp.timm(tiny("reg_tokens"), r=3, mode=mode), images(2)
        with torch.no_grad():
            logits, source = tp.trace(model, x)
            _, info = tp.forward_with_info(model, x, trace_source=True)
        p = model.num_prefix_tokens
        assert torch.equal(logits, model(x))
        assert source.shape == (2, info.tokens[-1], 16)
        assert set(source.unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(source[:, :p], torch.zeros(2, p, 16))
        assert torch.equal(source[:, p:].sum(-1, keepdim=True), info.size[:, p:])
        held = source.sum(1)  # how many final tokens hold each patch
        assert held.max() <= 1
        if mode == "tome":
            assert torch.equal(held, torch.ones(2, 16))
        if mode == "prune":
            assert held.sum() == 2 * (info.tokens[-1] - p)  # pruned patches belong to no token


def test_copy_pickle_and_training():
    model = tp.timm(tiny(), r=2, mode="tofu")
    x = images(2)
    clone = pickle.loads(pickle.dumps(model))
    twin = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(clone(x), model(x)) and torch.equal(twin(x), model(x))
    model.train()
    loss = F.cross_entropy(model(x), torch.tensor([1, 2]))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.blocks[-1].mlp.fc1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(r=-1), ValueError, "r must be >= 0"),
    (dict(r=[1] * 5), ValueError, "only 4 layers"),
    (dict(r=1.5), TypeError, "r must be"),
    (dict(mode="fast"), ValueError, "mode must be one of"),
    (dict(prune_layers=9), ValueError, "prune_layers"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(prop_attn="yes"), TypeError, "prop_attn"),
])
def test_bad_arguments(kwargs, err, match):
    model = tiny()
    with pytest.raises(err, match=match):
        tp.timm(model, **kwargs)
    assert not tp.is_patched(model) and not hasattr(model, "r")  # nothing half-done
    tp.timm(model, r=2)
    with pytest.raises(err, match=match):
        tp.timm(model, **kwargs)
    assert model.r == 2  # a failed re-patch keeps the previous settings


def test_bad_settings_after_patching_raise_at_call():
    model = tp.timm(tiny(), r=2)
    model.r = -3
    with pytest.raises(ValueError, match="r must be >= 0"):
        model(images(1))
    model.r, model.tofu_mode = 2, "nope"
    with pytest.raises(ValueError, match="mode"):
        model(images(1))


def test_models_that_cannot_be_patched():
    with pytest.raises(TypeError, match="VisionTransformer"):
        tp.timm(torch.nn.Linear(3, 3))
    with pytest.raises(TypeError, match="ResPostBlock"):
        tp.timm(VisionTransformer(**TINY, block_fn=ResPostBlock))
    with pytest.raises(TypeError, match="global_pool='prr' is not supported"):
        tp.timm(VisionTransformer(**TINY, global_pool="prr"))
    with pytest.raises(TypeError, match="not patched"):
        tp.forward_with_info(tiny(), images(1))
    model = tp.timm(tiny(), r=2)
    with pytest.raises(NotImplementedError, match="attn_mask"):
        model(images(1), attn_mask=torch.zeros(1, 1, 17, 17))
