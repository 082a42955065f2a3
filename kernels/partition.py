"""Partition: the cell partition of a latent grid for the Stable Diffusion step
(reference.spatial_partition with reference.cell_choice, docs/design.md §5, §5.1).

One program per band of ``sy`` grid rows (one row of cells) tests every
position for being its cell's destination (the top-left token, or the one a
splitmix64 hash of (seed, step, block, cell) picks, bit for bit as the
reference) and ranks it in A or B with running counts. A band needs no other
band's result: every full row of cells before it holds exactly ``w // sx``
destinations, so its first ranks are known. It replaces the ~30 small torch
ops of the reference's partition (one program for the whole grid measured
0.281 ms at N = 65536 on an H200, 2026-12-04; the bands spread that over
h / sy programs).
"""
import torch
import triton
import triton.language as tl

from .common import empty, on_device, plain

PARTITION_BLOCK = 1024  # positions per tile (8 warps: no spills on sm_80/sm_90)
PARTITION_WARPS = 8


@triton.jit
def _mix(z):
    """splitmix64's finalizer on int64 (reference._mix, bit for bit: wrapping
    multiplications, shifts made logical by masking)."""
    z = (z ^ ((z >> 30) & ((1 << 34) - 1))) * -4658895280553007687
    z = (z ^ ((z >> 27) & ((1 << 37) - 1))) * -7723592293110705685
    return z ^ ((z >> 31) & ((1 << 33) - 1))


@triton.jit
def _partition_kernel(
    step_ptr, a_pos_ptr, b_pos_ptr, slot_ptr,
    N, W, HSY, WSX, SX, SY, NA, seed, block,
    RAND: tl.constexpr, BLOCK: tl.constexpr,
):
    """Program ``band`` builds rows ``[band * SY, (band + 1) * SY)`` of
    reference.spatial_partition(h, w, sx, sy, cell_choice(...)): each position
    is tested for being its cell's destination, and running counts of B
    positions, starting after the ``WSX`` destinations of each earlier full
    cell row, give every position its rank in A or in B."""
    band = tl.program_id(0)
    lanes = tl.arange(0, BLOCK)
    if RAND:
        inner = _mix(tl.load(step_ptr) * 1000003 + block * 7919 + seed)
    n_b = tl.minimum(band, HSY) * WSX
    lo = band * SY * W
    hi = tl.minimum(lo + SY * W, N)
    for n0 in range(lo, hi, BLOCK):
        n = n0 + lanes
        mask = n < hi
        y = n // W
        x = n % W
        cy = y // SY
        cx = x // SX
        if RAND:
            cell = (cy * WSX + cx).to(tl.int64)
            choice = ((_mix(cell + inner) & 9223372036854775807) % (SX * SY)).to(tl.int32)
        else:
            choice = tl.zeros([BLOCK], dtype=tl.int32)
        is_b = mask & (cy < HSY) & (cx < WSX) & ((y - cy * SY) * SX + (x - cx * SX) == choice)
        b_upto = n_b + tl.cumsum(is_b.to(tl.int32), axis=0)  # B positions up to and including n
        b_rank = b_upto - 1
        a_rank = n - b_upto
        tl.store(slot_ptr + n, tl.where(is_b, NA + b_rank, a_rank).to(tl.int64), mask=mask)
        tl.store(b_pos_ptr + b_rank, n.to(tl.int64), mask=is_b)
        tl.store(a_pos_ptr + a_rank, n.to(tl.int64), mask=mask & ~is_b)
        n_b += tl.sum(is_b.to(tl.int32), axis=0)


def spatial_partition(step: torch.Tensor, h: int, w: int, sx: int, sy: int, seed: int, block: int, rand: bool,
                      wrap=plain):
    """Launch the partition kernel: (a_pos [Na], b_pos [Nb], slot [N]) int64 on step's device
    (step: int64 scalar tensor, read only when ``rand``), as reference.spatial_partition."""
    hsy, wsx = h // sy, w // sx
    n, nb = h * w, hsy * wsx
    dev = step.device
    a_pos = empty(n - nb, dtype=torch.int64, device=dev)
    b_pos = empty(nb, dtype=torch.int64, device=dev)
    slot = empty(n, dtype=torch.int64, device=dev)
    with on_device(step):
        wrap(_partition_kernel)[(-(-h // sy),)](  # one program per band of sy rows
            step, a_pos, b_pos, slot, n, w, hsy, wsx, sx, sy, n - nb, seed, block,
            RAND=rand, BLOCK=PARTITION_BLOCK, num_warps=PARTITION_WARPS,
        )
    return a_pos, b_pos, slot
