"""Three quick GPU probes behind the end-to-end numbers (CUDA only, ~40 s).

    python bench/probe.py --out bench/results

1. ``attention``: what proportional attention costs on each path of
   :mod:`tofu_triton.attention` at ViT-B shapes (12 heads, head dim 64) and
   the token counts a ToFu ViT-B runs (197 down to 25): SDPA without a bias
   (the floor), and with the ``log(size)`` bias as a float mask (``mask``),
   through cuDNN (``cudnn``, where it runs), as an extra head channel
   (``channel``) and through compiled ``flex_attention`` (``flex``, at a few
   shapes: it compiles per shape). Each path's output is checked against the
   mask path; ``auto`` says which path ``tofu_triton.attention.choose`` takes.
2. ``sync``: one forward of a patched ViT-B (ToFu, Triton kernels) under
   ``torch.cuda.set_sync_debug_mode("error")``: any host sync (``.item()``,
   a data-dependent shape) raises, which would also break CUDA graphs.
3. ``launches``: kernels per forward of the unpatched, ToMe-style and ToFu
   models (torch.profiler), per block, and the host time to enqueue one
   forward at batch 1 (what bounds eager small-batch throughput).

Writes ``probe.json`` and ``probe.md`` under ``--out`` with the card, date,
versions and command.
"""
import argparse
import functools
import json
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from measure import count_launches, environment, time_cuda  # noqa: E402

HEADS, HEAD_DIM = 12, 64
PATHS = ("mask", "cudnn", "channel", "flex")
# flex_attention compiles once per shape (seconds each): time it at these only.
FLEX_CASES = {(64, 197), (64, 101), (256, 197)}


def attention_rows(batches, tokens, dtype):
    from tofu_triton import attention

    rows = []
    for batch in batches:
        for n in tokens:
            q, k, v = (torch.randn(batch, HEADS, n, HEAD_DIM, device="cuda", dtype=dtype) for _ in range(3))
            bias = (1 + 3 * torch.rand(batch, n, device="cuda")).log()[:, None, None, :].to(dtype)
            row = dict(batch=batch, n=n, auto=attention.choose(q))
            row["none_ms"] = time_cuda(functools.partial(F.scaled_dot_product_attention, q, k, v))["median_ms"]
            want = attention.sized_attention(q, k, v, bias, path="mask")
            for path in PATHS:
                if path == "cudnn" and row["auto"] != "cudnn":
                    row["cudnn_error"] = "does not run here"
                    continue
                if path == "flex" and (batch, n) not in FLEX_CASES:
                    continue
                fn = functools.partial(attention.sized_attention, q, k, v, bias, path=path)
                try:
                    row[f"{path}_max_abs_err"] = (fn().float() - want.float()).abs().max().item()
                    row[f"{path}_ms"] = time_cuda(fn)["median_ms"]
                except Exception as e:  # one path failing must not lose the others
                    row[f"{path}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            rows.append(row)
            print(f"attention B={batch:<4d} N={n:<4d} none {row['none_ms']:.4f} ms  " + "  ".join(
                f"{p} {row[p + '_ms']:.4f} ms ({row[p + '_ms'] / row['none_ms'] - 1:+.0%})" for p in PATHS
                if p + "_ms" in row) + f"  auto={row['auto']}", flush=True)
    return rows


def make_model(variant, dtype):
    import tofu_triton.patch as tp
    from tofu_triton.models import create_vit

    model = create_vit("vit_base_patch16_224").to("cuda", dtype)
    if variant == "tome":
        tp.timm(model, r=16, mode="tome", backend="reference")
    elif variant == "tofu":
        tp.timm(model, r=16, mode="tofu", backend="triton")  # attention="auto"
    return model


def sync_check(dtype):
    model = make_model("tofu", dtype)
    images = torch.randn(8, 3, 224, 224, device="cuda", dtype=dtype)
    with torch.inference_mode():
        model(images)  # compile and warm up outside the check
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            model(images)
            result = "no host sync in a ToFu (Triton) ViT-B forward"
        except RuntimeError as e:
            result = f"HOST SYNC: {str(e).splitlines()[0][:200]}"
        finally:
            torch.cuda.set_sync_debug_mode("default")
    print(f"sync: {result}", flush=True)
    return result


def launch_rows(dtype):
    rows = []
    for variant in ("unpatched", "tome", "tofu"):
        model = make_model(variant, dtype)
        images = torch.randn(1, 3, 224, 224, device="cuda", dtype=dtype)
        with torch.inference_mode():
            counts = count_launches(functools.partial(model, images))
            for _ in range(5):
                model(images)
            torch.cuda.synchronize()
            host = []
            for _ in range(20):  # enqueue time only: the GPU runs behind
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                model(images)
                host.append((time.perf_counter() - t0) * 1e3)
                torch.cuda.synchronize()
        host.sort()
        row = dict(variant=variant, launches=counts["launches"], memops=counts["memops"],
                   launches_per_block=counts["launches"] / len(model.blocks), host_ms_b1=host[len(host) // 2])
        rows.append(row)
        print(f"launches {variant:9s} {row['launches']:4d} per forward ({row['launches_per_block']:.1f} per block), "
              f"memops {row['memops']}, host enqueue {row['host_ms_b1']:.2f} ms at B=1", flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--dtype", default="fp16", choices=("fp16", "bf16"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("probe.py needs CUDA; nothing was measured", file=sys.stderr)
        return 2
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    report = dict(environment=environment(), dtype=args.dtype,
                  command="python bench/probe.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])))
    for name, fn in (("attention", lambda: attention_rows((8, 64, 256), (197, 101, 53, 25), dtype)),
                     ("sync", lambda: sync_check(dtype)), ("launches", lambda: launch_rows(dtype))):
        try:
            report[name] = fn()
        except Exception as e:  # one probe failing must not lose the others
            report[name] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            print(f"{name}: {report[name]}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe.json").write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
    (out / "probe.md").write_text(markdown(report), encoding="utf-8")
    return 0


def markdown(report) -> str:
    env = report["environment"]
    lines = ["# GPU probes: attention mask cost, host syncs, launches", "",
             f"- card: {env['device']}; date: {env['date']}; torch {env['torch']}, triton {env['triton']}; "
             f"{report['dtype']}",
             f"- command: `{report['command']}`", ""]
    att = report.get("attention")
    if isinstance(att, list):
        lines += ["Proportional attention per path, ms (overhead over SDPA without a bias); `auto`: the path "
                  "tofu_triton.attention.choose takes.", "",
                  "| B | N | SDPA, no bias | " + " | ".join(PATHS) + " | auto |",
                  "|---|---|---|" + "---|" * len(PATHS) + "---|"]
        for r in att:
            cells = []
            for path in PATHS:
                if path + "_ms" in r:
                    cells.append(f"{r[path + '_ms']:.4f} ({r[path + '_ms'] / r['none_ms'] - 1:+.0%})")
                else:
                    cells.append(r.get(path + "_error", "not run"))
            lines.append(f"| {r['batch']} | {r['n']} | {r['none_ms']:.4f} | " + " | ".join(cells) + f" | {r['auto']} |")
    else:
        lines.append(f"attention: {att}")
    lines += ["", f"sync check: {report.get('sync')}", ""]
    launches = report.get("launches")
    if isinstance(launches, list):
        lines += ["| ViT-B/16, B=1 | kernels per forward | per block | memcpy/memset | host enqueue ms |",
                  "|---|---|---|---|---|"]
        for r in launches:
            lines.append(f"| {r['variant']} | {r['launches']} | {r['launches_per_block']:.1f} | {r['memops']} | "
                         f"{r['host_ms_b1']:.2f} |")
    else:
        lines.append(f"launches: {launches}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
