"""The parts of bench/probe.py and bench/export_check.py that run without a GPU."""
import torch

import export_check
import probe


def test_probe_refuses_without_cuda(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert probe.main([]) == 2
    assert "needs CUDA" in capsys.readouterr().err


def test_export_check_refuses_without_cuda(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert export_check.main([]) == 2
    assert "needs CUDA" in capsys.readouterr().err
