"""tofu_triton.patch.diffusers on the diffusion transformers: PixArt (BasicTransformerBlock with
ada_norm_single), SD3 (JointTransformerBlock, the last one context_pre_only), SD3.5's additions (a second,
image-only attention and q/k RMS norms) and Flux (FluxTransformerBlock, FluxSingleTransformerBlock).

The models have the real block classes and structure at 2 heads of 16 channels and one or two blocks of
each kind, random weights. Each patched block's output is compared with a re-statement, written here
from the diffusers block's own modules, of what it must compute: merge -> sub-layer -> unmerge (or
ToDo's pooled keys and values), with the text tokens attending as they are.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers", reason="diffusers is not installed (pip install -e \".[test]\")")
from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel  # noqa: E402
from diffusers.models.attention_processor import AttnProcessor  # noqa: E402
from diffusers.models.embeddings import apply_rotary_emb  # noqa: E402

import tofu_triton.patch as tp  # noqa: E402
from tofu_triton import reference  # noqa: E402
from tofu_triton.testing import run_in_threads  # noqa: E402

from conftest import count_calls  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread

TEXT, BATCH = 5, 2
FAMILIES = ("pixart", "sd3", "sd35", "flux")


def build(family, seed=0, layers=2):
    torch.manual_seed(seed)
    if family == "pixart":
        model = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                         num_layers=layers, cross_attention_dim=32, caption_channels=24, sample_size=8,
                                         use_additional_conditions=False)
    elif family in ("sd3", "sd35"):  # the last block is context_pre_only; SD3.5: dual attention, q/k norms
        model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=layers,
                                      attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                                      caption_projection_dim=32, pooled_projection_dim=16, pos_embed_max_size=16,
                                      dual_attention_layers=(0,) if family == "sd35" else (),
                                      qk_norm="rms_norm" if family == "sd35" else None)
    else:
        model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=layers // 2,
                                       num_single_layers=layers - layers // 2, attention_head_dim=16,
                                       num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=16,
                                       guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    return model.eval()


def inputs(family, grid=(7, 5), seed=1):
    """One step's inputs for an h x w grid of image tokens (latent 2h x 2w for PixArt / SD3's 2x2 patches)."""
    g = torch.Generator().manual_seed(seed)
    h, w = grid
    if family == "flux":
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float()
        return dict(hidden_states=torch.randn(BATCH, h * w, 16, generator=g),
                    encoder_hidden_states=torch.randn(BATCH, TEXT, 24, generator=g),
                    pooled_projections=torch.randn(BATCH, 16, generator=g), timestep=torch.full((BATCH,), 0.5),
                    guidance=torch.full((BATCH,), 3.5), img_ids=ids, txt_ids=torch.zeros(TEXT, 3))
    latent = torch.randn(BATCH, 4, 2 * h, 2 * w, generator=g)
    if family == "pixart":
        return dict(hidden_states=latent, encoder_hidden_states=torch.randn(BATCH, TEXT, 24, generator=g),
                    timestep=torch.full((BATCH,), 500), added_cond_kwargs=dict(resolution=None, aspect_ratio=None))
    return dict(hidden_states=latent, encoder_hidden_states=torch.randn(BATCH, TEXT, 24, generator=g),
                pooled_projections=torch.randn(BATCH, 16, generator=g), timestep=torch.full((BATCH,), 500.0))


def run(model, args):
    with torch.no_grad():
        return model(**args).sample


# --------------------------------------------------------------------------- the re-statement


class Merge:
    """One block's merge, from tofu_triton.reference (the definition, tested against tomesd itself in
    test_patch_diffusers.py) with top-left destinations (use_rand=False): m(.), u(.), the log of how many
    grid positions each merged token holds, and the position each merged token is rotated by."""

    def __init__(self, x, grid, ratio, mode, plan=None):
        if plan is None:
            self.part = reference.spatial_partition(*grid, 2, 2)
            self.match = reference.spatial_match(x, self.part, int(x.shape[1] * ratio))
        else:  # reused: another block's (or call's) partition and match, applied to this block's tokens
            self.part, self.match = plan.part, plan.match
        self.mode = mode

    def m(self, t):
        return reference.spatial_merge(t, self.match, self.part, self.mode)

    def u(self, t):
        return reference.spatial_unmerge(t, self.match, self.part)

    def log_sizes(self):
        rows = reference.output_rows(self.match, self.part)  # the merged token holding each position
        n = rows.shape[1] - self.match.r
        return torch.stack([torch.bincount(r, minlength=n) for r in rows]).float().log()

    def positions(self):  # merged tokens are [kept sources in ascending position, destinations]
        kept = self.part.a_pos[self.match.unm_idx]
        return torch.cat([kept, self.part.b_pos.expand(kept.shape[0], -1)], dim=1)


def pool(t, grid):
    """ToDo: tokens [..., h*w, C] averaged over 2x2 cells (edge cells over the tokens they have)."""
    h, w = grid
    cells = F.avg_pool2d(t.unflatten(-2, (h, w)).flatten(0, -4).permute(0, 3, 1, 2), 2, ceil_mode=True)
    return cells.permute(0, 2, 3, 1).flatten(1, 2).reshape(*t.shape[:-2], -1, t.shape[-1])


def pooled_log_sizes(grid):
    ones = torch.ones(1, 1, *grid)
    return F.avg_pool2d(ones, 2, ceil_mode=True, divisor_override=1).flatten().log()  # tokens per cell


def heads(t, n_heads):  # [B, S, H*D] -> [B, H, S, D]
    return t.unflatten(-1, (n_heads, -1)).transpose(1, 2)


def attention(q, k, v, bias=None):
    """softmax(q k^T / sqrt(d) + bias) v, with bias [B, S_k] added to every query's logits; -> [B, S_q, H*D]."""
    logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if bias is not None:
        logits = logits + bias[:, None, None, :]
    return (logits.softmax(-1) @ v).transpose(1, 2).flatten(2)


def rope(t, cos, sin):
    """diffusers' rotary embedding, one image at a time (tables [S, D], or [B, S, D]: one per image)."""
    if cos.dim() == 2:
        return apply_rotary_emb(t, (cos, sin), sequence_dim=2)
    return torch.cat([apply_rotary_emb(t[i:i + 1], (cos[i], sin[i]), sequence_dim=2) for i in range(len(t))])


class Setting:
    def __init__(self, mode, prop_attn=False, merge_mlp=False, merge_crossattn=False, ratio=0.5):
        self.mode, self.prop_attn, self.merge_mlp, self.merge_crossattn, self.ratio = (
            mode, prop_attn, merge_mlp, merge_crossattn, ratio)

    def kwargs(self):
        return dict(mode=self.mode, prop_attn=self.prop_attn, merge_mlp=self.merge_mlp,
                    merge_crossattn=self.merge_crossattn, ratio=self.ratio, use_rand=False)


class Image:
    """What a block does to its image tokens x [B, N, C] under a setting: the merge, and the image side of
    attention (keys pooled for ToDo, key bias from the sizes)."""

    def __init__(self, x, grid, s, plan=None):
        self.grid, self.s, self.todo = grid, s, s.mode == "todo"
        op_mode = {"tome": "mean"}.get(s.mode, s.mode)
        self.merge = None if self.todo else Merge(x, grid, s.ratio, op_mode, plan)

    def m(self, t, on=True):
        return self.merge.m(t) if self.merge and on else t

    def back(self, y, residual, on=True):
        return residual + (self.merge.u(y) if self.merge and on else y)

    def keys(self, k, v):
        """(k, v, bias [B, N_keys] or None) of the image tokens that attend."""
        if self.todo:
            bias = pooled_log_sizes(self.grid).expand(k.shape[0], -1) if self.s.prop_attn else None
            return pool(k, self.grid), pool(v, self.grid), bias
        bias = self.merge.log_sizes() if self.s.prop_attn and self.s.mode != "prune" else None
        return k, v, bias


class Merged(Image):
    """A block run whole on its merged image tokens: nothing merges inside it (m is the identity, back a plain
    residual add), but its keys have the merge's sizes and its rows the merge's rotary positions."""

    def m(self, t, on=True):
        return t

    def back(self, y, residual, on=True):
        return residual + y


def with_text_bias(bias, n_text, text_first):
    if bias is None:
        return None
    zeros = torch.zeros(bias.shape[0], n_text)
    return torch.cat([zeros, bias] if text_first else [bias, zeros], dim=1)


def pixart_block(blk, hidden_states, grid, s, encoder_hidden_states, timestep, encoder_attention_mask=None,
                 image=None, **_):
    x = hidden_states
    img = image or Image(x, grid, s)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
        blk.scale_shift_table[None] + timestep.reshape(x.shape[0], 6, -1)).chunk(6, dim=1)
    a = blk.attn1
    n = img.m(blk.norm1(x) * (1 + scale_msa) + shift_msa)
    k, v, bias = img.keys(heads(a.to_k(n), a.heads), heads(a.to_v(n), a.heads))
    out = a.to_out[0](attention(heads(a.to_q(n), a.heads), k, v, bias))
    x = img.back(gate_msa * out, x)
    cross = blk.attn2(img.m(x, s.merge_crossattn), encoder_hidden_states=encoder_hidden_states,
                      attention_mask=encoder_attention_mask)
    x = img.back(cross, x, s.merge_crossattn)
    ff = blk.ff(img.m(blk.norm2(x) * (1 + scale_mlp) + shift_mlp, s.merge_mlp))
    return img.back(gate_mlp * ff, x, s.merge_mlp)


def sd3_block(blk, hidden_states, grid, s, encoder_hidden_states, temb, image=None, **_):
    x, c = hidden_states, encoder_hidden_states
    img = image or Image(x, grid, s)
    if blk.use_dual_attention:
        nx, gate, shift_mlp, scale_mlp, gate_mlp, nx2, gate2 = blk.norm1(x, emb=temb)
    else:
        nx, gate, shift_mlp, scale_mlp, gate_mlp = blk.norm1(x, emb=temb)
    if blk.context_pre_only:
        nc = blk.norm1_context(c, temb)
    else:
        nc, c_gate, c_shift, c_scale, c_gate_mlp = blk.norm1_context(c, emb=temb)

    def sd3_attention(a, image, text):  # image tokens first, then text (SD3's order)
        def qkv(t, to_q, to_k, to_v, norm_q, norm_k):
            q, k, v = heads(to_q(t), a.heads), heads(to_k(t), a.heads), heads(to_v(t), a.heads)
            return (norm_q(q) if norm_q else q), (norm_k(k) if norm_k else k), v

        q, k, v = qkv(img.m(image), a.to_q, a.to_k, a.to_v, a.norm_q, a.norm_k)
        k, v, bias = img.keys(k, v)
        if text is None:
            return a.to_out[0](attention(q, k, v, bias)), None
        tq, tk, tv = qkv(text, a.add_q_proj, a.add_k_proj, a.add_v_proj, a.norm_added_q, a.norm_added_k)
        out = attention(torch.cat([q, tq], 2), torch.cat([k, tk], 2), torch.cat([v, tv], 2),
                        with_text_bias(bias, text.shape[1], text_first=False))
        n = q.shape[2]
        return a.to_out[0](out[:, :n]), (None if a.context_pre_only else a.to_add_out(out[:, n:]))

    out, context_out = sd3_attention(blk.attn, nx, nc)
    x2 = img.back(gate.unsqueeze(1) * out, x)
    if blk.use_dual_attention:
        x2 = img.back(gate2.unsqueeze(1) * sd3_attention(blk.attn2, nx2, None)[0], x2)
    ff = blk.ff(img.m(blk.norm2(x2) * (1 + scale_mlp[:, None]) + shift_mlp[:, None], s.merge_mlp))
    x2 = img.back(gate_mlp.unsqueeze(1) * ff, x2, s.merge_mlp)
    if blk.context_pre_only:
        return None, x2
    c = c + c_gate.unsqueeze(1) * context_out
    c = c + c_gate_mlp.unsqueeze(1) * blk.ff_context(blk.norm2_context(c) * (1 + c_scale[:, None]) + c_shift[:, None])
    return c, x2


def flux_qkv(a, t, text=False):
    if text:
        q, k, v = a.add_q_proj(t), a.add_k_proj(t), a.add_v_proj(t)
        return a.norm_added_q(heads(q, a.heads)), a.norm_added_k(heads(k, a.heads)), heads(v, a.heads)
    return a.norm_q(heads(a.to_q(t), a.heads)), a.norm_k(heads(a.to_k(t), a.heads)), heads(a.to_v(t), a.heads)


def flux_attention(img, image_qkv, text_qkv, rotary, n_text):
    """Flux's joint attention, text first; each side rotated by its rows of the rotary tables (a merged image
    token by its destination's position)."""
    cos, sin = rotary
    icos, isin = cos[n_text:], sin[n_text:]
    if img.merge:
        where = img.merge.positions()
        icos, isin = icos[where], isin[where]
    q, k, v = image_qkv
    q, k = rope(q, icos, isin), rope(k, icos, isin)
    k, v, bias = img.keys(k, v)
    tq, tk, tv = text_qkv
    tq, tk = rope(tq, cos[:n_text], sin[:n_text]), rope(tk, cos[:n_text], sin[:n_text])
    out = attention(torch.cat([tq, q], 2), torch.cat([tk, k], 2), torch.cat([tv, v], 2),
                    with_text_bias(bias, n_text, text_first=True))
    return out[:, n_text:], out[:, :n_text]


def flux_block(blk, hidden_states, grid, s, encoder_hidden_states, temb, image_rotary_emb, image=None, **_):
    x, c = hidden_states, encoder_hidden_states
    img = image or Image(x, grid, s)
    nx, gate, shift_mlp, scale_mlp, gate_mlp = blk.norm1(x, emb=temb)
    nc, c_gate, c_shift, c_scale, c_gate_mlp = blk.norm1_context(c, emb=temb)
    a = blk.attn
    out, context_out = flux_attention(img, flux_qkv(a, img.m(nx)), flux_qkv(a, nc, text=True), image_rotary_emb,
                                      c.shape[1])
    x = img.back(gate.unsqueeze(1) * a.to_out[0](out), x)
    ff = blk.ff(img.m(blk.norm2(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None], s.merge_mlp))
    x = img.back(gate_mlp.unsqueeze(1) * ff, x, s.merge_mlp)
    c = c + c_gate.unsqueeze(1) * a.to_add_out(context_out)
    c = c + c_gate_mlp.unsqueeze(1) * blk.ff_context(blk.norm2_context(c) * (1 + c_scale[:, None]) + c_shift[:, None])
    return c, x


def flux_single_block(blk, hidden_states, grid, s, encoder_hidden_states, temb, image_rotary_emb, image=None, **_):
    x, c, t = hidden_states, encoder_hidden_states, encoder_hidden_states.shape[1]
    img = image or Image(x, grid, s)
    norm, gate = blk.norm(torch.cat([c, x], dim=1), emb=temb)
    seq = torch.cat([norm[:, :t], img.m(norm[:, t:])], dim=1)  # attention and MLP: one parallel sub-layer
    q, k, v = flux_qkv(blk.attn, seq)
    out, context_out = flux_attention(img, (q[:, :, t:], k[:, :, t:], v[:, :, t:]),
                                      (q[:, :, :t], k[:, :, :t], v[:, :, :t]), image_rotary_emb, t)
    mlp = blk.act_mlp(blk.proj_mlp(seq))
    y = gate.unsqueeze(1) * blk.proj_out(torch.cat([torch.cat([context_out, out], dim=1), mlp], dim=2))
    return c + y[:, :t], img.back(y[:, t:], x)


EXPECTED = {"BasicTransformerBlock": pixart_block, "JointTransformerBlock": sd3_block,
            "FluxTransformerBlock": flux_block, "FluxSingleTransformerBlock": flux_single_block}


def block_calls(model, args):
    """Run ``model`` once; (block, its keyword inputs, its output) for every transformer block, in order."""
    calls, hooks = [], []
    names = ("hidden_states", "attention_mask", "encoder_hidden_states", "encoder_attention_mask", "timestep")
    for blk in model.modules():
        if type(blk).__name__.startswith("Tofu") and type(blk)._tofu_base.__name__ in EXPECTED:
            def hook(module, a, kw, out):
                calls.append((module, dict(zip(names, a), **kw), out))
            hooks.append(blk.register_forward_hook(hook, with_kwargs=True))
    run(model, args)
    for h in hooks:
        h.remove()
    return calls


SETTINGS = {"tome": Setting("tome"), "mlerp+mlp+prop": Setting("mlerp", prop_attn=True, merge_mlp=True),
            "prune+mlp+prop": Setting("prune", prop_attn=True, merge_mlp=True, ratio=0.7),
            "todo": Setting("todo"), "todo+prop": Setting("todo", prop_attn=True)}


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("family", FAMILIES)
def test_every_block_computes_the_restated_step(family, setting):
    s = SETTINGS[setting]
    if family == "pixart" and setting == "tome":
        s = Setting("tome", merge_crossattn=True)
    model, args, grid = build(family), inputs(family), (7, 5)  # odd sides: cells cut by the edges
    tp.diffusers(model, seed=0, **s.kwargs())
    calls = block_calls(model, args)
    assert len(calls) == 2
    for blk, kw, out in calls:
        base = type(blk)._tofu_base
        with torch.no_grad():
            want = EXPECTED[base.__name__](blk, grid=grid, s=s, **kw)
            kw.pop("joint_attention_kwargs", None), kw.pop("cross_attention_kwargs", None)
            unpatched = base.forward(blk, **kw)
        outputs = lambda o: o if isinstance(o, tuple) else (o,)  # noqa: E731  (SD3 / Flux: text, image)
        for got, expected in zip(outputs(out), outputs(want)):
            if expected is None:  # the last SD3 block's text stream
                assert got is None
            else:
                torch.testing.assert_close(got, expected, rtol=1e-4, atol=2e-5)
        assert (outputs(out)[-1] - outputs(unpatched)[-1]).abs().max() > 1e-3  # the step did change the block


def restated(blk, kw, grid, s, plan=None, whole=False):
    """The re-statement of one block call (kw: its keyword inputs): merging with ``plan`` (a Merge computed from
    other tokens) where given, else with its own; ``whole``: the block run on its merged image tokens, its
    update unmerged once (x + u(block(m(x)) - m(x)))."""
    fn = EXPECTED[type(blk)._tofu_base.__name__]
    kw = {k: v for k, v in kw.items() if k not in ("joint_attention_kwargs", "cross_attention_kwargs")}
    if not whole:
        return fn(blk, grid=grid, s=s, image=Image(kw["hidden_states"], grid, s, plan), **kw)
    x = kw.pop("hidden_states")
    img = Merged(x, grid, s, plan)
    merged = img.merge.m(x)
    out = fn(blk, hidden_states=merged, grid=grid, s=s, image=img, **kw)
    if isinstance(out, tuple):  # SD3 / Flux: (text, image)
        return out[0], x + img.merge.u(out[1] - merged)
    return x + img.merge.u(out - merged)


def assert_blocks(calls, expected):
    for (_, _, out), want in zip(calls, expected):
        outputs = lambda o: o if isinstance(o, tuple) else (o,)  # noqa: E731
        for got, w in zip(outputs(out), outputs(want)):
            if w is None:
                assert got is None
            else:
                torch.testing.assert_close(got, w, rtol=1e-4, atol=2e-5)


def same_plan(a, b):
    return torch.equal(a.match.unm_idx, b.match.unm_idx) and torch.equal(a.match.dst_src, b.match.dst_src)


REUSE_SETTING = Setting("mlerp", prop_attn=True, merge_mlp=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_step_reuse_merges_every_block_with_the_first_blocks_plan(family):
    s, grid = REUSE_SETTING, (7, 5)
    model = tp.diffusers(build(family, seed=2), seed=0, reuse="step", **s.kwargs())  # blocks whose plans differ
    calls = block_calls(model, inputs(family))
    plan = Merge(calls[0][1]["hidden_states"], grid, s.ratio, s.mode)
    assert not same_plan(plan, Merge(calls[1][1]["hidden_states"], grid, s.ratio, s.mode))  # reuse does matter
    with torch.no_grad():
        assert_blocks(calls, [restated(blk, kw, grid, s, plan) for blk, kw, _ in calls])


@pytest.mark.parametrize("setting", ["tome", "mlerp+mlp+prop", "prune+mlp+prop"])
@pytest.mark.parametrize("family", FAMILIES)
def test_whole_block_mode_runs_every_block_on_the_merged_tokens(family, setting):
    s, grid, args = SETTINGS[setting], (7, 5), inputs(family)
    model = tp.diffusers(build(family), seed=0, whole_block=True, **s.kwargs())
    calls = block_calls(model, args)
    with torch.no_grad():
        assert_blocks(calls, [restated(blk, kw, grid, s, whole=True) for blk, kw, _ in calls])
    model.whole_block = False  # per sub-layer: another result
    assert (run(model, args) - run(tp.diffusers(model, whole_block=True), args)).abs().max() > 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_whole_block_mode_is_diffusers_own_block_on_the_merged_tokens(family):
    # Without proportional attention a whole block is exactly diffusers' unpatched forward run on m(x) (Flux:
    # one image at a time, each with the rotary rows of its merged tokens), its update unmerged onto x.
    s, grid = Setting("tome"), (7, 5)
    model = tp.diffusers(build(family), seed=0, whole_block=True, **s.kwargs())
    calls = block_calls(model, inputs(family))
    for blk, kw, out in calls:
        base = type(blk)._tofu_base
        kw = {k: v for k, v in kw.items() if k not in ("joint_attention_kwargs", "cross_attention_kwargs")}
        x = kw.pop("hidden_states")
        merge = Merge(x, grid, s.ratio, "mean")
        merged = merge.m(x)
        with torch.no_grad():
            if "image_rotary_emb" not in kw:
                want = base.forward(blk, merged, **kw)
            else:  # per image: its merged tokens' positions pick its rows of the rotary tables
                cos, sin = kw.pop("image_rotary_emb")
                n_text, where = kw["encoder_hidden_states"].shape[1], merge.positions()
                parts = [base.forward(blk, merged[i:i + 1], kw["encoder_hidden_states"][i:i + 1], kw["temb"][i:i + 1],
                                      tuple(torch.cat([t[:n_text], t[n_text:][where[i]]]) for t in (cos, sin)))
                         for i in range(BATCH)]
                want = tuple(torch.cat(p) for p in zip(*parts))
        if isinstance(want, tuple):
            torch.testing.assert_close(out[0], want[0], rtol=1e-4, atol=2e-5)
            want, out = want[1], out[1]
        torch.testing.assert_close(out, x + merge.u(want - merged), rtol=1e-4, atol=2e-5)


def test_whole_block_mode_shortens_every_projection():
    # Flux: the image side of every projection and MLP sees N - r rows; the text side all of its tokens.
    model, args = build("flux"), inputs("flux", grid=(6, 6))
    tp.diffusers(model, ratio=0.5, mode="tome", whole_block=True)
    rows = {}
    for name, module in model.named_modules():
        if name.split(".")[-1] in ("to_k", "add_k_proj", "proj_mlp", "ff", "ff_context"):
            module.register_forward_pre_hook(lambda m, a, name=name: rows.__setitem__(name, a[0].shape[1]))
    run(model, args)
    kept = 36 - 18
    assert rows == {"transformer_blocks.0.attn.to_k": kept, "transformer_blocks.0.attn.add_k_proj": TEXT,
                    "transformer_blocks.0.ff": kept, "transformer_blocks.0.ff_context": TEXT,
                    "single_transformer_blocks.0.proj_mlp": TEXT + kept,
                    "single_transformer_blocks.0.attn.to_k": TEXT + kept}


@pytest.mark.parametrize("family", ["pixart", "flux"])
def test_plans_kept_for_k_calls(family):
    # reuse=2: the second call merges with the first call's plan, the third computes its own again; a call
    # with another batch size computes its own.
    s, grid = REUSE_SETTING, (7, 5)
    model = tp.diffusers(build(family), seed=0, reuse=2, **s.kwargs())
    first = block_calls(model, inputs(family, seed=1))
    plan = Merge(first[0][1]["hidden_states"], grid, s.ratio, s.mode)
    second = block_calls(model, inputs(family, seed=2))
    assert not same_plan(plan, Merge(second[0][1]["hidden_states"], grid, s.ratio, s.mode))
    third = block_calls(model, inputs(family, seed=3))
    own = Merge(third[0][1]["hidden_states"], grid, s.ratio, s.mode)
    with torch.no_grad():
        assert_blocks(second, [restated(blk, kw, grid, s, plan) for blk, kw, _ in second])
        assert_blocks(third, [restated(blk, kw, grid, s, own) for blk, kw, _ in third])
    one = {k: v[:1] if torch.is_tensor(v) and v.shape[0] == BATCH else v for k, v in inputs(family, seed=4).items()}
    fourth = block_calls(model, one)  # within 2 calls of the third, but one image: a plan of its own
    own = Merge(fourth[0][1]["hidden_states"], grid, s.ratio, s.mode)
    with torch.no_grad():
        assert_blocks(fourth, [restated(blk, kw, grid, s, own) for blk, kw, _ in fourth])


def test_the_reuse_interval_wraps_across_calls(monkeypatch):
    from tofu_triton import ops

    matches = []
    real = ops.spatial_match
    monkeypatch.setattr(ops, "spatial_match", lambda *a, **k: matches.append(1) or real(*a, **k))
    model = tp.diffusers(build("sd3"), ratio=0.5, reuse=3, seed=0)
    counts = []
    for i in range(7):
        matches.clear()
        run(model, inputs("sd3", grid=(6, 4) if i == 4 else (7, 5), seed=i))  # call 4: another resolution
        counts.append(len(matches))
    # computed at calls 0, 3, 6 (two blocks, one plan each time); call 4's grid has none, so it makes its own
    assert counts == [1, 0, 0, 1, 1, 0, 1]
    tp.diffusers(model, ratio=0.5, reuse=3, seed=0)  # patching again drops the kept plans
    matches.clear()
    run(model, inputs("sd3", seed=0))
    assert len(matches) == 1


def test_kept_plans_are_per_thread_and_unpatch_restores():
    model, args = build("flux"), inputs("flux", grid=(4, 4))
    expected = run(model, args)
    tp.diffusers(model, ratio=0.5, seed=1, reuse=2)
    jobs = [[inputs("flux", grid=(4, 4), seed=2 * i + j) for j in range(2)] for i in range(3)]
    denoise = lambda job: [run(model, args) for args in job]  # noqa: E731  one thread's loop of 2 calls
    want = []
    for job in jobs:
        tp.diffusers(model, ratio=0.5, seed=1, reuse=2)  # a fresh start for each loop
        want.append(denoise(job))
    tp.diffusers(model, ratio=0.5, seed=1, reuse=2)
    got = run_in_threads(denoise, jobs, repeats=2)  # threads sharing one store would reuse each other's plans
    assert all(torch.equal(a, b) for g, w in zip(got, want) for a, b in zip(g, w))
    tp.unpatch(model)
    assert torch.equal(run(model, args), expected)


@pytest.mark.parametrize("family, kwargs, err, match", [
    ("sd3", dict(reuse="always"), ValueError, "reuse must be"),
    ("sd3", dict(reuse=0), ValueError, "reuse must be"),
    ("flux", dict(reuse=True), ValueError, "reuse must be"),
    ("pixart", dict(whole_block=1), TypeError, "whole_block must be a bool"),
    ("flux", dict(whole_block=True, mode="todo"), ValueError, "whole_block.*todo"),
])
def test_plan_settings_that_do_not_apply_are_refused(family, kwargs, err, match):
    model = build(family)
    with pytest.raises(err, match=match):
        tp.diffusers(model, **kwargs)
    assert not tp.is_patched(model)


def test_torch_compile_takes_step_reuse_and_whole_blocks_and_refuses_kept_plans():
    torch._dynamo.reset()
    model = tp.diffusers(build("flux"), ratio=0.5, seed=2, reuse="step", whole_block=True)
    args = dict(inputs("flux", grid=(4, 6)), joint_attention_kwargs={"tofu_grid": (4, 6)})
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(**args).sample, run(model, args), rtol=1e-5, atol=1e-5)
        model.plan_reuse = 2
        torch._dynamo.reset()
        with pytest.raises(Exception, match="reuse=2 keeps plans across calls"):
            torch.compile(model, backend="eager", fullgraph=True)(**args)


@pytest.mark.parametrize("family", FAMILIES)
def test_ratio_0_is_bitwise_unpatched_and_unpatch_restores(family):
    model, args = build(family), inputs(family)
    expected = run(model, args)
    for mode, plans in (("tofu", {}), ("todo", {}), ("tome", dict(reuse=2, whole_block=True))):
        tp.diffusers(model, ratio=0.0, mode=mode, prop_attn=True, merge_mlp=True, **plans)
        assert torch.equal(run(model, args), expected)
    model.ratio = 0.5
    assert (run(model, args) - expected).abs().max() > 1e-3
    tp.unpatch(model)
    assert not tp.is_patched(model) and not any(type(m).__name__.startswith("Tofu") for m in model.modules())
    assert not any("_tofu_layer" in vars(m) for m in model.modules())
    assert torch.equal(run(model, args), expected)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_text_tokens_are_never_merged(family):
    # Count the rows every projection sees: the text side gets all its tokens, the image side N - r.
    model, args = build(family), inputs(family, grid=(6, 6))
    tp.diffusers(model, ratio=0.5, mode="tome", merge_mlp=True)
    rows = {}

    def count(name):
        def hook(module, args):
            rows[name] = args[0].shape[1]
        return hook

    for name, module in model.named_modules():
        if name.split(".")[-1] in ("to_k", "add_k_proj", "proj_mlp"):
            module.register_forward_pre_hook(count(name))
    run(model, args)
    kept = 36 - 18  # r = int(36 * 0.5)
    if family == "sd3":
        assert rows == {"transformer_blocks.0.attn.to_k": kept, "transformer_blocks.0.attn.add_k_proj": TEXT,
                        "transformer_blocks.1.attn.to_k": kept, "transformer_blocks.1.attn.add_k_proj": TEXT}
    else:  # the single-stream block projects [text, merged image] in one
        assert rows == {"transformer_blocks.0.attn.to_k": kept, "transformer_blocks.0.attn.add_k_proj": TEXT,
                        "single_transformer_blocks.0.proj_mlp": TEXT + kept,
                        "single_transformer_blocks.0.attn.to_k": TEXT + kept}


@pytest.mark.parametrize("family", ["pixart", "sd35", "flux"])
def test_fused_kernels_match_the_reference(family, monkeypatch, device):
    # The whole patched model on the Triton kernels (the interpreter on a CPU) against the reference backend.
    from tofu_triton.kernels import partition, unmerge

    calls = count_calls(monkeypatch, [partition, unmerge], ["spatial_partition", "spatial_unmerge"])
    model = build(family).to(device)
    args = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs(family, grid=(6, 6)).items()}
    settings = dict(ratio=0.5, mode="tofu", merge_mlp=True, prop_attn=True, seed=3)
    want = run(tp.diffusers(copy.deepcopy(model), backend="reference", **settings), args)
    got = run(tp.diffusers(model, backend="triton", **settings), args)
    unmerges = {"pixart": 4, "sd35": 5, "flux": 3}[family]  # per call: 2 + 2 / (2 + 1) + 2 / 2 + 1
    assert calls == {"spatial_partition": 2, "spatial_unmerge": unmerges}
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["pixart", "sd3", "flux"])
def test_grid_travels_with_each_call_across_threads(family):
    model = tp.diffusers(build(family), ratio=0.5, mode="tofu", prop_attn=True, seed=1)
    jobs = [inputs(family, grid=grid, seed=i) for i, grid in enumerate([(4, 4), (6, 4), (4, 8), (4, 4)])]
    expected = [run(model, args) for args in jobs]
    results = run_in_threads(lambda args: run(model, args), jobs, repeats=2)
    assert all(torch.equal(a, b) for a, b in zip(results, expected))


@pytest.mark.parametrize("family", ["pixart", "sd3", "flux"])
def test_torch_compile_fullgraph_matches_eager(family):
    torch._dynamo.reset()
    model = tp.diffusers(build(family, layers=1 if family == "pixart" else 2), ratio=0.5, prop_attn=True, seed=2)
    args = inputs(family, grid=(4, 6))
    if family == "flux":  # a graph cannot read the grid from img_ids: the caller names it
        args["joint_attention_kwargs"] = {"tofu_grid": (4, 6)}
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # dynamo's whole-graph capture is the point
    with torch.no_grad():
        out = compiled(**args).sample
    torch.testing.assert_close(out, run(model, args), rtol=1e-5, atol=1e-5)


def test_flux_grid_comes_from_img_ids_or_the_caller():
    model, args = build("flux"), inputs("flux", grid=(4, 6))
    tp.diffusers(model, ratio=0.5, seed=0)
    out = run(model, args)
    assert torch.equal(run(model, dict(args, joint_attention_kwargs={"tofu_grid": (4, 6)})), out)
    flipped = args["img_ids"].flip(0)  # the same positions in another order: the grid reads (0, 0) last
    with pytest.raises(ValueError, match="not a 1x1 grid"):
        run(model, dict(args, img_ids=flipped))
    with pytest.raises(ValueError, match="not the row-major grid"):
        run(model, dict(args, img_ids=flipped, joint_attention_kwargs={"tofu_grid": (4, 6)}))
    with pytest.raises(ValueError, match="not the row-major grid"):  # 24 tokens, but a 4x6 grid is not 6x4
        run(model, dict(args, joint_attention_kwargs={"tofu_grid": (6, 4)}))
    with pytest.raises(ValueError, match="tofu_grid.*must be"):
        run(model, dict(args, joint_attention_kwargs={"tofu_grid": 24}))


def test_plan_and_settings_of_a_transformer():
    model = tp.diffusers(build("flux", layers=4), ratio=0.5, mode="tofu")  # 2 double + 2 single blocks
    plan = tp.plan(model, (6, 6))
    assert [p.block for p in plan] == ["FluxTransformerBlock"] * 2 + ["FluxSingleTransformerBlock"] * 2
    assert [p.mode for p in plan] == ["prune", "prune", "mlerp", "mlerp"]  # forward order across both kinds
    assert {(p.tokens, p.r, p.downsample) for p in plan} == {(36, 18, 1)}
    assert [p.tokens for p in tp.plan(model)] == [4096] * 4  # Flux's default: 1024 px
    model.tofu_mode = "todo"
    assert {(p.mode, p.r) for p in tp.plan(model, 36)} == {("todo", 27)}  # 9 pooled keys of 36
    model.ratio = 0.0
    assert {p.mode for p in tp.plan(model, 36)} == {None}
    settings = tp.settings(model)  # the defaults, resolved: proportional attention where text competes (joint)
    assert settings["max_downsample"] is None and (settings["merge_mlp"], settings["prop_attn"]) == (False, True)
    assert (tp.settings(tp.diffusers(build("pixart")))["prop_attn"], tp.settings(tp.diffusers(build("sd3")))[
        "prop_attn"]) == (False, True)
    with pytest.raises(ValueError, match="not a square grid"):
        tp.plan(model, 24)


def test_patching_again_takes_the_new_settings_and_patched_restores_them():
    model, args = build("sd3"), inputs("sd3")
    tp.diffusers(model, ratio=0.3, mode="tome", seed=0)
    first = run(model, args)
    tp.diffusers(model, ratio=0.5, mode="mlerp", seed=0)
    assert tp.settings(model)["ratio"] == 0.5 and tp.settings(model)["tofu_mode"] == "mlerp"
    with tp.patched(model, ratio=0.3, mode="tome", seed=0):
        assert torch.equal(run(model, args), first)
    assert tp.settings(model)["ratio"] == 0.5


class Pipeline(torch.nn.Module):  # what matters of a diffusers pipeline here: its .transformer
    def __init__(self, family):
        super().__init__()
        self.transformer = build(family)


def test_pipelines_are_patched_through_their_transformer():
    pipe = Pipeline("pixart")
    assert tp.diffusers(pipe, ratio=0.5) is pipe and tp.is_patched(pipe) and tp.is_patched(pipe.transformer)
    assert len(tp.plan(pipe)) == 2
    tp.unpatch(pipe)
    assert type(pipe.transformer) is PixArtTransformer2DModel


@pytest.mark.parametrize("family, kwargs, err, match", [
    ("flux", dict(max_downsample=2), ValueError, "max_downsample does not apply to a FluxTransformer2DModel"),
    ("sd3", dict(merge_crossattn=True), ValueError, "merge_crossattn does not apply to a SD3Transformer2DModel"),
    ("pixart", dict(merge_attn=False, merge_mlp=False), ValueError, "nothing would merge"),
    ("pixart", dict(mode="fast"), ValueError, "mode must be one of"),
    ("flux", dict(prop_attn="yes"), TypeError, "prop_attn must be a bool"),
])
def test_settings_that_do_not_apply_are_refused(family, kwargs, err, match):
    model = build(family)
    with pytest.raises(err, match=match):
        tp.diffusers(model, **kwargs)
    assert not tp.is_patched(model) and not any(type(m).__name__.startswith("Tofu") for m in model.modules())


def test_settings_are_checked_at_every_call():
    model, args = build("flux"), inputs("flux")
    tp.diffusers(model, ratio=0.5)
    for name, value, err in [("ratio", 1.5, ValueError), ("ratio", -0.1, ValueError), ("merge_mlp", 1, TypeError),
                             ("max_downsample", 1, ValueError)]:
        good = getattr(model, name)
        setattr(model, name, value)
        with pytest.raises(err, match=name):
            run(model, args)
        setattr(model, name, good)
    run(model, args)


def test_what_the_patched_blocks_cannot_follow_is_refused():
    sd3, pixart = build("sd3"), build("pixart")
    tp.diffusers(sd3, ratio=0.5)
    sd3.set_attn_processor(AttnProcessor())  # a processor the merging blocks would bypass
    with pytest.raises(TypeError, match="JointAttnProcessor2_0"):
        run(sd3, inputs("sd3"))
    tp.diffusers(pixart, ratio=0.5)
    mask = torch.ones(BATCH, 35)  # a mask over every image token cannot follow merged ones
    with pytest.raises(ValueError, match="attention_mask"):
        run(pixart, dict(inputs("pixart"), attention_mask=mask))
    flux = tp.diffusers(build("flux"), ratio=0.5)
    with pytest.raises(ValueError, match="joint_attention_kwargs"):
        run(flux, dict(inputs("flux"), joint_attention_kwargs={"ip_hidden_states": []}))
