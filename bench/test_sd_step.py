"""Microbenchmarks of the Stable Diffusion step: spatial match + merge, and unmerge + residual.

One block's step on a latent grid, 2x2 cells, ratio 0.5, mean merge, C = 320
(SD's first block), batch 2 (classifier-free guidance), three implementations:

* ``triton``    the fused kernels (``tofu_triton.ops.spatial_*``, backend="triton"; CUDA only): 4 launches
  to merge (partition, scores, select, merge), 1 to unmerge; the scores and select are the candidates the
  dispatch table names for this card (the "sort" select is ~8 small torch ops, the "dot" scores 2 launches)
* ``reference`` the PyTorch reference of ``tofu_triton`` (``backend="reference"``)
* ``tomesd``    tomesd's own ``bipartite_soft_matching_random2d`` merge and unmerge (the peer;
  tests/test_patch_diffusers.py checks it equal to the reference)

``stage``: ``merge`` = partition + match + merge (what runs before the sub-layer), ``unmerge`` =
the gather back to N rows plus the block's residual add (after it).
Scope ``cpu``: a 32x32 grid; ``gpu`` / ``full``: 64x64 (SD 1.5 at 512 px, N = 4096),
128x128 (SDXL at 1024 px, N = 16384) and 256x256 (2048 px, N = 65536).
"""
import os

import pytest
import torch

from measure import time_cuda, time_cuda_graph, time_loop
from tofu_triton import ops

GRIDS = {"cpu": [(32, 32)], "gpu": [(64, 64), (128, 128), (256, 256)], "full": [(64, 64), (128, 128), (256, 256)]}
C, RATIO, BATCH = 320, 0.5, 2


def _ours(backend):
    def steps(x, h, w, r):
        def merge():  # the partition too, as tomesd's merge builds its own
            part = ops.spatial_partition(h, w, 2, 2, device=x.device, backend=backend)
            match = ops.spatial_match(x, part, r, backend=backend)
            return part, match, ops.spatial_merge(x, match, part, "mean", backend=backend)

        part, match, y = merge()
        return merge, lambda: ops.spatial_unmerge(y, match, part, x, backend=backend)
    return steps


def _tomesd(x, h, w, r):
    from tomesd import merge as tm

    def merge():
        m, u = tm.bipartite_soft_matching_random2d(x, w, h, 2, 2, r, no_rand=True)
        return u, m(x, mode="mean")

    u, y = merge()
    return merge, lambda: u(y) + x


IMPLS = {"triton": _ours("triton"), "reference": _ours("reference"), "tomesd": _tomesd}


def pytest_generate_tests(metafunc):
    if "grid" in metafunc.fixturenames:
        grids = GRIDS[metafunc.config.tofu_scope]
        metafunc.parametrize("grid", grids, ids=[f"{h}x{w}" for h, w in grids])


@pytest.mark.parametrize("stage", ["merge", "unmerge"])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_sd_step(impl, stage, grid, device, within_budget, record_case, benchmark):
    if impl == "tomesd":
        pytest.importorskip("tomesd", reason="tomesd is not installed (pip install -e \".[test]\")")
    if impl == "triton" and device != "cuda":
        pytest.skip("the fused Triton step needs CUDA (bench never uses the interpreter)")
    if impl == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set: interpreted kernels are not worth timing")
    h, w = grid
    x = torch.randn(BATCH, h * w, C, device=device, dtype=torch.float16 if device == "cuda" else torch.float32)
    r = int(h * w * RATIO)
    merge, unmerge = IMPLS[impl](x, h, w, r)
    fn = merge if stage == "merge" else unmerge
    if stage == "unmerge":
        assert fn().shape == x.shape

    def run_synced():
        fn()
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"sd-{stage}-{h}x{w}"
    benchmark.pedantic(run_synced, rounds=5 if device == "cuda" else 10, warmup_rounds=1, iterations=1)
    info = dict(kind_of="sd_step", impl=impl, stage=stage, h=h, w=w, c=C, batch=BATCH, ratio=RATIO, device=device)
    if not benchmark.disabled:
        if device == "cuda":
            info.update(time_cuda(fn))
            info["loop_ms"] = time_loop(fn, device)
            info["graph_ms"] = time_cuda_graph(fn)  # device time without the host's launch overhead
        else:
            info["median_ms"] = benchmark.stats.stats.median * 1e3
    benchmark.extra_info.update(info)
    record_case(info)
