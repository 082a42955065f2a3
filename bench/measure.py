"""How ``bench/`` measures: device timing, copy bandwidth, launches, memory, bytes.

Three CUDA timings per step, because launch overhead matters at small B:

* ``median_ms`` is ``triton.testing.do_bench``: CUDA events around each call,
  the L2 cache flushed before each call, a warm-up first, the median (and
  20th/80th percentiles) of the timed calls. This is close to device time:
  while the GPU runs the ~0.1 ms cache flush, the CPU gets ahead launching
  the step, so launch overhead shows only where it exceeds the flush.
* ``loop_ms`` is what an eager caller sees in steady state: many calls back
  to back, events around the whole window, divided by the count (median of
  three windows). A step bound by the CPU launching its kernels (~20 small
  kernels at B=1 for ToMe-style, Triton's Python launcher for the fused path)
  pays that here. L2 is not flushed (in a model the input was just written).
* ``graph_median_ms`` replays the step from a CUDA graph: no launch overhead.

On the CPU there are no events: pytest-benchmark's own host timer is used,
which is correct there because CPU ops are synchronous.

The byte counts are the least any implementation must move (each input read
once, each output written once; the Match indices in between are not
counted), so "GB/s" and "% of copy bandwidth" are comparable across
implementations and honest about how far from the memory roofline a step is.
"""
import os
import time
from typing import Callable, Dict, Optional

import torch

DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}


def step_bytes(batch: int, n: int, c: int, d: int, r: int, dtype: torch.dtype, mode: str,
               backward: bool, protected: int = 1) -> int:
    """Fewest bytes one step must move through device memory.

    Forward: read the metric of the N - protected non-prefix tokens, read the
    x rows and sizes that reach the output (all N for mean/mlerp; the N - r
    kept ones for prune, whose sources are never read), write x_out and
    size_out. Backward adds: read grad_out, write grad_x (all N rows), read
    sizes, and for mlerp re-read the rows of merged groups (counted as 2r: r
    sources and at most r destinations).
    """
    es = torch.empty((), dtype=dtype).element_size()
    n_out = n - r
    rows_read = n_out if mode == "prune" else n
    fwd = (n - protected) * d * es + rows_read * (c * es + 4) + n_out * (c * es + 4)
    total = fwd
    if backward:
        total += n_out * c * es + n * c * es + n * 4
        if mode == "mlerp":
            total += 2 * r * c * es
    return batch * total


def time_cuda(fn: Callable, grad_to_none=None, warmup_ms: int = 10, rep_ms: int = 50) -> Dict[str, float]:
    """Median and 20/80th percentile of ``fn`` in ms (``do_bench`` semantics, see module doc)."""
    from triton.testing import do_bench

    p20, p50, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                             quantiles=[0.2, 0.5, 0.8])
    return {"median_ms": p50, "p20_ms": p20, "p80_ms": p80}


def time_loop(fn: Callable, device: str = "cuda", min_time_s: float = 0.015, grad_to_none=None) -> float:
    """Median ms per call over three windows of back-to-back calls (see module doc).

    Each window lasts about ``min_time_s``; on CUDA it is bracketed by events
    (launch overhead included, as an eager caller sees it), on the CPU by the
    host clock (CPU ops are synchronous).
    """
    cuda = device == "cuda" or str(device).startswith("cuda")

    def window(iters: int) -> float:
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            t0 = time.perf_counter()
        for _ in range(iters):
            for t in grad_to_none or ():
                t.grad = None
            fn()
        if cuda:
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / iters
        return (time.perf_counter() - t0) * 1e3 / iters

    for _ in range(3):
        fn()
    estimate = window(2)
    iters = max(2, int(min_time_s * 1e3 / max(estimate, 1e-3)))
    return sorted(window(iters) for _ in range(3))[1]


def capture_graph(fn: Callable, warmup: int = 3) -> Callable:
    """Capture one call of ``fn`` in a CUDA graph (after ``warmup`` calls on a
    side stream, as torch.cuda.graphs asks); returns a replay that gives the
    captured call's static output. Raises if ``fn`` cannot be captured (a host
    sync, a CPU tensor, an allocation the graph cannot own)."""
    from tofu_triton import dispatch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), dispatch.for_graphs():  # warm up the kernels the capture will record
        for _ in range(max(1, warmup)):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay():
        graph.replay()
        return out

    return replay


def time_cuda_graph(fn: Callable, warmup_ms: int = 10, rep_ms: int = 50, warm_l2: bool = False) -> Optional[float]:
    """Median ms of replaying ``fn`` from a CUDA graph (``do_bench``: L2 flushed before each replay), or
    with ``warm_l2`` the ms per replay of replays back to back (``time_loop``: inputs that fit stay in L2,
    as in a model whose previous kernels just wrote them); None if it cannot be captured."""
    try:
        replay = capture_graph(fn)
        return time_loop(replay) if warm_l2 else time_cuda(replay, warmup_ms=warmup_ms, rep_ms=rep_ms)["median_ms"]
    except Exception:  # a step that syncs or allocates on the host cannot be captured
        torch.cuda.synchronize()
        return None


def copy_bandwidth(device: str, nbytes: int = 1 << 30) -> Dict[str, float]:
    """Bandwidth of one large ``Tensor.copy_`` in GB/s, counting bytes read + written.

    On CUDA: a 1 GiB device-to-device copy timed like every step. On the CPU:
    a 64 MiB copy, best of 10 host-timed runs (the CPU number only gives the
    CPU table a scale; it is not a roofline anyone should quote).
    """
    if device == "cuda":
        src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
        dst = torch.empty_like(src)
        ms = time_cuda(lambda: dst.copy_(src), warmup_ms=25, rep_ms=200)["median_ms"]
        del src, dst
        torch.cuda.empty_cache()
        return {"copy_gbps": 2 * nbytes / ms / 1e6, "copy_bytes": nbytes, "copy_ms": ms}
    nbytes = 64 << 20
    src = torch.rand(nbytes // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(10):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return {"copy_gbps": 2 * nbytes / best / 1e9, "copy_bytes": nbytes, "copy_ms": best * 1e3}


def count_launches(fn: Callable) -> Dict[str, object]:
    """Kernels one call of ``fn`` puts on the GPU, counted with torch.profiler.

    ``launches`` counts kernels; ``memops`` counts memcpy/memset operations
    (not kernels, but each is a separate operation on the stream);
    ``kernel_us`` is the device time per kernel name. The call is warmed up
    first so compilation and one-time allocations stay out.
    """
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if str(e.device_type).endswith("CUDA")]
    names = [e.name for e in events]
    memops = sum(1 for name in names if name.startswith(("Memcpy", "Memset")))
    out = {"launches": len(names) - memops, "memops": memops, "kernel_names": sorted(set(names))}
    try:  # device time per kernel name (µs), to see which kernel a step spends its time in
        kernel_us = {}
        for e in events:
            kernel_us[e.name] = kernel_us.get(e.name, 0.0) + e.time_range.elapsed_us()
        out["kernel_us"] = kernel_us
    except AttributeError:  # profiler event layout of another torch version
        pass
    return out


def peak_memory(fn: Callable) -> int:
    """Bytes allocated beyond what was live before one call of ``fn`` (peak)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def run_script(name: str, *args: str, timeout: float = 600, cwd: Optional[str] = None):
    """Run ``bench/<name>`` with ``args`` in a fresh Python (the smoke tests' one way to call a script):
    on a machine without CUDA, its Triton kernels in the interpreter. Returns the CompletedProcess."""
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ) if torch.cuda.is_available() else dict(os.environ, TRITON_INTERPRET="1")
    return subprocess.run([sys.executable, os.path.join(here, name), *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=cwd)


def command_line(argv=None) -> str:
    """The command a bench script was run with, for its provenance: ``python <script> <args>`` (``argv`` as
    given to its ``main``, else the process's own)."""
    import sys

    return "python " + " ".join([sys.argv[0]] + list(argv if argv is not None else sys.argv[1:]))


def refuse_without_gpu(script: str, small: bool, write_table: bool = False) -> Optional[int]:
    """The check every script that measures on a GPU makes first: None when the run may go on, else 2
    after a one-line reason on stderr. Without CUDA only ``--small`` runs (the kernels in Triton's
    interpreter, to keep the script working), and never with ``--write-table`` (its times mean nothing)."""
    import sys

    from tofu_triton.kernels.common import interpreting

    if torch.cuda.is_available():
        return None
    if write_table:
        print(f"{script}: --write-table needs a GPU (interpreter times mean nothing)", file=sys.stderr)
        return 2
    if not (small and interpreting()):
        print(f"{script}: needs a CUDA GPU (on the CPU only --small, with TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    return None


def git_commit(where: Optional[str] = None) -> str:
    """The short commit of the checkout at ``where`` (default: this one), or "unknown"."""
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=where or os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def environment() -> Dict[str, str]:
    """Card, library versions and date, for every result file."""
    import platform

    import triton

    info = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "device": (torch.cuda.get_device_name() if torch.cuda.is_available()
                   else f"CPU ({platform.processor() or platform.machine()})"),
    }
    try:
        import timm

        info["timm"] = timm.__version__
    except ImportError:
        pass
    return info
