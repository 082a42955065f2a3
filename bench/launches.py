"""Device work and host time of a patched ViT forward, measured on the CPU (no GPU needed).

    python bench/launches.py --out bench/results             # ~1 minute on 2 cores
    python bench/launches.py --out DIR --before OLD.json      # also the table against an earlier run

1. **Device ops per forward** of ViT-B/16 at B = 1 (random weights, fp32,
   no gradient): every aten op that launches device work (views, metadata
   and allocations left out, ``tofu_triton.testing.DeviceOps``) plus every
   Triton launch, each counted once. The Triton kernels do not run (they are
   stubbed out: counting needs no values), so the count is what a GPU would
   launch. Variants: unpatched; ToFu and ToMe modes on the Triton backend; ToFu
   on the reference backend; ToMe-style (mode ``tome`` on the reference: ToMe's
   algorithm in unfused PyTorch).
2. **Host time per patched block**: what the patch adds to timm's block is
   the step (with the sizes and the next attention's bias); its host time
   (Python, dispatch, launcher arguments) per call at ViT-B/16 shapes, with
   the Triton kernels stubbed out, one CPU thread, median over rounds with the
   spread. A whole forward on the CPU would not isolate it: the CPU's own
   arithmetic, which a GPU does asynchronously, dwarfs it. ``--before`` adds
   the numbers of an earlier checkout (run this script there).

Writes ``launches_cpu.json`` and ``launches_cpu.md`` under ``--out``.
"""
import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton backend on CPU tensors (launches are stubbed)

import torch  # noqa: E402

import tofu_triton.patch as tp  # noqa: E402
from tofu_triton.testing.device_ops import DeviceOps  # noqa: E402

VARIANTS = {  # name -> patch settings (None: unpatched)
    "unpatched": None,
    "tofu (triton)": dict(mode="tofu", backend="triton"),
    "tome (triton)": dict(mode="tome", backend="triton"),
    "tofu (reference)": dict(mode="tofu", backend="reference"),
    "tome-style (reference)": dict(mode="tome", backend="reference"),
}
R = 16


def build():
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_base_patch16_224").eval()


def apply(model, settings):
    tp.unpatch(model)
    if settings is not None:
        tp.timm(model, r=R, **settings)
    return model


def count_ops(model, images) -> dict:
    from unittest import mock

    from tofu_triton import ops as tofu_ops

    # Stubbed kernels leave the sizes unwritten: skip the size checks, whose value check runs on CPU tensors
    # only (never device work on a GPU).
    unchecked = mock.patch.object(tofu_ops, "_check_size", lambda size, x: None, create=True)
    with torch.no_grad(), unchecked, DeviceOps(stub=True) as ops:
        model(images)
    return dict(total=ops.total, aten=sum(ops.aten.values()), triton=sum(ops.triton.values()),
                by_op={**ops.aten, **{f"triton:{k}": v for k, v in ops.triton.items()}})


def step_inputs(dtype=torch.float32):
    """A ViT-B/16 block's tensors at B = 1 after the attention: x [1, 197, 768], its
    keys as a view of a qkv projection [1, 12, 197, 64], sizes [1, 197, 1]."""
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(1, 197, 3 * 768, generator=g).to(dtype)
    keys = qkv.reshape(1, 197, 3, 12, 64).permute(2, 0, 3, 1, 4)[1]
    return torch.randn(1, 197, 768, generator=g).to(dtype), keys, 1 + torch.rand(1, 197, 1, generator=g)


def step_paths() -> tuple:
    """The step's Triton paths in this checkout (one before they had names)."""
    from tofu_triton import kernels

    return getattr(kernels.step, "STEP_PATHS", (None,))


def step_call(path=None):
    """The work a patched block adds to timm's block: the step, with the sizes and the
    next attention's bias, on ``path`` (None: what the CPU picks). Versions before the
    one-launch step ran match, merge and the log-size mask as separate ops; this
    measures whichever this checkout has."""
    from tofu_triton import ops

    x, keys, size = step_inputs()
    if hasattr(ops, "token_fusion_step"):
        by_path = {} if path is None else dict(path=path)
        return lambda: ops.token_fusion_step(x, keys, R, size, "mlerp", 1, x.dtype, "triton", with_match=False,
                                             **by_path)

    def separate_ops():
        match = ops.bipartite_match(keys.mean(dim=1), R, 1, "triton")
        out, new_size = ops.merge_tokens(x, match, size, "mlerp", "triton")
        return out, new_size.log()[:, None, None, :, 0].to(x.dtype)

    return separate_ops


def host_time(fn, rounds: int, calls: int) -> dict:
    """Microseconds of host time per call of ``fn`` with the Triton kernels stubbed out
    (one thread; median and min-max over rounds of ``calls`` calls)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # microsecond ops: thread pool wake-ups would swamp them
    samples = []
    with torch.no_grad(), DeviceOps(stub=True, aten=False):
        for _ in range(calls):
            fn()  # warm-up: imports, caches
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            samples.append(1e6 * (time.perf_counter() - t0) / calls)
    torch.set_num_threads(threads)
    return dict(median_us=statistics.median(samples), min_us=min(samples), max_us=max(samples))


# Where host time goes: profiled functions by where they live (first match wins).
PLACES = (
    ("custom-op dispatch (torch.library, dispatcher, dynamo guards)",
     ("site-packages/torch/_library", "site-packages/torch/_ops.py", "site-packages/torch/_dynamo",
      "site-packages/torch/_compile.py", "<built-in method torch._ops")),
    ("Triton's launcher (kernel stubbed)", ("site-packages/triton/", "testing/device_ops.py")),
    ("tensor ops and allocations (torch)", ("<built-in method torch", "<method ", "site-packages/torch/")),
    ("kernel launchers (kernels/)", ("/kernels/",)),
    ("ops and patch Python (tofu_triton/)", ("/tofu_triton/",)),
)


def host_breakdown(fn, calls: int = 300) -> dict:
    """Share of the step's host time per place (cProfile's own time per function, grouped by PLACES)."""
    import cProfile
    import pstats

    with torch.no_grad(), DeviceOps(stub=True, aten=False):
        for _ in range(20):
            fn()
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(calls):
            fn()
        profile.disable()
    shares = {name: 0.0 for name, _ in PLACES}
    shares["other"] = 0.0
    for (path, _, func), (_, _, own, _, _) in pstats.Stats(profile).stats.items():
        where = path if path != "~" else func
        name = next((n for n, keys in PLACES if any(k in where for k in keys)), "other")
        shares[name] += own
    total = sum(shares.values()) or 1.0
    return {name: value / total for name, value in shares.items()}


def markdown(result: dict, before=None) -> str:
    env = result["env"]
    lines = ["# Device ops and host time of a patched ViT forward (CPU proxy)", "",
             f"- machine: {env['machine']}; date: {env['date']}; torch {env['torch']}, triton {env['triton']}",
             f"- command: `{env['command']}`", "",
             f"## Device ops per forward, ViT-B/16, B = 1, r = {R}", "",
             "aten ops that launch device work (views, metadata, allocations left out) + Triton launches, counted "
             "on the CPU with the kernels stubbed out.", "",
             "| variant | device ops | aten | Triton | extra per block |" + (" before |" if before else ""),
             "|---|---|---|---|---|" + ("---|" if before else "")]
    base = result["ops"]["unpatched"]["total"]
    for name, row in result["ops"].items():
        extra = (row["total"] - base) / 12
        cell = f" {before['ops'][name]['total']} |" if before and name in before["ops"] else (" |" if before else "")
        lines.append(f"| {name} | {row['total']} | {row['aten']} | {row['triton']} | {extra:+.2f} |" + cell)
    host = result["host_step"]
    lines += ["", "## Host time of the step a patched block adds (ViT-B/16 shapes, B = 1, mlerp, sizes and bias)", "",
              "Microseconds per call on one CPU thread with the Triton kernels stubbed out: Python, dispatch and "
              "launcher argument handling, which a GPU forward pays on the host per patched block "
              "(Triton's own launch cost is not included). Median over rounds (min-max).", "",
              "| version | host us per step |", "|---|---|",
              f"| this | {host['median_us']:.1f} ({host['min_us']:.1f}-{host['max_us']:.1f}) |"]
    if before:
        old = before["host_step"]
        lines.append(f"| before | {old['median_us']:.1f} ({old['min_us']:.1f}-{old['max_us']:.1f}) |")
    paths = result.get("host_step_paths", {})
    if len(paths) > 1:  # each path's host time: what dispatch trades against its device time
        lines += ["", "Per path (`token_fusion_step(path=...)`; which one runs on a card is measured there):", "",
                  "| path | host us per step |", "|---|---|"]
        lines += [f"| {name} | {t['median_us']:.1f} ({t['min_us']:.1f}-{t['max_us']:.1f}) |"
                  for name, t in paths.items()]
    lines += ["", "Where it goes (share of the profiled host time per step, cProfile):", "",
              "| place | this |" + (" before |" if before else ""), "|---|---|" + ("---|" if before else "")]
    for name, share in result["host_breakdown"].items():
        old = f" {before.get('host_breakdown', {}).get(name, 0):.0%} |" if before else ""
        lines.append(f"| {name} | {share:.0%} |" + old)
    if before:
        lines += ["", f"Before: {before['env']['command']} at {before['env'].get('commit', '?')} "
                      f"({before['env']['date']})."]
    return "\n".join(lines) + "\n"


def environment() -> dict:
    import platform

    import triton

    import tofu_triton

    from measure import git_commit

    # the checkout the measured package comes from (--before runs this script against another one)
    commit = git_commit(str(Path(tofu_triton.__file__).parent))
    return dict(machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), torch=torch.__version__,
                triton=triton.__version__, commit=commit,
                command="python " + " ".join(shlex.quote(a) for a in sys.argv))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="folder for launches_cpu.json/.md (default: print only)")
    parser.add_argument("--before", default=None, help="a launches_cpu.json of an earlier version, for the table")
    parser.add_argument("--rounds", type=int, default=21, help="timing rounds (default 21)")
    parser.add_argument("--calls", type=int, default=50, help="steps per round (default 50)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.calls < 1:
        parser.error("--rounds and --calls must be >= 1")
    result = dict(env=environment())
    model, images = build(), torch.randn(1, 3, 224, 224)
    result["ops"] = {name: count_ops(apply(model, settings), images) for name, settings in VARIANTS.items()}
    result["host_step"] = host_time(step_call(), args.rounds, args.calls)
    result["host_step_paths"] = {str(p): host_time(step_call(p), args.rounds, args.calls) for p in step_paths()
                                 if p is not None}
    result["host_breakdown"] = host_breakdown(step_call())
    before = json.loads(Path(args.before).read_text()) if args.before else None
    text = markdown(result, before)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "launches_cpu.json").write_text(json.dumps(result, indent=1))
        (out / "launches_cpu.md").write_text(text)


if __name__ == "__main__":
    main()
