"""GPU check of the export path: a patched ViT with the Triton kernels, through
torch.export and AOTInductor, loaded back and compared with eager (CUDA only).

    python bench/export_check.py [--out DIR] [--model NAME]   # ~1 minute; writes export_check.json

The attention takes the path ``tofu_triton.attention.choose`` picks (recorded:
eager and while tracing, where only differentiable paths may run). On CUDA,
``torch.export`` traces the ``triton_op`` twins of the Triton ops
(``tofu_triton.ops._export_ops``) so AOTInductor compiles the kernels into the
package. This is the only place that path runs; CI checks export on the CPU
with the reference backend (tests/test_export.py).
"""
import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from measure import environment


def check(model_name: str, batch: int, dtype: torch.dtype) -> dict:
    import tofu_triton.patch as tp
    from tofu_triton.models import create_vit
    from tofu_triton.testing import rel_error

    model = tp.timm(create_vit(model_name).to("cuda", dtype), r=8, mode="tofu", backend="triton")
    side = model.patch_embed.img_size[0]
    x = torch.randn(batch, 3, side, side, device="cuda", dtype=dtype)
    row = dict(model=model_name, batch=batch, dtype=str(dtype).replace("torch.", ""))
    row["attention"] = attention_choice(model, batch, x)
    with torch.no_grad():
        eager = model(x)
    t0 = time.perf_counter()
    program = torch.export.export(model, (x,))
    row["export_s"] = round(time.perf_counter() - t0, 1)
    row["exported_ops"] = sorted({str(n.target) for n in program.graph.nodes if n.op == "call_function"
                                  and ("tofu_triton" in str(n.target) or "triton_kernel" in str(n.target))})
    row["exported_vs_eager"] = rel_error(program.module()(x), eager)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = torch._inductor.aoti_compile_and_package(program, package_path=str(Path(tmp) / "vit.pt2"))
        row["aoti_s"] = round(time.perf_counter() - t0, 1)
        package = torch._inductor.aoti_load_package(path)
        with torch.no_grad():
            row["package_vs_eager"] = rel_error(package(x), eager)
    return row


def attention_choice(model, batch, x) -> dict:
    """The path ``attention="auto"`` takes in the first block: in eager inference, and
    while torch.export traces (grad on, a bias that needs a gradient): cuDNN's op
    cannot differentiate its bias, so there it must be a differentiable path."""
    from tofu_triton import attention

    attn = model.blocks[0].attn
    n = model.patch_embed.num_patches + model.num_prefix_tokens
    q = torch.zeros(batch, attn.num_heads, n, attn.head_dim, device=x.device, dtype=x.dtype)
    bias = torch.zeros(batch, 1, 1, n, device=x.device, dtype=x.dtype)
    with torch.no_grad():
        eager = attention.choose(q, bias=bias)
    return dict(eager=eager, traced=attention.choose(q, bias=bias.requires_grad_()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--model", default="smoke", help="a timm name or tofu_triton.models preset (default: a tiny ViT)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("export_check.py needs CUDA; nothing was checked", file=sys.stderr)
        return 2
    report = dict(environment=environment(),
                  command="python bench/export_check.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])))
    try:
        report["result"] = check(args.model, 8, torch.float16)
        ok = report["result"]["package_vs_eager"] <= 2e-2
        report["verdict"] = "PASS" if ok else "FAIL: package differs from eager"
    except Exception as e:  # the point of this check is to find out whether it works: record how it fails
        report["verdict"] = f"FAIL: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "export_check.json").write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
    print(f"export check ({args.model}, Triton kernels, torch.export + AOTInductor): {report['verdict']}")
    if "result" in report:
        print(json.dumps(report["result"], default=str))
    return 0 if report["verdict"] == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
