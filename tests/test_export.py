"""torch.export + AOTInductor of patched models (CPU, reference backend), and the export ops."""
import pytest
import torch

import tofu_triton.patch as tp
from tofu_triton import ops
from tofu_triton import reference as ref
from tofu_triton.models import create_vit
from tofu_triton.testing import assert_close, make_inputs

from conftest import ON_GPU


def _round_trip(model, args=(), kwargs=None, tmp_path=None):
    """(exported program, the AOTInductor package loaded back)."""
    kwargs = kwargs or {}
    program = torch.export.export(model, args, kwargs)
    path = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "model.pt2"))
    return program, torch._inductor.aoti_load_package(path)


def test_timm_vit_exports_and_packages(tmp_path):
    model = tp.timm(create_vit("smoke"), r=2, mode="tofu", backend="reference")
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x)
    program, package = _round_trip(model, (x,), tmp_path=tmp_path)
    assert torch.equal(program.module()(x), expected)
    assert_close(package(x), expected, torch.float32, "AOTInductor package vs eager")


def test_hf_bert_with_padding_exports_and_packages(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64)
    model = tp.transformers(transformers.BertModel(cfg).eval(), r=2, mode="tofu", backend="reference")
    ids = torch.randint(5, 100, (2, 20), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask)
    _, package = _round_trip(model, kwargs=dict(input_ids=ids, attention_mask=mask), tmp_path=tmp_path)
    out = package(input_ids=ids, attention_mask=mask)
    assert torch.equal(out.token_size, expected.token_size) and torch.equal(out.token_mask, expected.token_mask)
    assert_close(out.last_hidden_state, expected.last_hidden_state, torch.float32, "AOTInductor package vs eager")


@pytest.mark.skipif(ON_GPU, reason="the export ops' CUDA tracing is checked by bench/export_check.py")
def test_export_ops_compute_the_op():
    # The triton_op twins of the Triton ops (what torch.export uses on CUDA) run
    # the same kernels; here eagerly, in the interpreter.
    match_export, merge_export = ops._export_ops()
    x, metric, size = make_inputs(2, 33, 16, d=8, seed=4)
    expected = ref.bipartite_match(metric, 8, 1)
    got = match_export(metric, 8, 1)
    assert all(torch.equal(a, b) for a, b in zip(got, expected[:5]))
    out, size_out = merge_export(x, size, expected.unm_idx, expected.dst_start, expected.dst_src, 1, "mlerp")
    want, want_size = ref.merge_tokens(x, expected, size, "mlerp")
    assert_close(out, want, name="merge_export")
    assert torch.equal(size_out, want_size)


def test_export_ops_are_used_only_while_exporting_cuda(monkeypatch):
    cpu = torch.zeros(1)
    assert ops._match_impl(cpu) is ops._match_op and ops._merge_impl(cpu) is ops._merge_op
    monkeypatch.setattr(ops, "_is_exporting", lambda: True)
    assert ops._match_impl(cpu) is ops._match_op  # CPU export runs the reference, never these
