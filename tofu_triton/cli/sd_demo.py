"""``tofu-triton demo-sd``: one Stable Diffusion denoising step, unpatched, with tomesd and with ours.

Builds a diffusers ``UNet2DConditionModel`` from a preset of
:data:`tofu_triton.models.UNET_PRESETS`, or a PixArt / SD3 / Flux transformer
from :data:`tofu_triton.models.DIT_PRESETS`, with random weights (nothing is
downloaded), runs the denoiser forward of one step on a random latent with random
text embeddings, and prints per variant the median step time, the speed-up
over the unpatched UNet and how close its noise prediction is to the
unpatched one (relative L2 error, cosine). Saves a picture of which latent
tokens the first transformer block merges. With random weights the agreement
numbers only show that the machinery runs, not what images would look like.

Every variant uses ``use_rand=False`` (each 2x2 cell's destination is its
top-left token), so tomesd and our ``tome`` mode compute the same step and
the picture shows exactly the tokens every variant merges in that block.
"""
import argparse
import importlib.util
import math
import os
import statistics
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

import tofu_triton

from .. import patch as tp
from ..models import (
    attention_downsample, create_denoiser, denoiser_inputs, denoiser_step, is_dit, latent_multiple, unet_config,
)
from ..reference import spatial_match, spatial_partition
from ..visualize import save_latent_merge_picture
from .common import check_out_folder, resolve_device, time_windows

PRESET_CHOICES = ("tiny", "tiny-xl", "sd15", "sdxl", "tiny-pixart", "tiny-sd3", "tiny-flux", "pixart-sigma",
                  "sd3-medium", "flux-dev")
DIT_SIZE = 128  # the transformers' latent side on a GPU: 1024 px images
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
CPU_SIZE = 32  # latent side on the CPU by default: 256 px images, a fraction of a second per step for "tiny"
DEFAULT_OUT = "tofu_sd_demo"
# Each full-size preset and its layout at 32-64 channels, the one to suggest when the full one cannot fit.
SMALLER = {"sd15": "tiny", "sdxl": "tiny-xl", "pixart-sigma": "tiny-pixart", "sd3-medium": "tiny-sd3",
           "flux-dev": "tiny-flux"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", choices=PRESET_CHOICES, default=None,
                   help="denoiser preset, random weights (default: sd15 on GPU, tiny on CPU; tiny/tiny-xl are the "
                        "SD 1.5 / SDXL layouts at 32-64 channels, tiny-pixart/-sd3/-flux the transformers' at 64)")
    p.add_argument("--size", type=int, default=None,
                   help=f"latent side in tokens, image side / 8 (default: the preset's own on GPU, {CPU_SIZE} on CPU)")
    p.add_argument("--batch", type=int, default=2, help="latents per step (default 2: classifier-free guidance)")
    p.add_argument("--ratio", type=float, default=0.5,
                   help="fraction of tokens merged in each merging block (default 0.5)")
    p.add_argument("--max-downsample", type=int, default=None, choices=(1, 2, 4, 8),
                   help="merge in blocks at most this far below the latent's resolution (default: the highest "
                        "resolution with attention: 1 for SD 1.5, 2 for SDXL)")
    p.add_argument("--iters", type=int, default=None, help="timed steps per variant (default: 10 on GPU, 3 on CPU)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=("auto",) + tuple(DTYPES), default="auto",
                   help="auto: fp16 on GPU, fp32 on CPU (fp16 is for CUDA only)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    p.add_argument("--out", default=DEFAULT_OUT,
                   help=f"folder for the merge picture (created; default ./{DEFAULT_OUT})")


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """parser.error (one line, exit 2) for values out of range; needs no diffusers."""
    if not 0 <= args.ratio < 1:
        parser.error(f"--ratio must be in [0, 1), got {args.ratio}")
    if args.batch < 1:
        parser.error("--batch must be >= 1")
    if args.iters is not None and args.iters < 1:
        parser.error("--iters must be >= 1")
    check_out_folder(parser, "--out", args.out, "the merge picture")
    if args.max_downsample is not None and args.model and is_dit(args.model):
        parser.error(f"--max-downsample applies to UNets; every block of {args.model} runs on its patch grid")
    if args.size is not None:
        multiple = latent_multiple(args.model or "tiny")
        if args.size < multiple or args.size % multiple:
            unet = f"the {args.model} UNet" if args.model else "the UNet"
            why = (f"{args.model} cuts it into 2x2 patches" if args.model and is_dit(args.model)
                   else f"{unet} halves the latent {multiple.bit_length() - 1} times")
            parser.error(f"--size must be a positive multiple of {multiple} ({why}), got {args.size}")


def package_version(name: str) -> str:
    """The installed version of distribution ``name``, or "?" (tomesd has no ``__version__``)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "?"


def agreement(out: torch.Tensor, base: torch.Tensor) -> Dict[str, float]:
    """Relative L2 error of the whole batch and mean per-latent cosine, computed in float32."""
    out, base = out.float(), base.float()
    return dict(rel_l2=float((out - base).norm() / base.norm().clamp_min(1e-12)),
                cosine=float(F.cosine_similarity(out.flatten(1), base.flatten(1), dim=1).mean()))


class Setup(NamedTuple):
    """The run's settings, once the defaults that depend on the device are filled in."""

    device: str
    dtype_name: str  # a key of DTYPES
    name: str  # the denoiser preset
    dit: bool  # a transformer: no tomesd (UNets only), no max_downsample (one patch grid)
    size: int  # latent side in tokens
    iters: int  # timed steps per variant
    max_downsample: Optional[int]  # None for a transformer


def resolve(args: argparse.Namespace) -> Setup:
    """The settings of ``args`` on this machine; SystemExit with one line for fp16 on the CPU."""
    device = resolve_device(args.device)
    dtype_name = args.dtype if args.dtype != "auto" else ("fp16" if device == "cuda" else "fp32")
    if dtype_name == "fp16" and device != "cuda":
        raise SystemExit("--dtype fp16 is for CUDA only (CPU half-precision convolutions are slow); "
                         "use --dtype fp32 on the CPU")
    name = args.model or ("sd15" if device == "cuda" else "tiny")
    dit = is_dit(name)
    native = DIT_SIZE if dit else unet_config(name)["sample_size"]
    return Setup(device=device, dtype_name=dtype_name, name=name, dit=dit,
                 size=args.size or (native if device == "cuda" else CPU_SIZE),
                 iters=args.iters or (10 if device == "cuda" else 3),
                 max_downsample=None if dit else args.max_downsample or attention_downsample(name))


def available_memory(device: str) -> Optional[int]:
    """Bytes free for a new model on ``device``: the GPU's free memory on CUDA; on the CPU Linux's
    MemAvailable, else the physical memory; None when neither can be read."""
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):  # no sysconf (Windows) or no such name
        return None


def check_fits(setup: Setup) -> None:
    """SystemExit with one line when a full-size preset's weights cannot fit in the memory of ``setup.device``.

    The parameters are counted on the meta device (nothing is allocated).
    The weights are built in float32 and then cast to the dtype (see
    :func:`tofu_triton.models.create_denoiser`), so they need 4 bytes per
    parameter at the peak, whatever the dtype; the step's activations come on
    top, so a preset that passes may still run out.
    """
    if setup.name not in SMALLER:
        return
    free = available_memory(setup.device)
    if free is None:
        return
    params = sum(p.numel() for p in create_denoiser(setup.name, device="meta").parameters())
    need = params * max(4, DTYPES[setup.dtype_name].itemsize)
    if need > free:
        where = "free on the GPU" if setup.device == "cuda" else "available on this machine"
        raise SystemExit(f"--model {setup.name}: its {params / 1e9:.1f} G parameters need about {need / 2**30:.0f} GiB "
                         f"(built in float32) and {free / 2**30:.1f} GiB are {where}; use --model "
                         f"{SMALLER[setup.name]} (the same layout at 32-64 channels)")


def _first_block(unet: torch.nn.Module) -> torch.nn.Module:
    """The first transformer block a forward reaches (modules() lists down blocks first, as they run)."""
    from diffusers.models.attention import BasicTransformerBlock, JointTransformerBlock
    from diffusers.models.transformers.transformer_flux import FluxTransformerBlock

    blocks = (BasicTransformerBlock, JointTransformerBlock, FluxTransformerBlock)
    return next(m for m in unet.modules() if isinstance(m, blocks))


def unpatched_step(unet: torch.nn.Module, inputs: Dict) -> Tuple[torch.Tensor, torch.Tensor]:
    """The unpatched denoiser's noise prediction, and what its first transformer block saw [batch, N, C]
    (for the merge picture)."""
    captured = {}

    def capture(module, a, kw):
        captured.setdefault("x", (a[0] if a else kw["hidden_states"]).detach())

    hook = _first_block(unet).register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            base = denoiser_step(unet, inputs)
    finally:
        hook.remove()
    return base, captured["x"]


def _unpatch(unet: torch.nn.Module, tomesd) -> None:
    tp.unpatch(unet)
    if tomesd is not None:
        tomesd.remove_patch(unet)


VARIANTS = (("unpatched", None), ("tomesd", "tomesd"), ("ToMe (tome)", "tome"), ("ToFu (tofu)", "tofu"))


def compare_variants(unet: torch.nn.Module, inputs: Dict, base: torch.Tensor, setup: Setup, ratio: float, seed: int,
                     tomesd) -> Tuple[List[Dict], List[str]]:
    """Run and time every variant of :data:`VARIANTS` on ``unet`` (left unpatched).

    Returns one row per variant (label, note and, for a variant that ran,
    ms, rel_l2, cosine against ``base``) and the notes to print under the
    table. ``tomesd`` is the module, or None when it is not installed.
    """
    cuda = setup.device == "cuda"
    settings = dict(ratio=ratio, max_downsample=setup.max_downsample, use_rand=False)

    def step():
        with torch.no_grad():
            return denoiser_step(unet, inputs)

    rows: List[Dict] = []
    notes: List[str] = []
    for label, variant in VARIANTS:
        _unpatch(unet, tomesd)
        row = dict(label=label)
        if variant == "tomesd":
            if setup.dit:
                rows.append(dict(row, note="not applicable: tomesd patches UNets only"))
                continue
            if tomesd is None:
                rows.append(dict(row, note="not installed (pip install tomesd==0.1.3)"))
                continue
            tomesd.apply_patch(unet, **settings)
        elif variant is not None:
            tp.diffusers(unet, mode=variant, seed=seed, **settings)
        # The first call of a variant is its output and its first warm-up; CUDA gets two more (Triton
        # compiles on first use, cuDNN and the allocator settle), the CPU none (keeps the tests quick).
        try:
            out = base if variant is None else step()
        except Exception as e:  # tomesd is third-party code written for older diffusers: report, go on
            if variant != "tomesd":
                raise
            first = str(e).splitlines()[0][:120] if str(e) else ""
            rows.append(dict(row, note=f"failed with diffusers {package_version('diffusers')}: "
                                       f"{type(e).__name__}: {first}"))
            continue
        seconds = time_windows(step, setup.iters, warmup=2 if cuda else 0, cuda=cuda)
        row.update(agreement(out, base), ms=1e3 * statistics.median(seconds))
        if variant is None:
            row["note"] = "the reference"
        elif variant == "tomesd":
            row["note"] = f"tomesd {package_version('tomesd')}"
        else:
            plan = tp.plan(unet)
            merging = sum(p.mode is not None for p in plan)
            row["note"] = f"merges in {merging} of {len(plan)} transformer blocks"
            if merging == 0 and variant == "tome":
                notes.append(f"max_downsample {setup.max_downsample} reaches no transformer block of this UNet: "
                             "nothing was merged")
        rows.append(row)
    _unpatch(unet, tomesd)
    return rows, notes


def print_table(rows: List[Dict]) -> None:
    base_ms = rows[0]["ms"]
    print(f"{'variant':<12} {'ms/step':>9} {'speed-up':>8} {'rel. L2 err':>11} {'cosine':>8}  note")
    for row in rows:
        if "ms" not in row:
            print(f"{row['label']:<12} {'-':>9} {'-':>8} {'-':>11} {'-':>8}  {row['note']}")
            continue
        print(f"{row['label']:<12} {row['ms']:>9.2f} {base_ms / row['ms']:>7.2f}x {row['rel_l2']:>11.4f} "
              f"{row['cosine']:>8.4f}  {row.get('note', '')}")


def run(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("diffusers") is None:
        raise SystemExit('demo-sd needs diffusers, which is not installed: pip install "tofu-triton[diffusers]"')
    setup = resolve(args)
    try:
        import tomesd
    except ImportError:
        tomesd = None
    check_fits(setup)
    dtype = DTYPES[setup.dtype_name]
    unet = create_denoiser(setup.name, seed=args.seed, device=setup.device, dtype=dtype)
    inputs = denoiser_inputs(unet, args.batch, setup.size, seed=args.seed + 1, device=setup.device, dtype=dtype)
    params = sum(p.numel() for p in unet.parameters()) / 1e6
    where = "on the 2x2 patch grid" if setup.dit else f"max_downsample {setup.max_downsample}"
    print(f"tofu-triton {tofu_triton.__version__} demo-sd: {setup.name} {'transformer' if setup.dit else 'UNet'} "
          f"({params:.1f}M parameters, RANDOM weights), {setup.device} {setup.dtype_name}, batch {args.batch}, "
          f"{setup.size}x{setup.size} latent ({8 * setup.size} px images), ratio {args.ratio}, {where}")

    base, hidden = unpatched_step(unet, inputs)
    rows, notes = compare_variants(unet, inputs, base, setup, args.ratio, args.seed, tomesd)
    print()
    print_table(rows)
    print()

    # A transformer's blocks all run on the 2x2 patch grid (1/2 of the latent's side) and all merge.
    picture = save_picture(args.out, hidden, setup.size, args.ratio, 2 if setup.dit else setup.max_downsample,
                           setup.name, notes)
    for note in notes:
        print(note)
    if picture:
        print(f"merge picture: {picture}")
    same = ("only image tokens merge, text tokens attend to them as they are" if setup.dit
            else "tomesd and ToMe (tome) compute the same step")
    print(f"use_rand=False in every variant (each 2x2 cell's destination is its top-left token): {same}; ToFu "
          "prunes in the first half of the merging blocks and merges with MLERP in the second.")
    if setup.device == "cpu":
        steps = f"{setup.iters} step{'s' if setup.iters > 1 else ''}"
        print(f"(CPU figures: median of {steps}; on the CPU our patch runs the PyTorch reference, so this says "
              "little about GPU speed)")
    print("(RANDOM weights, nothing downloaded: the error and cosine columns only show that the machinery runs; "
          "they say nothing about image quality)")
    return 0


def save_picture(out_dir: str, hidden: torch.Tensor, size: int, ratio: float, max_downsample: int, name: str,
                 notes: List[str]) -> Optional[str]:
    """The merge picture of the first transformer block, from its input ``hidden`` [batch, N, C] (first latent).

    The step's partition and match are recomputed here with the PyTorch
    reference on the same input, which is what every variant does with
    ``use_rand=False``. Returns the path, or None (with a note) when that
    block does not merge or matplotlib is missing.
    """
    n = hidden.shape[1]
    factor = 1
    while math.ceil(size / factor) ** 2 > n:  # the block's resolution: the latent's divided by a power of 2
        factor *= 2
    side = math.ceil(size / factor)
    if factor > max_downsample:
        notes.append(f"no merge picture: the first transformer block runs at 1/{factor} of the latent, "
                     f"beyond max_downsample {max_downsample}, so it merges nothing")
        return None
    partition = spatial_partition(side, side, 2, 2, device=hidden.device)
    match = spatial_match(hidden[:1], partition, int(n * ratio))
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "merge_sd.png")
    title = (f"{name}, first transformer block ({side}x{side} tokens, 1/{factor} of the latent), ratio {ratio}, "
             "random weights")
    try:
        return save_latent_merge_picture(path, partition, match, (side, side), title)
    except ModuleNotFoundError as e:  # matplotlib is the [demo] extra
        notes.append(f"no merge picture: {(e.name or 'matplotlib').split('.')[0]} is not installed "
                     '(pip install "tofu-triton[demo]")')
        return None
