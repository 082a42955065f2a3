"""What Triton's per-call binding costs each of our launches, on the CPU, with Triton's real binder.

Every ``kernel[grid](...)`` call runs Triton's ``JITFunction.run``: a generated function binds the arguments
and computes their specialization (dtype and 16-byte alignment of each pointer, divisibility and ==1 of each
integer), then a cache key is looked up, then the C launcher is called. Launching without that binding
(caching the compiled kernel per call site) only pays where the binding is a large part of a launch. This
script measures the binding where no GPU is needed: each launcher of the ViT step and the attention is run
with a ``wrap`` that records the arguments it would launch with instead of launching (the launcher's own
Python, allocations included, is timed that way too), then Triton's binder for that kernel (built for an
sm_90 target) is timed on exactly those arguments, and the cache-key lookup after it.

It is a CPU proxy: it shows the proportions on this machine, not the card's host times (on the H200's host
an empty launch measured 18 us and our launchers 38-59 us: bench/results/h200-2026-12-04-run4/host_profile.md).

    python bench/launch_binding.py --out bench/results
"""
import argparse
import json
import os
import sys
import time
import timeit

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime.jit import compute_cache_key, create_function_from_signature

from tofu_triton.kernels import attention, match, merge, select, step

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure import command_line, git_commit  # noqa: E402

# ViT-B/16 at B = 1, r = 16, fp16: the shapes of the H200's host profile.
B, N, C, H, D, R = 1, 197, 768, 12, 64, 16


class Recorder:
    """A launcher ``wrap`` that records (kernel, args, kwargs) instead of launching: ``wrap(kernel)[grid](...)``."""

    def __init__(self):
        self.calls = []
        self.kernel = None

    def __call__(self, kernel):
        self.kernel = kernel
        return self

    def __getitem__(self, grid):
        return self.record

    def record(self, *args, **kwargs):
        self.calls.append((self.kernel, args, kwargs))


def launchers(small: bool) -> dict:
    """name -> fn(wrap): each launcher of the step and the attention on ViT-B/16 inputs (tiny with ``small``)."""
    b, n, h, d, r = (1, 17, 2, 16, 4) if small else (B, N, H, D, R)
    c = h * d
    na, nb = (n - 1 + 1) // 2, (n - 1) // 2
    x = torch.randn(b, n, c, dtype=torch.float16)
    keys = torch.randn(b, n, 3, h, d, dtype=torch.float16).permute(2, 0, 3, 1, 4)[1]
    size = torch.ones(b, n, 1)
    metric = torch.randn(b, n, d, dtype=torch.float16)
    node_max, node_idx = torch.rand(b, na), torch.zeros(b, na, dtype=torch.int64)
    unm_idx, dst_start, dst_src = (torch.zeros(b, k, dtype=torch.int64) for k in (na - r, nb + 1, r))
    q = torch.randn(b, h, n, d, dtype=torch.float16)
    bias = torch.zeros(b, 1, 1, n)
    return {
        "step (one_launch)": lambda w: step.token_fusion_step(x, keys, size, r, 1, "mlerp", torch.float16, wrap=w,
                                                              path="one_launch"),
        "head_mean": lambda w: match.head_mean(keys, wrap=w),
        "match_scores": lambda w: match.match_scores(metric, 1, wrap=w),
        "select": lambda w: select.select(node_max, node_idx, r, nb, wrap=w),
        "merge_forward": lambda w: merge.merge_forward(x, size, unm_idx, dst_start, dst_src, 1, "mlerp", wrap=w),
        "attention": lambda w: attention.biased_attention(q, q, q, bias, wrap=w),
    }


def per_call_us(fn, calls: int) -> float:
    return round(min(timeit.repeat(fn, number=calls, repeat=3)) / calls * 1e6, 2)


def time_launcher(name: str, launch, backend, calls: int) -> dict:
    """One row: ``launch``'s own Python, then Triton's binder and cache-key lookup on the arguments it built."""
    recorder = Recorder()
    launch(recorder)
    (kernel, args, kwargs), = recorder.calls
    options = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")}
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    _, specialization, opts = binder(*args, **options)
    key_cache = {}
    compute_cache_key(key_cache, specialization, opts)  # after the first call, a lookup
    return dict(launcher=name, kernel=kernel.__name__, arguments=len(args) + len(options),
                launcher_python_us=per_call_us(lambda: launch(Recorder()), calls),
                binder_us=per_call_us(lambda: binder(*args, **options), calls),
                cache_key_us=per_call_us(lambda: compute_cache_key(key_cache, specialization, opts), calls))


def measure(small: bool) -> list:
    backend = make_backend(GPUTarget("cuda", 90, 32))
    calls = 200 if small else 20000
    return [time_launcher(name, launch, backend, calls) for name, launch in launchers(small).items()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--small", action="store_true", help="tiny shapes, few calls (smoke run)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("launch_binding: run it without TRITON_INTERPRET=1 (it times the binder of the compiled kernels; "
              "nothing is launched, so no GPU is needed)", file=sys.stderr)
        return 2
    t0 = time.time()
    rows = measure(args.small)
    prov = dict(machine=f"CPU ({os.cpu_count()} cores)", date=time.strftime("%Y-%m-%d"), commit=git_commit(),
                torch=torch.__version__, triton=triton.__version__,
                command=command_line(argv))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "launch_binding_cpu.json"), "w") as f:
        json.dump(dict(provenance=prov, shape=dict(B=B, N=N, C=C, H=H, D=D, r=R), rows=rows), f, indent=1)
    lines = [f"# Triton's per-call binding against our launchers' own Python ({prov['machine']}, {prov['date']}, "
             f"commit {prov['commit']}, torch {prov['torch']}, triton {prov['triton']})", "", f"`{prov['command']}`",
             "", "ViT-B/16 at B = 1, r = 16, fp16 inputs on the CPU; us per call, best of three rounds. "
             "'launcher' is our launcher's Python up to the launch (argument checks, allocations, grid); "
             "'binder' is Triton's argument binding and specialization for an sm_90 target on the same "
             "arguments; 'cache key' its kernel-cache lookup after that. A CPU proxy: proportions only.", "",
             "| launcher | kernel | arguments | launcher us | binder us | cache key us |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['launcher']} | `{r['kernel']}` | {r['arguments']} | {r['launcher_python_us']} | {r['binder_us']} "
              f"| {r['cache_key_us']} |" for r in rows]
    with open(os.path.join(args.out, "launch_binding_cpu.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"launch_binding: {len(rows)} launchers in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
