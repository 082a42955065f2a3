"""Microbenchmarks of the Stable Diffusion step (spatial match + merge + unmerge), ours vs tomesd's.

One block's step on a latent grid: the PyTorch reference of ``tofu_triton`` (the path
``tofu_triton.patch.diffusers`` runs today) against tomesd's own
``bipartite_soft_matching_random2d`` merge and unmerge, 2x2 cells, ratio 0.5, mean,
C = 320 (SD's first block). Scope ``cpu``: a 32x32 grid; ``gpu`` / ``full``: 64x64
(SD 1.5 at 512 px), 128x128 (SDXL at 1024 px) and 256x256 (2048 px), batch 2.
"""
import pytest
import torch

from measure import time_cuda, time_loop
from tofu_triton import reference

GRIDS = {"cpu": [(32, 32)], "gpu": [(64, 64), (128, 128), (256, 256)], "full": [(64, 64), (128, 128), (256, 256)]}
C, RATIO, BATCH = 320, 0.5, 2


def _ours(x, h, w, r):
    part = reference.spatial_partition(h, w, 2, 2, device=x.device)
    match = reference.spatial_match(x, part, r)
    return reference.spatial_unmerge(reference.spatial_merge(x, match, part, "mean"), match, part)


def _tomesd(x, h, w, r):
    from tomesd import merge as tm

    m, u = tm.bipartite_soft_matching_random2d(x, w, h, 2, 2, r, no_rand=True)
    return u(m(x, mode="mean"))


def pytest_generate_tests(metafunc):
    if "grid" in metafunc.fixturenames:
        grids = GRIDS[metafunc.config.tofu_scope]
        metafunc.parametrize("grid", grids, ids=[f"{h}x{w}" for h, w in grids])


@pytest.mark.parametrize("impl", ["reference", "tomesd"])
def test_sd_step(impl, grid, device, within_budget, record_case, benchmark):
    if impl == "tomesd":
        pytest.importorskip("tomesd", reason="tomesd is not installed (pip install -e \".[test]\")")
    h, w = grid
    x = torch.randn(BATCH, h * w, C, device=device, dtype=torch.float16 if device == "cuda" else torch.float32)
    r = int(h * w * RATIO)
    step = _ours if impl == "reference" else _tomesd
    out = step(x, h, w, r)
    assert out.shape == x.shape

    def run_synced():
        step(x, h, w, r)
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"sd-step-{h}x{w}"
    benchmark.pedantic(run_synced, rounds=5 if device == "cuda" else 10, warmup_rounds=1, iterations=1)
    info = dict(kind_of="sd_step", impl=impl, h=h, w=w, c=C, batch=BATCH, ratio=RATIO, device=device)
    if not benchmark.disabled:
        if device == "cuda":
            info.update(time_cuda(lambda: step(x, h, w, r)))
            info["loop_ms"] = time_loop(lambda: step(x, h, w, r), device)
        else:
            info["median_ms"] = benchmark.stats.stats.median * 1e3
    benchmark.extra_info.update(info)
    record_case(info)
