"""Where a patched ViT's host time goes at batch 1: the host cost of each call the step makes.

At B = 1 an eager patched ViT-B is bound by the host, not the GPU (H200, 2026-12-04: 7.2 ms per forward
against timm's 3.3 ms, bench/results/h200-2026-12-04-run3/throughput.md), and a CPU proxy with the kernels
stubbed out missed most of it (56 us per block against ~300 on the card): Triton's own launch path was
never measured. This script measures every piece on the card itself, each as the host time one call takes
to return (calls back to back, the GPU never the bottleneck at these sizes; the queue is drained after):

* ``torch_add``: one small torch op, the unit a timm op costs;
* ``triton_noop``: an empty Triton kernel through ``kernel[grid](...)``, Triton's launch path alone;
* each launcher of the step (``head_mean``, ``match_scores`` with the keys in, ``select``, ``merge_forward``),
  then ``token_fusion_step`` (the public op: checks, dispatch, launches) on every path;
* ``sized_attention`` on each path that runs here, and plain SDPA without a bias;
* whole forwards (ViT-B/16, fp16, random weights): timm unpatched and patched r = 16 (Triton step and the
  attention the tables choose), per forward and per block, and where the patched forward's host time goes
  (cProfile: the largest Python functions and builtins by their own time).

    python bench/host_profile.py --out bench/results/gpu [--small] [--write-table --throughput JSON]
    python bench/host_profile.py --tables-from bench/results/<run>/host_profile.json --throughput JSON

``--write-table --throughput JSON`` (GPU only) writes the host time of each step path and attention path
into the dispatch tables (``"host_us"`` of tofu_triton/tables/vit_step.json and attention.json) with the
largest batch at which the patched ViT ran host-bound in eager (``"host_bound_batch"``: eager over 1.1x the
CUDA graph in bench/throughput.py's json of the same card), so eager callers at those batches weigh it
(tofu_triton.dispatch.winner); ``--tables-from`` does the same from the committed results of an earlier run.

``--small`` (CPU, TRITON_INTERPRET=1): tiny shapes through the interpreter, to keep the script working; its
times mean nothing.
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import tofu_triton as tt
from tofu_triton import attention, kernels, reference

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure import command_line, refuse_without_gpu  # noqa: E402
from tournament_sd import provenance  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _noop_kernel(x_ptr, n, BLOCK: tl.constexpr):
    pass


def host_us(fn, calls: int) -> float:
    """Mean host time of one call of ``fn`` in us, ``calls`` back to back after a warm-up."""
    for _ in range(3):
        fn()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    took = time.perf_counter() - t0
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return round(took / calls * 1e6, 2)


def pieces(small: bool, calls: int) -> dict:
    """us per call of each piece of the step and the attention (ViT-B/16 shapes, B = 1, fp16)."""
    batch, n, heads, d = (1, 17, 2, 16) if small else (1, 197, 12, 64)
    dtype = torch.float32 if small else torch.float16
    c, r = heads * d, 4 if small else 16
    g = torch.Generator(device=DEVICE).manual_seed(0)
    qkv = torch.randn(batch, n, 3, heads, d, generator=g, device=DEVICE).to(dtype)
    q, keys, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    x = torch.randn(batch, n, c, generator=g, device=DEVICE).to(dtype)
    size = 1 + torch.rand(batch, n, 1, generator=g, device=DEVICE)
    na, nb = reference.split_sizes(n, 1)
    k = kernels
    node_max, node_idx = k.match.match_scores(keys, 1)
    unm_idx, _, _, dst_start, dst_src = k.select.select(node_max, node_idx, r, nb)
    bias = reference.log_size_bias(size, dtype)
    out = {
        "torch_add": lambda: x.add(1),
        "triton_noop": lambda: _noop_kernel[(1,)](x, n, BLOCK=16),
        "head_mean": lambda: k.match.head_mean(keys),
        "match_scores (keys in)": lambda: k.match.match_scores(keys, 1),
        "select": lambda: k.select.select(node_max, node_idx, r, nb),
        "merge_forward": lambda: k.merge.merge_forward(x, size, unm_idx, dst_start, dst_src, 1, "mlerp"),
    }
    for path in k.step.paths_for(n, c, d, 1, dtype, DEVICE):
        out[f"token_fusion_step [{path}]"] = (
            lambda path=path: tt.token_fusion_step(x, keys, r, size, "mlerp", 1, dtype, "triton", False, path))
    out["sdpa, no bias"] = lambda: F.scaled_dot_product_attention(q, keys, v)
    caps = attention.capabilities(q.device)
    for path in attention.runnable(caps, q, keys, v, bias):
        out[f"sized_attention [{path}]"] = lambda path=path: attention.sized_attention(q, keys, v, bias, path=path)
    with torch.no_grad():
        return {name: host_us(fn, calls) for name, fn in out.items()}


def forwards(small: bool, calls: int) -> dict:
    """Host us per forward of timm's ViT unpatched and patched (r = 16), and the difference per block."""
    from tofu_triton import patch as tp
    from tofu_triton.models import create_vit

    name = "vit_tiny_patch16_224" if small else "vit_base_patch16_224"
    dtype = torch.float32 if small else torch.float16
    model = create_vit(name).to(DEVICE, dtype).eval()
    images = torch.randn(1, 3, 224, 224, device=DEVICE, dtype=dtype)
    blocks = len(model.blocks)
    with torch.no_grad():
        plain = host_us(lambda: model(images), calls)
        tp.timm(model, r=16, backend="triton" if small else "auto")
        patched = host_us(lambda: model(images), calls)
        hot = python_profile(lambda: model(images), calls)
        tp.unpatch(model)
    return {"model": name, "unpatched_us": plain, "patched_us": patched,
            "extra_per_block_us": round((patched - plain) / blocks, 2), "patched_profile": hot}


def python_profile(fn, calls: int, rows: int = 25) -> list:
    """Where the host time of ``fn`` goes, by Python function and builtin (cProfile over ``calls`` calls, its
    own overhead included): the ``rows`` largest by their own time, in us per call of ``fn``."""
    import cProfile
    import pstats

    profile = cProfile.Profile()
    profile.enable()
    for _ in range(calls):
        fn()
    profile.disable()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    stats = pstats.Stats(profile).stats
    out = [{"function": f"{os.path.basename(file)}:{line}({name})", "calls": ncalls / calls,
            "self_us": round(tottime / calls * 1e6, 1), "total_us": round(cumtime / calls * 1e6, 1)}
           for (file, line, name), (_, ncalls, tottime, cumtime, _) in stats.items()]
    return sorted(out, key=lambda row: -row["self_us"])[:rows]


# The pieces whose host times dispatch weighs: "<label> [<candidate>]" -> the table of the candidate.
TABLED = {"token_fusion_step": "vit_step", "sized_attention": "attention"}


HOST_BOUND = 1.1  # eager slower than the CUDA graph by more than this: the host, not the GPU, sets the pace


def host_bound_batch(throughput: dict) -> int:
    """The largest batch at which the patched model ('tofu') ran host-bound in eager: its eager time over
    HOST_BOUND x its CUDA-graph time (bench/throughput.py's json); 0 if none."""
    ms = {(row["batch"], row["exec"]): row["ms_per_batch"] for row in throughput["rows"]
          if row["variant"] == "tofu" and row.get("ms_per_batch")}
    bound = [b for (b, ex), t in ms.items() if ex == "eager" and (b, "graph") in ms and t > HOST_BOUND * ms[b, "graph"]]
    return max(bound, default=0)


def write_tables(result: dict, throughput: dict, table_dir=None) -> list:
    """Each candidate's host us (from ``result["pieces_us"]``) and the host-bound batches (from a
    throughput run on the same card) into its op's table, for ``result``'s card."""
    from tofu_triton import dispatch

    per_op = {}
    for name, us in result["pieces_us"].items():
        label, _, rest = name.partition(" [")
        if label in TABLED and rest.endswith("]"):
            per_op.setdefault(TABLED[label], {})[rest[:-1]] = us
    bound = host_bound_batch(throughput)
    prov = dict(result["provenance"], batch=result["batch"], host_bound_from=throughput.get("command"))
    return [dispatch.update_host(op, prov["card"], us, bound, prov, table_dir) for op, us in per_op.items()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results/gpu")
    ap.add_argument("--small", action="store_true", help="tiny shapes in the interpreter (CPU smoke run)")
    ap.add_argument("--write-table", action="store_true", help="host times into the dispatch tables (GPU only)")
    ap.add_argument("--tables-from", metavar="JSON", help="write the tables from this host_profile.json, run nothing")
    ap.add_argument("--throughput", metavar="JSON", help="bench/throughput.py's json of the same card (the "
                    "host-bound batches), with --write-table or --tables-from")
    args = ap.parse_args(argv)
    if (args.write_table or args.tables_from) and not args.throughput:
        print("host_profile: --write-table and --tables-from need --throughput (which batches are host-bound)",
              file=sys.stderr)
        return 2
    throughput = None
    if args.throughput:
        with open(args.throughput) as f:
            throughput = json.load(f)
    if args.tables_from:
        with open(args.tables_from) as f:
            for path in write_tables(json.load(f), throughput):
                print(f"host_profile: wrote host times into {path}")
        return 0
    refused = refuse_without_gpu("host_profile", args.small, args.write_table)
    if refused:
        return refused
    calls = 3 if args.small else 200
    prov = provenance(command_line(argv))
    result = dict(provenance=prov, batch=1, pieces_us=pieces(args.small, calls),
                  forward=forwards(args.small, 2 if args.small else 50))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "host_profile.json"), "w") as f:
        json.dump(result, f, indent=1)
    fwd = result["forward"]
    lines = [f"# Host time per call at B = 1 on {prov['card']} ({prov['date']}, commit {prov['commit']}, "
             f"torch {prov['torch']}, triton {prov['triton']})", "", f"`{prov['command']}`", "",
             "Mean host time for one call to return, calls back to back (bench/host_profile.py).", "",
             "| call | host us |", "|---|---|"]
    lines += [f"| {name} | {us} |" for name, us in result["pieces_us"].items()]
    lines += ["", f"{fwd['model']} forward: unpatched {fwd['unpatched_us']} us, patched r=16 {fwd['patched_us']} us, "
              f"{fwd['extra_per_block_us']} us more per block.", "",
              "Where the patched forward's host time goes (cProfile, its own overhead included; us per forward):", "",
              "| function | calls per forward | own us | with callees us |", "|---|---|---|---|"]
    lines += [f"| `{row['function']}` | {row['calls']:g} | {row['self_us']} | {row['total_us']} |"
              for row in fwd["patched_profile"]]
    with open(os.path.join(args.out, "host_profile.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    if args.write_table:
        write_tables(result, throughput)
    return 0


if __name__ == "__main__":
    sys.exit(main())
