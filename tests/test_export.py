"""torch.export + AOTInductor of patched models (CPU, reference backend), and the export ops."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tofu_triton.patch as tp
from tofu_triton import attention, ops
from tofu_triton import reference as ref
from tofu_triton.models import create_vit
from tofu_triton.testing import assert_close, make_inputs

from conftest import ON_GPU
from test_attention import cuda_like  # noqa: F401 (the fixture)


def _round_trip(model, args=(), kwargs=None, tmp_path=None):
    """(exported program, the AOTInductor package loaded back)."""
    kwargs = kwargs or {}
    program = torch.export.export(model, args, kwargs)
    path = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "model.pt2"))
    return program, torch._inductor.aoti_load_package(path)


def test_timm_vit_exports_and_packages(tmp_path, cuda_like):  # noqa: F811 (the imported fixture)
    # Attention chosen as on an H200 with cuDNN, from the committed table (the test
    # below uses a table where cuDNN wins).
    cuda_like()
    model = tp.timm(create_vit("smoke"), r=2, mode="tofu", backend="reference")
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x)
    program, package = _round_trip(model, (x,), tmp_path=tmp_path)
    assert torch.equal(program.module()(x), expected)
    assert_close(package(x), expected, torch.float32, "AOTInductor package vs eager")


class SizedAttention(nn.Module):
    """q, k, v and a log-size bias all computed from parameters, so all need a gradient
    while torch.export traces (it traces with grad on), as in a patched ViT on CUDA."""

    def __init__(self, d=64):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.size = nn.Linear(d, 1)

    def forward(self, x):
        q, k, v = self.qkv(x)[:, None].chunk(3, dim=-1)  # [B, 1, N, d] each
        bias = F.logsigmoid(self.size(x))[:, None, None, :, 0]
        return attention.sized_attention(q, k, v, bias)


def test_export_on_cuda_never_hands_cudnn_a_bias_that_needs_a_gradient(cuda_like):  # noqa: F811
    # The H200 failure: auto took cuDNN, whose op cannot differentiate its bias, and
    # torch.export traces with grad on. The stand-in fails exactly so; the choice must
    # fall back to a differentiable path while tracing, and eager inference keeps cuDNN.
    calls = cuda_like("cudnn")
    torch.manual_seed(0)
    model = SizedAttention().half()
    x = torch.randn(2, 40, 64).half()
    with torch.no_grad():
        expected = model(x)
    assert calls == [(2, 1, 40, 64)], "eager inference on this card runs cuDNN"
    program = torch.export.export(model, (x,))
    assert calls == [(2, 1, 40, 64)], "the export traced the cuDNN path"
    assert_close(program.module()(x), expected, torch.float16, "exported vs eager")


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
    exports = ops._export_ops()
    match_export, merge_export, step_export = exports["match"], exports["merge"], exports["step"]
    x, metric, size = make_inputs(2, 33, 16, d=8, seed=4)
    expected = ref.bipartite_match(metric, 8, 1)
    got = match_export(metric, 8, 1)
    assert all(torch.equal(a, b) for a, b in zip(got, expected[:5]))
    out, size_out = merge_export(x, size, expected.unm_idx, expected.dst_start, expected.dst_src, 1, "mlerp")
    want, want_size = ref.merge_tokens(x, expected, size, "mlerp")
    assert_close(out, want, name="merge_export")
    keys = metric[:, None].expand(-1, 2, -1, -1)  # two equal heads: their mean is the metric
    step = ops._as_step(*step_export(x, keys, size, 8, 1, "mlerp", torch.float32), 33, 1, 8, with_bias=True)
    assert all(torch.equal(a, b) for a, b in zip(step.match[:5], expected[:5]))
    assert_close(step.x, want, name="step_export")
    assert_close(step.bias, ref.log_size_bias(want_size, torch.float32), name="step_export bias")
    assert torch.equal(size_out, want_size)


def test_each_caller_gets_its_way_into_the_kernels(monkeypatch):
    # Eager inference: the launcher itself; autograd or tracing: the custom op; export on CUDA: the triton_op.
    x = torch.zeros(1)
    assert ops._triton_path("step", x) is ops._LAUNCHES["step"]
    assert ops._triton_path("step", x.requires_grad_()) is ops._CUSTOM_OPS["step"]
    with torch.no_grad():
        assert ops._triton_path("step", x) is ops._LAUNCHES["step"]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert ops._triton_path("merge", torch.zeros(1)) is ops._CUSTOM_OPS["merge"]
    monkeypatch.setattr(torch.compiler, "_is_exporting_flag", True)
    assert ops._triton_path("match", torch.zeros(1)) is ops._CUSTOM_OPS["match"]  # a CPU export runs the reference
