"""Microbenchmarks of one token-reduction step (match + merge), four ways.

Implementations, side by side on inputs of the same shapes:

* ``step``      the one-launch ViT step, ``tofu_triton.token_fusion_step(..., backend="triton")``
                from the block's keys [B, H, N, 64] (a view of a qkv projection; H = C / 64),
                averaged over heads inside the kernel (CUDA only; N <= 1025);
* ``triton``    the three-launch path, ``tofu_triton.token_fusion(..., backend="triton")``
                on a given metric (CUDA only: match, select, merge; no score matrix in memory);
* ``reference`` ``tofu_triton.reference.token_fusion``: the op's definition;
* ``tome``      ``tome_baseline.tome_step``: unfused PyTorch the way ToMe writes it.

Case axes: N with C fixed per N (197/768 ViT-B, 577/1024 ViT-L at 384 px,
1025/1280 ViT-H at 448 px, 4096/320 a Stable Diffusion latent), r fixed per N
(16, 48, 96, 1024), metric dim D = 64 (a head dim), one protected token,
sizes given (mid-network), B in {1, 8, 64, 256}, fp16/bf16/fp32,
mean/mlerp/prune, forward or forward+backward. ``--tofu-scope`` picks a
subset (see ``cases``).

What gets recorded per case (``benchmark.extra_info``, and --tofu-jsonl):
``median_ms`` (CUDA events via do_bench on GPU, see ``measure.py``; host
timer on CPU), ``loop_ms`` (GPU: steady-state eager time per call, launch
overhead included), ``gbps`` (``step_bytes`` / device time), ``copy_frac`` (of the
session's measured copy bandwidth), ``launches`` per step (torch.profiler, at B = 1 and 256),
``peak_bytes`` (beyond the live inputs), ``graph_median_ms`` (forward,
replayed from a CUDA graph), ``device_ms`` (the graph time where there is
one, else the median: what GB/s is computed from). pytest-benchmark's own table is host
wall time per call including a ``torch.cuda.synchronize()``: the launch
overhead a synchronous caller sees, not the kernel time.
"""
import itertools
import time
from dataclasses import asdict, dataclass

import pytest
import torch

import tofu_triton
from measure import (DTYPES, count_launches, peak_memory, step_bytes, time_cuda,
                     time_cuda_graph, time_loop)
from tofu_triton import reference
from tofu_triton.testing import make_inputs
from tofu_triton.testing.tome_baseline import tome_step

IMPLS = ("step", "triton", "reference", "tome")
# (N, C, r): C and r fixed per N so the GPU case count stays sane.
SHAPES = ((197, 768, 16), (577, 1024, 48), (1025, 1280, 96), (4096, 320, 1024))
BATCHES = (1, 8, 64, 256)
D = 64
PROTECTED = 1


@dataclass(frozen=True)
class StepCase:
    impl: str
    n: int
    c: int
    r: int
    batch: int
    dtype: str
    mode: str
    backward: bool

    @property
    def id(self) -> str:
        pass_ = "fwdbwd" if self.backward else "fwd"
        return f"{self.impl}-{pass_}-{self.dtype}-{self.mode}-N{self.n}-C{self.c}-B{self.batch}"


def cases(scope: str):
    """The case list of a scope, most important first (a budget cuts from the end).

    cpu:  N=197, C=384, B in {1, 8}, fp32, every mode, fwd and fwd+bwd.
    gpu:  every shape and batch for fp16 x every mode forward and fp16 x
          mean/mlerp forward+backward; bf16 and fp32 mean forward at B in
          {8, 256} (288 cases, sized for about 3 minutes on an H100).
    full: every combination (864 cases; about 15 minutes on an H100).
    """
    out = []

    def add(dtypes, modes, passes, shapes=SHAPES, batches=BATCHES):
        for (n, c, r), batch, dtype, mode, backward in itertools.product(shapes, batches, dtypes, modes, passes):
            for impl in IMPLS:
                case = StepCase(impl, n, c, r, batch, dtype, mode, backward)
                if impl == "step" and n > 1025:
                    continue  # the one-launch step is for ViT token counts
                if case not in out:
                    out.append(case)

    modes = ("mean", "mlerp", "prune")
    if scope == "cpu":
        add(("fp32",), modes, (False, True), shapes=((197, 384, 16),), batches=(1, 8))
    elif scope == "gpu":
        add(("fp16",), modes, (False,))
        add(("fp16",), ("mean", "mlerp"), (True,))
        add(("bf16", "fp32"), ("mean",), (False,), batches=(8, 256))
    else:
        add(("fp16", "bf16", "fp32"), modes, (False, True))
    return out


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        selected = cases(metafunc.config.tofu_scope)
        metafunc.parametrize("case", selected, ids=[c.id for c in selected])


def _step_fn(case: StepCase):
    if case.impl == "step":  # the metric argument is the keys here
        return lambda x, k, s: tofu_triton.token_fusion_step(x, k, case.r, s, case.mode, PROTECTED, backend="triton",
                                                             with_match=False)[:2]
    if case.impl == "triton":
        return lambda x, m, s: tofu_triton.token_fusion(x, m, case.r, s, case.mode, PROTECTED, backend="triton")
    if case.impl == "reference":
        return lambda x, m, s: reference.token_fusion(x, m, case.r, s, case.mode, PROTECTED)
    return lambda x, m, s: tome_step(x, m, case.r, s, case.mode, PROTECTED)


# Launch counts depend on the code path, hardly on B and not on the dtype;
# a profiler run per case would add minutes to a GPU run, so count
# at the smallest and largest B only, once per key.
LAUNCH_BATCHES = (1, 256)
_LAUNCHES = {}


def test_step(case, device, copy_bw, within_budget, record_case, benchmark):
    if case.impl in ("triton", "step"):
        if device != "cuda":
            pytest.skip("the fused Triton step needs CUDA (bench never uses the interpreter)")
        from tofu_triton.kernels.common import interpreting

        if interpreting():
            pytest.skip("TRITON_INTERPRET=1 is set: interpreted kernels are not worth timing")

    dtype = DTYPES[case.dtype]
    x, metric, size = make_inputs(case.batch, case.n, case.c, D, dtype, device)
    if case.impl == "step":  # the block's keys, laid out as a qkv projection leaves them
        qkv = torch.randn(case.batch, case.n, 3 * case.c, device=device, dtype=dtype)
        metric = qkv.view(case.batch, case.n, 3, case.c // D, D).permute(2, 0, 3, 1, 4)[1]
    step = _step_fn(case)
    if case.backward:
        x.requires_grad_(True)
        grad_out = torch.randn(case.batch, case.n - case.r, case.c, device=device, dtype=dtype)

        def run():
            x.grad = None
            step(x, metric, size)[0].backward(grad_out)
    else:
        def run():
            return step(x, metric, size)

    def run_synced():
        run()
        if device == "cuda":
            torch.cuda.synchronize()

    # Host wall time for pytest-benchmark's table (one call when --benchmark-disable).
    benchmark.group = f"{'fwdbwd' if case.backward else 'fwd'}-{case.dtype}-{case.mode}-N{case.n}-B{case.batch}"
    rounds = 10 if device == "cuda" else 20
    benchmark.pedantic(run_synced, rounds=rounds, warmup_rounds=2, iterations=1)

    info = dict(asdict(case), d=D, protected=PROTECTED, device=device, copy_gbps=copy_bw,
                bytes=step_bytes(case.batch, case.n, case.c, case.c if case.impl == "step" else D, case.r, dtype,
                                 case.mode, case.backward, PROTECTED))
    if benchmark.disabled:
        info["timer"] = "none (--benchmark-disable: ran once)"
    elif device == "cuda":
        info["timer"] = "cuda events (triton do_bench: L2 flushed, median)"
        info.update(time_cuda(run, grad_to_none=[x] if case.backward else None))
        info["loop_ms"] = time_loop(run, device)
        if not case.backward:  # device time without launch overhead, at every batch
            info["graph_median_ms"] = time_cuda_graph(run)
        key = (case.impl, case.n, case.batch, case.mode, case.backward)
        if case.batch in LAUNCH_BATCHES and key not in _LAUNCHES:
            try:
                _LAUNCHES[key] = count_launches(run)
            except Exception as e:  # counting is a nicety; never lose the timing over it
                _LAUNCHES[key] = {"launches": None, "memops": None, "launch_error": repr(e)}
        info.update(_LAUNCHES.get(key, {}))
        info["peak_bytes"] = peak_memory(run)
    else:
        info["timer"] = "host perf_counter (pytest-benchmark, median)"
        info["median_ms"] = benchmark.stats.stats.median * 1e3
    # Device time: the CUDA-graph replay where there is one (no launch overhead,
    # which at small steps is most of do_bench's median), else the median.
    info["device_ms"] = info.get("graph_median_ms") or info.get("median_ms")
    if info["device_ms"]:
        info["gbps"] = info["bytes"] / info["device_ms"] / 1e6
        info["copy_frac"] = info["gbps"] / copy_bw
    info["finished"] = time.strftime("%H:%M:%S")
    benchmark.extra_info.update({k: v for k, v in info.items() if k != "kernel_names"})
    record_case(info)
