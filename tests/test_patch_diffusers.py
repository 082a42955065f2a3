"""tofu_triton.patch.diffusers on Stable Diffusion UNets built from the published SD 1.5 / 2.1 / SDXL
configs (block layout as published, widths shrunk so a CPU runs them in milliseconds; random
weights, nothing downloads), checked against tomesd itself."""
import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install -e \".[test]\")")
tomesd = pytest.importorskip("tomesd", reason="tomesd is not installed (pip install -e \".[test]\")")
from diffusers import UNet2DConditionModel  # noqa: E402

import tofu_triton.patch as tp  # noqa: E402
from tofu_triton import reference  # noqa: E402
from tofu_triton.reference import cell_choice  # noqa: E402
from tofu_triton.testing import run_in_threads  # noqa: E402

from conftest import count_calls  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread

# The published configs' layout (block types, layers, projections, SDXL's added conditioning)...
SD15 = dict(down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, layers_per_block=2)
SD21 = dict(SD15, use_linear_projection=True, upcast_attention=True)
SDXL = dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=2,
            transformer_layers_per_block=(1, 2, 3), use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 32)
# ... with small widths (the published ones are 320-1280 channels and 768-2048 context).
SMALL = dict(sample_size=16, cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
WIDTHS = {"sd15": (32, 32, 64, 64), "sd21": (32, 32, 64, 64), "sdxl": (32, 64, 64)}
CONFIGS = {"sd15": SD15, "sd21": SD21, "sdxl": SDXL}


def unet(name, seed=0):
    torch.manual_seed(seed)
    return UNet2DConditionModel(**CONFIGS[name], **SMALL, block_out_channels=WIDTHS[name]).eval()


def inputs(name, batch=2, side=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    args = dict(sample=torch.randn(batch, 4, side, side, generator=g), timestep=torch.tensor([500] * batch),
                encoder_hidden_states=torch.randn(batch, 7, 32, generator=g))
    if name == "sdxl":
        args["added_cond_kwargs"] = dict(text_embeds=torch.randn(batch, 32, generator=g),
                                         time_ids=torch.randn(batch, 6, generator=g))
    return args


def run(model, args):
    rest = {k: v for k, v in args.items() if k != "sample"}
    with torch.no_grad():
        return model(args["sample"], **rest).sample  # positional: how pipelines call it (and tomesd's hook reads it)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ratio_0_is_bitwise_unpatched(name):
    model, args = unet(name), inputs(name)
    expected = run(model, args)
    tp.diffusers(model, ratio=0.0)
    assert torch.equal(run(model, args), expected)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("kwargs", [dict(), dict(max_downsample=2), dict(merge_crossattn=True, merge_mlp=True),
                                    dict(ratio=0.7, sx=3, sy=2)])
def test_tome_mode_reproduces_tomesd(name, kwargs):
    ours, theirs, args = unet(name), unet(name), inputs(name)
    # SDXL has no transformer block at full resolution: its highest-resolution attention is at 1/2.
    settings = dict(dict(ratio=0.5, max_downsample=2 if name == "sdxl" else 1, sx=2, sy=2), **kwargs)
    tp.diffusers(ours, mode="tome", use_rand=False, **settings)
    tomesd.apply_patch(theirs, use_rand=False, **settings)
    got, want = run(ours, args), run(theirs, args)
    unpatched = run(unet(name), args)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - unpatched).abs().max() > 1e-3  # merging did happen


def test_the_step_matches_tomesd_merge_and_unmerge():
    # Odd grids, cells that do not divide them, and a per-token sub-layer in between.
    from tomesd import merge as tm

    layer = torch.nn.Linear(16, 16)
    for h, w, sx, sy in [(8, 8, 2, 2), (7, 9, 2, 2), (6, 6, 3, 2)]:
        x = torch.randn(2, h * w, 16, generator=torch.Generator().manual_seed(h * w))
        r = int(h * w * 0.5)
        m, u = tm.bipartite_soft_matching_random2d(x, w, h, sx, sy, r, no_rand=True)
        part = reference.spatial_partition(h, w, sx, sy)
        match = reference.spatial_match(x, part, r)
        with torch.no_grad():
            want = u(layer(m(x, mode="mean")))
            got = reference.spatial_unmerge(layer(reference.spatial_merge(x, match, part, "mean")), match, part)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_sdxl_merges_at_its_highest_attention_by_default_and_a_setting_that_patches_nothing_is_refused():
    # tomesd's trap: max_downsample=1 reaches no block of SDXL (no attention at full resolution): no speed-up,
    # silently. Our default is the highest resolution that has attention, and the plan says so.
    model = unet("sdxl")
    tp.diffusers(model, ratio=0.5)
    assert tp.settings(model)["max_downsample"] == 2
    plan = tp.plan(model, 16 * 16)
    assert [p.mode is not None for p in plan] == [p.downsample == 2 for p in plan] and plan[0].downsample == 2
    assert {(p.tokens, p.r) for p in plan if p.mode} == {(64, 32)}  # an 8x8 grid at 1/2 of a 16x16 latent
    tp.unpatch(model)
    with pytest.raises(ValueError, match="max_downsample=1 reaches no transformer block.*use max_downsample=2"):
        tp.diffusers(model, ratio=0.5, max_downsample=1)
    assert not tp.is_patched(model)
    with pytest.raises(ValueError, match="nothing would merge"):
        tp.diffusers(model, merge_attn=False)


def test_plan_follows_the_latent_size():
    model = tp.diffusers(unet("sd15"), ratio=0.5)  # blocks at 1x, 2x, 4x, 8x below the latent
    by_factor = {p.downsample: (p.tokens, p.r) for p in tp.plan(model, (24, 40)) if p.mode}
    assert by_factor == {1: (960, 480)}
    model.max_downsample = 8
    by_factor = {p.downsample: (p.tokens, p.r) for p in tp.plan(model, (24, 40))}
    assert by_factor == {1: (960, 480), 2: (240, 120), 4: (60, 30), 8: (15, 7)}
    assert [p.tokens for p in tp.plan(model)][:2] == [16 * 16] * 2  # default: the configured sample_size
    assert [p.tokens for p in tp.plan(model, 64)][:2] == [64] * 2


def test_patching_a_patched_unet_takes_the_new_settings():
    model, args = unet("sd15"), inputs("sd15", side=8)
    want = run(tp.diffusers(unet("sd15"), ratio=0.3, mode="tome", seed=1), args)
    tp.diffusers(model, ratio=0.5, seed=1)
    tp.diffusers(model, ratio=0.3, mode="tome", seed=1)  # was a TypeError ("block 0 ... with its own forward")
    assert torch.equal(run(model, args), want)
    model.ratio = 0.5
    with tp.patched(model, ratio=0.3, mode="tome", seed=1):
        assert torch.equal(run(model, args), want)
    assert tp.settings(model)["ratio"] == 0.5


@pytest.mark.parametrize("name, value, err", [("ratio", 1.5, ValueError), ("ratio", -0.1, ValueError),
                                              ("ratio", 2.0, ValueError), ("sx", 0, ValueError),
                                              ("prop_attn", True, ValueError), ("merge_mlp", None, TypeError)])
def test_settings_are_checked_at_each_call(name, value, err):
    model, args = tp.diffusers(unet("sd15"), ratio=0.5), inputs("sd15", side=8)
    setattr(model, name, value)  # set between calls, as users do
    with pytest.raises(err, match=name):
        run(model, args)


def test_todo_pools_self_attention_keys_and_values_over_the_grid():
    model, args = unet("sd15"), inputs("sd15", side=8)
    tp.diffusers(model, ratio=0.5, mode="todo")  # 2x2 cells: a quarter of the keys
    first = next(m for m in model.modules() if type(m).__name__ == "TofuBasicTransformerBlock")
    seen = {}
    first.register_forward_hook(lambda m, a, kw, out: seen.update(x=a[0], kw=kw, out=out), with_kwargs=True)
    run(model, args)
    x, kw, a = seen["x"], seen["kw"], first.attn1
    with torch.no_grad():  # the block restated, with self-attention's keys and values averaged over 2x2 cells
        def pooled(t):
            return torch.nn.functional.avg_pool2d(t.unflatten(1, (8, 8)).permute(0, 3, 1, 2), 2).flatten(2).mT

        norm = first.norm1(x)
        q, k, v = (t.unflatten(-1, (a.heads, -1)).transpose(1, 2) for t in (a.to_q(norm), pooled(a.to_k(norm)),
                                                                             pooled(a.to_v(norm))))
        attn = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        h = x + a.to_out[0](attn)
        h = h + first.attn2(first.norm2(h), encoder_hidden_states=kw["encoder_hidden_states"])
        want = h + first.ff(first.norm3(h))
    torch.testing.assert_close(seen["out"], want, rtol=1e-5, atol=1e-5)
    assert [p.r for p in tp.plan(model, 8 * 8) if p.mode] == [64 - 16] * 5


def test_published_sd15_layout_plans_the_highest_resolution_blocks():
    with torch.device("meta"):  # the full SD 1.5 config: 860M parameters, never allocated
        model = UNet2DConditionModel(**SD15, block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                                     attention_head_dim=8, sample_size=64)
    tp.diffusers(model, ratio=0.5, mode="tofu")
    plan = tp.plan(model)
    assert [p.downsample for p in plan] == [1, 1, 2, 2, 4, 4, 8, 4, 4, 4, 2, 2, 2, 1, 1, 1]
    assert [p.mode for p in plan if p.mode] == ["prune", "prune", "mlerp", "mlerp", "mlerp"]  # 5 blocks at 1x
    model.max_downsample = 2
    assert sum(p.mode is not None for p in tp.plan(model)) == 10


@pytest.mark.parametrize("mode", ["tofu", "mlerp", "prune"])
def test_every_mode_runs_and_differs(mode):
    model, args = unet("sd15"), inputs("sd15")
    tp.diffusers(model, ratio=0.5, mode="tome", use_rand=False)
    tome = run(model, args)
    model.tofu_mode = mode
    out = run(model, args)
    assert out.shape == tome.shape and torch.isfinite(out).all()
    assert (out - tome).abs().max() > 1e-4


def test_random_destinations_are_seeded_and_shared_by_the_batch():
    model, args = unet("sd15"), inputs("sd15", batch=2)
    tp.diffusers(model, ratio=0.5, mode="tome", use_rand=True, seed=7)
    first, again = run(model, args), run(model, args)
    assert torch.equal(first, again)  # no hidden generator state between calls
    model.seed = 8
    assert (run(model, args) - first).abs().max() > 1e-5
    model.seed = 7
    twice = dict(args, sample=args["sample"][:1].repeat(2, 1, 1, 1),
                 encoder_hidden_states=args["encoder_hidden_states"][:1].repeat(2, 1, 1))
    out = run(model, twice)
    assert torch.equal(out[0], out[1])  # one choice of destinations for every image of the batch


def test_cell_choice_is_a_uniform_counter_based_hash():
    step = torch.tensor(123)
    a = cell_choice(5, step, 2, (32, 32), 4)
    assert a.shape == (32, 32) and a.min() >= 0 and a.max() <= 3
    assert torch.equal(a, cell_choice(5, step, 2, (32, 32), 4))
    for other in (cell_choice(6, step, 2, (32, 32), 4), cell_choice(5, torch.tensor(124), 2, (32, 32), 4),
                  cell_choice(5, step, 3, (32, 32), 4)):
        assert (other != a).float().mean() > 0.5
    counts = torch.bincount(a.flatten(), minlength=4).float()
    assert ((counts - 256) ** 2 / 256).sum() < 16.3  # chi-square, 3 degrees of freedom, p = 0.001


def test_latent_size_travels_with_each_call_across_threads():
    model = tp.diffusers(unet("sd15"), ratio=0.5, mode="tofu", seed=1)
    jobs = [inputs("sd15", side=side, seed=side) for side in (16, 24, 32, 16)]
    expected = [run(model, args) for args in jobs]
    results = run_in_threads(lambda args: run(model, args), jobs, repeats=2)
    assert all(torch.equal(a, b) for a, b in zip(results, expected))


def test_ratio_can_change_between_calls_and_pipelines_work():
    class Pipeline(torch.nn.Module):  # what matters of a diffusers pipeline: its .unet
        def __init__(self):
            super().__init__()
            self.unet = unet("sd15")

    pipe, args = Pipeline(), inputs("sd15")
    reference_out = run(copy.deepcopy(pipe.unet), args)
    assert tp.diffusers(pipe, ratio=0.3) is pipe and tp.is_patched(pipe)
    merged = run(pipe.unet, args)
    pipe.unet.ratio = 0.0
    assert torch.equal(run(pipe.unet, args), reference_out)
    pipe.unet.ratio = 0.3
    assert torch.equal(run(pipe.unet, args), merged)
    tp.unpatch(pipe)
    assert not tp.is_patched(pipe) and type(pipe.unet) is UNet2DConditionModel
    assert all(type(m).__name__ == "BasicTransformerBlock" for m in pipe.unet.modules() if "Transformer" in
               type(m).__name__ and "Block" in type(m).__name__)
    assert not any("_tofu_layer" in vars(m) for m in pipe.unet.modules())  # structural attributes removed too
    assert torch.equal(run(pipe.unet, args), reference_out)


@pytest.mark.parametrize("kwargs", [dict(mode="tofu", use_rand=True), dict(mode="tome", merge_crossattn=True,
                                                                       merge_mlp=True, ratio=0.7, sx=3)])
def test_fused_kernels_match_the_reference_in_a_unet(kwargs, monkeypatch, device):
    # The whole patched UNet on the Triton kernels (the interpreter on a CPU) against the reference backend.
    from tofu_triton.kernels import partition, unmerge

    calls = count_calls(monkeypatch, [partition, unmerge], ["spatial_partition", "spatial_unmerge"])
    model, args = unet("sd15").to(device), {k: v.to(device) for k, v in inputs("sd15", side=8).items()}
    settings = dict(dict(ratio=0.5, seed=3), **kwargs)
    want = run(tp.diffusers(copy.deepcopy(model), backend="reference", **settings), args)
    got = run(tp.diffusers(model, backend="triton", **settings), args)
    merges = 3 if kwargs.get("merge_mlp") else 1
    patched = sum(p.mode is not None for p in tp.plan(model))
    assert calls == {"spatial_partition": patched, "spatial_unmerge": merges * patched}
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    model, args = tp.diffusers(unet("sd15"), ratio=0.5, seed=2), inputs("sd15")
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        out = compiled(args["sample"], **{k: v for k, v in args.items() if k != "sample"}).sample
    torch.testing.assert_close(out, run(model, args), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(ratio=1.0), ValueError, "ratio must be a number in"),
    (dict(mode="fast"), ValueError, "mode must be one of"),
    (dict(max_downsample=3), ValueError, "max_downsample"),
    (dict(sx=0), ValueError, "sx must be"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
    (dict(use_rand="yes"), TypeError, "use_rand"),
])
def test_bad_settings_are_refused_and_leave_the_model_as_it_was(kwargs, err, match):
    model = unet("sd15")
    with pytest.raises(err, match=match):
        tp.diffusers(model, **kwargs)
    assert not tp.is_patched(model)
    assert all(type(m).__name__ in ("UNet2DConditionModel",) or not type(m).__name__.startswith("Tofu")
               for m in model.modules())


def test_models_that_cannot_be_patched():
    with pytest.raises(TypeError, match="UNet2DConditionModel"):
        tp.diffusers(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="no transformer blocks"):
        tp.diffusers(UNet2DConditionModel(down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                                          block_out_channels=(32, 32), norm_num_groups=8, mid_block_type=None))


def test_step_reuse_computes_one_plan_per_resolution(monkeypatch):
    # SD 1.5 layout, blocks at 1/1 and 1/2 of the latent: one match per resolution per call instead of one per
    # block; the later blocks of a resolution merge with its first block's plan, so the result changes.
    from tofu_triton import ops

    matches = []
    real = ops.spatial_match
    monkeypatch.setattr(ops, "spatial_match", lambda x, *a, **k: matches.append(x.shape[1]) or real(x, *a, **k))
    model, args = unet("sd15"), inputs("sd15")
    unpatched = run(model, args)
    tp.diffusers(model, ratio=0.5, max_downsample=2, seed=0)
    per_block = run(model, args)
    assert sorted(matches) == [64] * 5 + [256] * 5  # 2 down + 3 up blocks at 16x16, the same at 8x8
    matches.clear()
    model.plan_reuse = "step"
    shared = run(model, args)
    assert sorted(matches) == [64, 256]
    assert (shared - per_block).abs().max() > 1e-4
    for whole in (False, True):
        model.whole_block = whole
        model.ratio = 0.0
        assert torch.equal(run(model, args), unpatched)
        model.ratio = 0.5
        assert (run(model, args) - unpatched).abs().max() > 1e-3
