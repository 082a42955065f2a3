"""Ahead-of-time compile of every kernel for real GPUs (sm_80, sm_90), no GPU needed.

The interpreter accepts code the compiler rejects (type changes across
branches, non-constexpr globals, dot shapes), so each kernel is compiled to
PTX and cubin here with the block sizes its launcher picks for the shapes we
ship for, and ``ptxas -v`` reports registers and spills: a spilling kernel is
slow on the GPU, so spills fail the test.

Run ``python tests/test_aot_compile.py`` for the register/spill table.
"""
import functools
import json
import os
import re
import subprocess
import sys
import tempfile

import pytest
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tofu_triton.kernels import attention, common, match, merge, partition, select, step, unmerge

ARCHS = [80, 90]
PTR = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}

# Hidden sizes we ship for (ViT-Ti/S/B/L/H widths, SD latents' 320 shares 384's
# block size, 1024 shares 768's), up to common.MAX_ROW_C = 4096; and head dims.
WIDTHS = [192, 384, 768, 1280, 4096]
# Stable Diffusion's transformer widths (320, 640, 1280) by the block sizes they use.
SD_WIDTHS = [384, 768, 1280]
HEAD_DIMS = [32, 64, 128, 256]
# The step's head dims by the tiles they use: 64 (the metric in one tile), 128 (80 and 96 alike: a loop over D).
STEP_HEAD_DIMS = [64, 128]
# The plan's per-image A tokens (Na = Nb), keys in or a metric, and where only one (dtype, head dim) is
# compiled: ViT-B/16 at 224 px (Na = 98: keys in, A tiles of 64 through scratch; a metric, one 128-row tile in
# registers) in every dtype and head dim; once each: the keys' one-tile case (Na = 50, later blocks), the
# metric's several tiles (Na = 288, ViT-B at 384 px), and the largest the plan takes (kernels.step.PLAN_MAX_NA:
# its 1024-wide sort network takes ~30 s to compile).
PLAN_TOKENS = [(98, True, None), (98, False, None), (50, True, ("fp16", 64)), (288, False, ("fp16", 64)),
               (1024, True, ("fp16", 64))]


def _signature(fn, pointers, constexprs):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = pointers[name]
        elif name in ("inv_h", "qk_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _step_configs():
    out = []
    settings = step.StepSettings()
    for dt in PTR:
        for d in STEP_HEAD_DIMS:
            for mode in ("mean", "mlerp", "prune"):
                for has_size, bias in ((True, True), (False, False)):
                    if not has_size and (mode != "prune" or dt != "fp16"):
                        continue  # only the first step of a model runs without sizes: one config for it
                    ba, bb, bd = match.match_blocks(d, dot_fp32=dt == "fp32")
                    const = dict(MODE=common.MODE_IDS[mode], HAS_SIZE=has_size, BIAS=bias,
                                 BLOCK_N=settings.block_n, BLOCK_H=d, BLOCK_A=ba, BLOCK_B=bb, BLOCK_D=bd,
                                 DOT_FP32=dt == "fp32", SINGLE_D=d <= bd, BLOCK_SEL=select.SELECT_BLOCK,
                                 BLOCK_R=settings.block_rows, BLOCK_M=settings.block_merged,
                                 BLOCK_C=settings.block_c)
                    ptrs = dict(x_ptr=PTR[dt], keys_ptr=PTR[dt], size_ptr="*fp32", out_ptr=PTR[dt],
                                size_out_ptr="*fp32", bias_ptr=PTR[dt], index_ptr="*i64", metric_ptr=PTR[dt],
                                node_max_ptr="*fp32", node_idx_ptr="*i64")
                    tag = f"step {mode} {dt} D={d}" + ("" if has_size else " size=None no-bias")
                    out.append((tag, step._step_kernel, ptrs, const, settings.num_warps))
    for dt in PTR:  # the plan: match (keys in, or the head mean's metric) + sort select; no mode, size or bias
        for d in STEP_HEAD_DIMS:
            for na, heads, only in PLAN_TOKENS:
                if only is not None and only != (dt, d):
                    continue
                const = step.plan_constants(d, dt == "fp32", na, na, heads)
                # One A tile: the launcher passes the index buffer for the unused scratch pointers.
                scratch = "*i64" if const["SINGLE_A"] else "*fp32"
                ptrs = dict(keys_ptr=PTR[dt], node_max_ptr=scratch, node_idx_ptr="*i64", index_ptr="*i64")
                out.append((f"plan {'keys' if heads else 'metric'} {dt} D={d} Na={na}"
                            + (" one A tile" if const["SINGLE_A"] else ""), step._plan_kernel, ptrs, const,
                            step.PLAN_WARPS[dt == "fp32"]))
    return out


def _attention_configs():
    """The attention kernel at every block-size candidate of head dims 64 and 128 in fp16;
    head dim 80 (in the 128 tile) and bf16 at the default only (the same tiles); num_stages
    as launched. fp32 runs on the mask path on a GPU (tofu_triton.attention.runnable)."""
    out = []
    for dt in ("fp16", "bf16"):
        for d in (64, 80, 128):
            names = attention.configs_for(d)
            for name in names if d != 80 and dt == "fp16" else names[:1]:
                cfg = attention.CONFIGS[name]
                ptrs = dict(q_ptr=PTR[dt], k_ptr=PTR[dt], v_ptr=PTR[dt], bias_ptr=PTR[dt], out_ptr=PTR[dt])
                const = dict(D=d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=attention.head_dim_block(d),
                             DOT_FP32=False)
                out.append((f"attention {name} {dt} D={d}", attention._attention_kernel, ptrs, const,
                            dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)))
    return out


# Configs of candidates that run only where a tournament measured them fastest (kernels.merge.MERGE_VARIANTS
# but "rows"): a spill costs them time, which the tournament sees, so they must compile but may spill.
SPILLS_MEASURED = set()


def _configs():
    """(name, kernel, pointer types, constexprs, num_warps or launch options): what the launchers launch."""
    out = _step_configs() + _attention_configs()
    positions = {"a_pos_ptr": "*i64", "b_pos_ptr": "*i64"}  # the spatial partition's arrays (POS=True)
    for dt in PTR:
        for d in HEAD_DIMS:
            # A given metric (ViT, spatial), and a ViT step's keys (HEADS: heads averaged as loaded) at its head dims.
            for pos, heads in ((False, False), (True, False), (False, True)):
                if heads and d not in STEP_HEAD_DIMS:
                    continue
                ba, bb, bd = match.match_blocks(d, dot_fp32=dt == "fp32")
                const = dict(BLOCK_A=ba, BLOCK_B=bb, BLOCK_D=bd, DOT_FP32=dt == "fp32", SINGLE_D=d <= bd, POS=pos,
                             HEADS=heads)
                ptrs = dict(positions, metric_ptr=PTR[dt], node_max_ptr="*fp32", node_idx_ptr="*i64")
                out.append((f"match {dt} D={d}" + (" spatial" if pos else " keys" if heads else ""),
                            match._match_kernel, ptrs, const, match.MATCH_WARPS_KEYS if heads else match.MATCH_WARPS))
    idx = {n: "*i64" for n in ["node_idx_ptr", "unm_idx_ptr", "src_idx_ptr", "dst_idx_ptr", "dst_start_ptr",
                               "dst_src_ptr"]}
    out.append(("select", select._select_kernel, dict(idx, node_max_ptr="*fp32"),
                dict(BLOCK=select.SELECT_BLOCK), select.SELECT_WARPS))
    for rand in (False, True):
        ptrs = {"step_ptr": "*i64", "a_pos_ptr": "*i64", "b_pos_ptr": "*i64", "slot_ptr": "*i64"}
        out.append((f"spatial_partition RAND={rand}", partition._partition_kernel, ptrs,
                    dict(RAND=rand, BLOCK=partition.PARTITION_BLOCK), partition.PARTITION_WARPS))
    spatial = select.SpatialSelectSettings()
    for bits in (8, 16, 24):
        ptrs = dict(idx, node_max_ptr="*fp32", a_row_ptr="*i64")
        const = dict(IDX_BITS=bits, BLOCK=spatial.block, BLOCK_ROUTE=spatial.route_block, DST_BLOCK=spatial.dst_block)
        out.append((f"spatial_select IDX_BITS={bits}", select._spatial_select_kernel, ptrs, const,
                    spatial.num_warps))
    fused = select.FusedSelectSettings()
    for nb_block in (1024, 16384):  # N = 4096 and 65536 with 2x2 cells
        ptrs = dict(idx, node_max_ptr="*fp32", a_row_ptr="*i64", cursor_ptr="*i32")
        const = dict(IDX_BITS=16, BLOCK=fused.block, BLOCK_T=fused.block_t, NB_BLOCK=nb_block)
        out.append((f"spatial_select_fused NB_BLOCK={nb_block}", select._spatial_select_fused_kernel, ptrs, const,
                    fused.num_warps))
    sd_scores = match.SpatialScoresSettings()
    for dt in PTR:  # the SD "dot" scores candidate: C >= 64 uses one channel tile size, so one config per dtype
        ba, bb, bd = match.MATCH_BLOCKS[True] if dt == "fp32" else sd_scores[:3]
        warps = match.MATCH_WARPS if dt == "fp32" else sd_scores.num_warps
        ptrs = dict(positions, metric_ptr=PTR[dt], inv_ptr="*fp32", node_max_ptr="*fp32", node_idx_ptr="*i64")
        out.append((f"spatial_scores {dt}", match._spatial_scores_kernel, ptrs,
                    dict(BLOCK_A=ba, BLOCK_B=bb, BLOCK_D=bd, DOT_FP32=dt == "fp32"),
                    dict(num_warps=warps, num_stages=sd_scores.num_stages)))
        out.append((f"spatial_inv_norm {dt}", match._inv_norm_kernel, dict(metric_ptr=PTR[dt], inv_ptr="*fp32"),
                    dict(BLOCK_N=match.NORM_BLOCK, BLOCK_D=64), 4))
        # The four-launch step's head mean, every head's load unrolled: ViT-B's 12 x 64 in every dtype, ViT-H's
        # 16 x 128 (the most registers) once.
        for heads, d in ((12, 64),) + (((16, 128),) if dt == "fp16" else ()):
            out.append((f"head_mean {dt} H={heads} D={d}", match._head_mean_kernel,
                        dict(keys_ptr=PTR[dt], out_ptr=PTR[dt]),
                        dict(H=heads, BLOCK_N=match.head_mean_rows(d), BLOCK_D=d), match.HEAD_MEAN_WARPS))
    for dt in PTR:
        for mode, mode_id in common.MODE_IDS.items():
            for c in WIDTHS:
                for has_size, pos in ((True, False), (False, False), (False, True)):
                    if (pos and c not in SD_WIDTHS) or (mode == "sum" and not pos):
                        continue
                    bc = common.row_block(c)
                    const = dict(MODE=mode_id, HAS_SIZE=has_size, BLOCK_C=bc, POS=pos)
                    shared = dict(positions, size_ptr="*fp32", unm_idx_ptr="*i64", dst_start_ptr="*i64",
                                  dst_src_ptr="*i64")
                    fwd = dict(shared, x_ptr=PTR[dt], out_ptr=PTR[dt], size_out_ptr="*fp32", bias_ptr=PTR[dt])
                    bwd = dict(shared, x_ptr=PTR[dt], grad_out_ptr=PTR[dt], grad_x_ptr=PTR[dt])
                    warps = merge.merge_num_warps(bc)
                    tag = f"{mode} {dt} C={c}" + ("" if has_size else " size=None") + (" spatial" if pos else "")
                    # The ViT step's merge writes the next attention's bias where sizes are tracked.
                    fwd_const = dict(const, WRITE_SIZE=not pos, BIAS=has_size and not pos)
                    out.append((f"merge {tag}" + (" +bias" if fwd_const["BIAS"] else ""), merge._merge_kernel, fwd,
                                fwd_const, warps))
                    out.append((f"merge_backward {tag}", merge._merge_backward_kernel, bwd, const, warps))
        # The ViT step's other merge variants (sizes and bias as in every step but a model's first): mlerp, the
        # most registers, at every width; mean, prune and the first step's (no sizes) at ViT-B's, in fp16.
        # Tournament candidates (SPILLS_MEASURED): a few words spill at some widths, which their times show.
        for variant in merge.MERGE_VARIANTS:
            if variant == "rows":
                continue  # compiled above
            for mode, c, has_size in [("mlerp", c, True) for c in WIDTHS] + [
                    ("mean", 768, True), ("prune", 768, True), ("mlerp", 768, False)]:
                if dt != "fp16" and (c == 768 and (mode != "mlerp" or not has_size) or variant == "rows_lean"):
                    continue
                bc = common.row_block(c)
                rows, warps, chunk = merge.merge_launch(variant, bc)
                ptrs = dict(size_ptr="*fp32", unm_idx_ptr="*i64", dst_start_ptr="*i64", dst_src_ptr="*i64",
                            x_ptr=PTR[dt], out_ptr=PTR[dt], size_out_ptr="*fp32", bias_ptr=PTR[dt])
                const = dict(MODE=common.MODE_IDS[mode], HAS_SIZE=has_size, BIAS=has_size, BLOCK_C=bc)
                tag = f"merge {variant} {mode} {dt} C={c}" + ("" if has_size else " size=None")
                SPILLS_MEASURED.add(tag)
                if merge.MERGE_VARIANTS[variant].tiles:
                    out.append((tag, merge._merge_tiles_kernel, ptrs,
                                dict(const, BLOCK_R=rows, BLOCK_K=chunk), warps))
                else:
                    out.append((tag, merge._merge_kernel, dict(ptrs, **positions),
                                dict(const, WRITE_SIZE=True, POS=False), warps))
        for c in SD_WIDTHS:
            for has_res in (False, True):
                bc = common.row_block(c)
                ptrs = {"y_ptr": PTR[dt], "res_ptr": PTR[dt], "out_ptr": PTR[dt], "slot_ptr": "*i64",
                        "a_row_ptr": "*i64"}
                out.append((f"unmerge {dt} C={c}" + (" +residual" if has_res else ""), unmerge._unmerge_kernel, ptrs,
                            dict(HAS_RES=has_res, BLOCK_C=bc), unmerge.unmerge_num_warps(bc)))
    return out


CONFIGS = _configs()


@functools.lru_cache(maxsize=None)
def _compile(index, arch):
    name, fn, ptrs, const, warps = CONFIGS[index]
    src = ASTSource(fn, _signature(fn, ptrs, const), const)
    options = warps if isinstance(warps, dict) else {"num_warps": warps}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def _ptxas_report(ptx: str, arch: int) -> dict:
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    gpu = "sm_90a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        res = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", path, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True)
    text = res.stderr + res.stdout
    regs = int(re.search(r"Used (\d+) registers", text).group(1))
    spill_st = int(re.search(r"(\d+) bytes spill stores", text).group(1))
    spill_ld = int(re.search(r"(\d+) bytes spill loads", text).group(1))
    return {"registers": regs, "spill_stores": spill_st, "spill_loads": spill_ld}


def compile_all():
    """Compile every config for every arch; one result dict per (config, arch)."""
    results = []
    for index, (name, *_rest) in enumerate(CONFIGS):
        for arch in ARCHS:
            row = {"config": name, "arch": arch}
            try:
                kernel = _compile(index, arch)
                row.update(_ptxas_report(kernel.asm["ptx"], arch), shared=kernel.metadata.shared,
                           cubin_bytes=len(kernel.asm["cubin"]))
            except Exception as exc:  # reported per config by the tests below
                row["error"] = f"{type(exc).__name__}: {exc}"
            results.append(row)
    return results


@pytest.fixture(scope="module")
def compiled():
    # tests/conftest.py runs the kernels in the interpreter, and triton.jit (for
    # triton's own library functions too) reads that switch at import time: a
    # process that has it on cannot compile for a GPU. Compile in a fresh one.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__, "--json"], capture_output=True, text=True, env=env,
                          timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {(row["config"], row["arch"]): row for row in json.loads(proc.stdout)}


# The most shared memory one CTA may use on every card we support: 99 KiB is
# the opt-in limit of sm_86/sm_89 (RTX 30/40, A10, L4, L40); A100 allows 163
# KiB and H100 227 KiB. Triton raises the opt-in itself; beyond the limit the
# launch fails on those cards.
MAX_SHARED = 99 * 1024
# ptxas 12.8 (bundled with Triton 3.6) spills one or two 4-byte words in a few
# configs (fp32 match and mlerp merge at C = 384 on sm_80, mlerp merge at
# C = 4096 without sizes on sm_90) where Triton 3.8's spills nothing: a word or
# two is noise; a real spill (an array in local memory) is hundreds of bytes.
MAX_SPILL_BYTES = 8


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", [c[0] for c in CONFIGS])
def test_kernel_compiles_without_spills(compiled, name, arch):
    row = compiled[(name, arch)]
    assert "error" not in row, row.get("error")
    assert row["cubin_bytes"] > 0, "no cubin produced"
    assert row["shared"] <= MAX_SHARED, f"{row['shared']} bytes of shared memory: over the {MAX_SHARED} one CTA gets"
    limit = MAX_SPILL_BYTES if name not in SPILLS_MEASURED else float("inf")
    assert row["spill_stores"] <= limit and row["spill_loads"] <= limit, f"{name} sm_{arch} spills: {row}"


if __name__ == "__main__":
    rows = compile_all()
    if "--json" in sys.argv:
        print(json.dumps(rows))
    else:
        print("| kernel config | arch | registers | spill stores | spill loads | shared bytes | error |\n"
              "|---|---|---|---|---|---|---|")
        for row in rows:
            print(f"| {row['config']} | sm_{row['arch']} | {row.get('registers')} | {row.get('spill_stores')} | "
                  f"{row.get('spill_loads')} | {row.get('shared')} | {row.get('error', '')} |")
