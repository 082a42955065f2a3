"""Request latency through the Ray Serve deployment: unpatched vs ToFu at a fixed request rate.

    python bench/serve_latency.py                                  # CPU: vit_tiny at 224 px, 12 req/s, ~1 minute
    python bench/serve_latency.py --model vit_base_patch16_224 --rate 400 --duration 20   # on a GPU

For each variant it starts the deployment of ``tofu_triton.serve`` on a local
Ray instance, then sends raw-tensor requests open loop: request ``i`` is
sent at ``start + i / rate`` whatever the answers before it did, so queueing
shows up in the latency instead of slowing the client down. Latency is from
the scheduled send time to the full answer. Reports p50, p90, p99 and the
rate actually served; writes ``serve_latency.{json,md}`` under ``--out``.
CPU figures are labelled as such: they say how the serving path behaves, not
what a GPU would do.
"""
import argparse
import json
import os
import shlex
import socket
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List

import torch

from measure import environment


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: List[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run_load(url: str, body: bytes, headers: Dict[str, str], rate: float, duration: float) -> Dict:
    """Open-loop load: (latencies in ms of answered requests, failures, seconds)."""
    n = max(1, int(rate * duration))
    start = time.perf_counter() + 0.5
    latencies, failures, lock = [], [], threading.Lock()

    def one(i: int) -> None:
        due = start + i / rate
        time.sleep(max(0.0, due - time.perf_counter()))
        try:
            req = urllib.request.Request(url, data=body, headers=headers, method="POST")
            with urllib.request.urlopen(req, timeout=60) as res:
                res.read()
            with lock:
                latencies.append((time.perf_counter() - due) * 1e3)
        except Exception as e:  # counted and reported, not fatal
            with lock:
                failures.append(repr(e))

    with ThreadPoolExecutor(max_workers=min(256, n)) as pool:
        list(pool.map(one, range(n)))
    elapsed = time.perf_counter() - start
    return dict(sent=n, answered=len(latencies), failures=len(failures), first_failure=failures[:1],
                served_per_s=len(latencies) / elapsed, p50_ms=percentile(latencies, 0.5) if latencies else None,
                p90_ms=percentile(latencies, 0.9) if latencies else None,
                p99_ms=percentile(latencies, 0.99) if latencies else None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_tiny_patch16_224")
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--rate", type=float, default=12.0, help="requests per second, open loop")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of load per variant")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance (and of the one replica)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)

    import ray
    from ray import serve

    from tofu_triton.models import create_vit
    from tofu_triton.serve import TENSOR_TYPE, build_app

    side = create_vit(args.model).patch_embed.img_size[0]
    x = torch.randn(3, side, side, generator=torch.Generator().manual_seed(0))
    body = x.numpy().tobytes()
    headers = {"Content-Type": TENSOR_TYPE, "X-Shape": f"3,{side},{side}", "X-Dtype": "float32"}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    rows = []
    for mode in ("none", "tofu"):
        port = _free_port()
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(build_app(args.model, tokens=args.tokens, mode=mode, replicas=1, max_batch=args.max_batch,
                                cpus_per_replica=args.cpus), route_prefix="/")
            url = f"http://127.0.0.1:{port}/"
            run_load(url, body, headers, rate=max(1.0, args.rate / 4), duration=2.0)  # warm-up, not recorded
            row = dict(variant="unpatched" if mode == "none" else f"tofu r={args.tokens}", **run_load(
                url, body, headers, args.rate, args.duration))
        finally:
            serve.shutdown()
            ray.shutdown()
        rows.append(row)
        print(f"{row['variant']:>12}: p50 {row['p50_ms'] or float('nan'):.1f} ms, "
              f"p99 {row['p99_ms'] or float('nan'):.1f} ms, "
              f"{row['served_per_s']:.1f} req/s served, {row['failures']} failures", flush=True)

    report = dict(environment=environment(), device=device, model=args.model, rate=args.rate,
                  duration_s=args.duration, max_batch=args.max_batch, rows=rows,
                  cpus=os.cpu_count(),
                  command=" ".join(["python bench/serve_latency.py",
                                    *(shlex.quote(a) for a in (argv or sys.argv[1:]))]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "serve_latency_cpu" if device == "CPU" else "serve_latency"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
    lines = [f"# Request latency through the Ray Serve deployment ({'CPU figures' if device == 'CPU' else device})",
             "", f"- {report['environment']['date']}; torch {report['environment']['torch']}; {device}"
             + (f" ({report['cpus']} cores, shared with the client)" if device == "CPU" else ""),
             f"- {args.model}, one replica, `@serve.batch` up to {args.max_batch}, raw float32 tensor requests, "
             f"open loop at {args.rate:g} req/s for {args.duration:g} s per variant",
             f"- command: `{report['command']}`", "",
             "| variant | sent | answered | failures | served req/s | p50 ms | p90 ms | p99 ms |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fmt = (lambda v: "" if v is None else f"{v:.1f}")  # noqa: E731
        lines.append(f"| {r['variant']} | {r['sent']} | {r['answered']} | {r['failures']} | {r['served_per_s']:.1f} "
                     f"| {fmt(r['p50_ms'])} | {fmt(r['p90_ms'])} | {fmt(r['p99_ms'])} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
