"""What the subcommands share: the device, the model, one timing loop, one-line errors."""
import argparse
import os
import time
from typing import Callable, List, Tuple, TypeVar

import torch

from ..models import create_vit

T = TypeVar("T")


def resolve_device(device: str) -> str:
    """``auto`` -> cuda if available else cpu; SystemExit with one line if ``cuda`` is asked for and absent."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible to torch (torch.cuda.is_available() is False); "
                         "use --device cpu")
    return device


def check_out_folder(parser: argparse.ArgumentParser, option: str, path: str, what: str) -> None:
    """parser.error (one line, exit 2) unless ``path`` is a folder or can be made one: checked before the
    run, not when the first picture is saved after the model has run."""
    if os.path.exists(path) and not os.path.isdir(path):
        parser.error(f"{option} {path} is a file; give a folder for {what} (created if missing)")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):  # makedirs creates the missing folders above it too
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        parser.error(f"{option} {path}: {parent} is a file, so no folder can be made below it; give another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        parser.error(f"{option} {path}: cannot create a folder in {parent} (permission denied)")


def check_out_file(parser: argparse.ArgumentParser, option: str, path: str) -> None:
    """parser.error (one line, exit 2) unless a file can be written at ``path``: checked before the run,
    not after an evaluation that may take an hour."""
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        parser.error(f"{option} {path} is a folder; give a file name")
    if not os.path.isdir(parent):
        parser.error(f"{option} {path}: the folder {parent} does not exist; create it or give another path")
    if not os.access(parent, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        parser.error(f"{option} {path}: cannot write there (permission denied)")


def load_model(name: str, pretrained: bool, seed: int, **overrides) -> torch.nn.Module:
    """:func:`tofu_triton.models.create_vit`, with a one-line SystemExit for a bad model or failed download."""
    try:
        return create_vit(name, pretrained=pretrained, seed=seed, **overrides)
    except ValueError as e:
        raise SystemExit(f"--model: {e}") from None
    except (OSError, RuntimeError) as e:  # pretrained weights that could not be fetched or read
        raise SystemExit(f"--model {name}: could not load pretrained weights ({type(e).__name__}: {e})") from None


def timed(fn: Callable[..., T], *args, cuda: bool) -> Tuple[T, float]:
    """``fn(*args)`` and the seconds it took. On CUDA the device is synchronised before and
    after, so the time is that of the GPU work, not of queueing the launches."""
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(*args)
    if cuda:
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def time_windows(fn: Callable[[], object], windows: int, calls: int = 1, warmup: int = 0,
                 cuda: bool = False) -> List[float]:
    """Seconds per call of ``fn()`` in each of ``windows`` timed windows of ``calls`` calls each,
    after ``warmup`` untimed calls (Triton compiles on first use; cuDNN and the allocator settle)."""
    for _ in range(warmup):
        fn()

    def window():
        for _ in range(calls):
            fn()

    return [timed(window, cuda=cuda)[1] / calls for _ in range(windows)]
