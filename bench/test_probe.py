"""The parts of bench/probe.py and bench/export_check.py that run without a GPU."""
import pytest
import torch
import torch.nn.functional as F

import export_check
import probe


@pytest.mark.parametrize("head_dim", [64, 80, 7])
def test_bias_channel_equals_the_float_mask(head_dim):
    g = torch.Generator().manual_seed(head_dim)
    q, k, v = (torch.randn(2, 3, 19, head_dim, generator=g) for _ in range(3))
    log_size = (1 + 5 * torch.rand(2, 19, generator=g)).log()
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=log_size[:, None, None, :])
    got = probe.sdpa_bias_channel(q, k, v, log_size)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, F.scaled_dot_product_attention(q, k, v), atol=1e-3)  # the bias does matter


def test_probe_refuses_without_cuda(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert probe.main([]) == 2
    assert "needs CUDA" in capsys.readouterr().err


def test_export_check_refuses_without_cuda(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert export_check.main([]) == 2
    assert "needs CUDA" in capsys.readouterr().err
