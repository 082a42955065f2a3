"""Three quick GPU probes behind the end-to-end numbers (CUDA only, ~30 s).

    python bench/probe.py --out bench/results

1. ``attention``: what proportional attention costs. SDPA at ViT-B shapes
   (12 heads, head dim 64) with no mask, with the ``[B, 1, 1, N]`` float mask
   ``log(size)`` the patched blocks pass, and (where torch has it) compiled
   ``flex_attention`` with a ``score_mod`` that adds the key's ``log(size)``.
   A float mask can make SDPA leave the flash kernel; this measures by how
   much at the token counts a ToFu ViT-B actually runs (197 down to 25).
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


# flex_attention compiles once per shape (seconds each): time it at these only.
FLEX_CASES = {(64, 197), (64, 101), (256, 197)}


def sdpa_bias_channel(q, k, v, log_size):
    """SDPA with a per-key additive bias and no mask: one extra channel, 1 in the
    queries and ``log_size / scale`` in the keys, adds exactly ``log_size`` to
    every logit, so SDPA can stay on its flash kernel. Head dim padded to a
    multiple of 8 with zeros (what flash kernels need). Cost measured
    here: the three concatenations and the wider head."""
    d = q.shape[-1]
    scale = d ** -0.5
    pad = 8 - (d + 1) % 8 if (d + 1) % 8 else 0
    lead = q.shape[:-1]
    zeros = q.new_zeros(*lead, pad)
    q2 = torch.cat([q, q.new_ones(*lead, 1), zeros], dim=-1)
    bias = (log_size / scale)[:, None, :, None].to(k.dtype).expand(-1, k.shape[1], -1, -1)
    k2 = torch.cat([k, bias, zeros], dim=-1)
    v2 = torch.cat([v, v.new_zeros(*lead, pad + 1)], dim=-1)
    return F.scaled_dot_product_attention(q2, k2, v2, scale=scale)[..., :d]


def attention_rows(batches, tokens, dtype):
    flex_attention = None
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError as e:  # old torch: no flex attention
        print(f"flex_attention unavailable: {e!r}", file=sys.stderr)
    rows = []
    for batch in batches:
        for n in tokens:
            q, k, v = (torch.randn(batch, HEADS, n, HEAD_DIM, device="cuda", dtype=dtype) for _ in range(3))
            log_size = (1 + 3 * torch.rand(batch, n, device="cuda")).log()
            mask = log_size[:, None, None, :].to(dtype)
            row = dict(batch=batch, n=n)
            sdpa = F.scaled_dot_product_attention
            row["sdpa_ms"] = time_cuda(functools.partial(sdpa, q, k, v))["median_ms"]
            row["sdpa_mask_ms"] = time_cuda(functools.partial(sdpa, q, k, v, attn_mask=mask))["median_ms"]
            ref = sdpa(q, k, v, attn_mask=mask)
            row["channel_max_abs_err"] = (sdpa_bias_channel(q, k, v, log_size).float() - ref.float()).abs().max().item()
            row["channel_ms"] = time_cuda(functools.partial(sdpa_bias_channel, q, k, v, log_size))["median_ms"]
            if flex_attention is not None and (batch, n) in FLEX_CASES:
                def bias(score, b, h, q_idx, kv_idx, log_size=log_size):
                    return score + log_size[b, kv_idx]

                try:
                    torch._dynamo.reset()
                    flex = torch.compile(flex_attention, dynamic=False)
                    out = flex(q, k, v, score_mod=bias)
                    row["flex_max_abs_err"] = (out.float() - ref.float()).abs().max().item()
                    row["flex_ms"] = time_cuda(functools.partial(flex, q, k, v, score_mod=bias))["median_ms"]
                except Exception as e:
                    row["flex_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            row["mask_overhead"] = row["sdpa_mask_ms"] / row["sdpa_ms"] - 1
            rows.append(row)
            print(f"attention B={batch:<4d} N={n:<4d} sdpa {row['sdpa_ms']:.4f} ms  +mask {row['sdpa_mask_ms']:.4f} ms "
                  f"({100 * row['mask_overhead']:+.0f}%)  bias channel {row['channel_ms']:.4f} ms  "
                  f"flex {row.get('flex_ms', float('nan')):.4f} ms "
                  f"{row.get('flex_error', '')}", flush=True)
    return rows


def make_model(variant, dtype):
    import tofu_triton.patch as tp
    from tofu_triton.models import create_vit

    model = create_vit("vit_base_patch16_224").to("cuda", dtype)
    if variant == "tome":
        tp.timm(model, r=16, mode="tome", backend="reference")
    elif variant == "tofu":
        tp.timm(model, r=16, mode="tofu", backend="triton")
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
        lines += ["| B | N | SDPA ms | SDPA + log(size) mask ms | mask overhead | SDPA + bias channel ms "
                  "| flex_attention + score_mod ms |",
                  "|---|---|---|---|---|---|---|"]
        for r in att:
            flex = f"{r['flex_ms']:.4f}" if "flex_ms" in r else r.get("flex_error", "n/a")
            lines.append(f"| {r['batch']} | {r['n']} | {r['sdpa_ms']:.4f} | {r['sdpa_mask_ms']:.4f} | "
                         f"{100 * r['mask_overhead']:+.0f}% | {r.get('channel_ms', float('nan')):.4f} | {flex} |")
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
