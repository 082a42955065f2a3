"""tofu_triton.models' diffusion transformer presets: the published PixArt-Sigma / SD3-medium / Flux.1-dev
configs, their tiny CPU layouts, and the inputs of one denoising step. Random weights; nothing downloads."""
import pytest
import torch

pytest.importorskip("diffusers", reason="diffusers is not installed (pip install -e \".[test]\")")

from tofu_triton.models import (  # noqa: E402
    DIT_PRESETS, attention_downsample, create_denoiser, create_transformer, denoiser_inputs, denoiser_step, is_dit,
    latent_multiple, transformer_inputs,
)


# Parameter counts of the published checkpoints (diffusion_pytorch_model safetensors of each repository).
@pytest.mark.parametrize("name, params, blocks, out_shape", [
    ("pixart-sigma", 610_856_096, {"BasicTransformerBlock": 28}, (2, 8, 128, 128)),
    ("sd3-medium", 2_028_328_000, {"JointTransformerBlock": 24}, (2, 16, 128, 128)),
    ("flux-dev", 11_901_408_320, {"FluxTransformerBlock": 19, "FluxSingleTransformerBlock": 38}, (2, 4096, 64)),
])
def test_published_configs_have_the_published_size(name, params, blocks, out_shape):
    model = create_transformer(name, device="meta")  # shapes only: nothing is allocated
    assert sum(p.numel() for p in model.parameters()) == params
    counts = {}
    for m in model.modules():
        if type(m).__name__ in blocks:
            counts[type(m).__name__] = counts.get(type(m).__name__, 0) + 1
    assert counts == blocks
    out = denoiser_step(model, transformer_inputs(model, batch=2, size=128, device="meta"))  # 1024 px
    assert out.shape == out_shape


def test_tiny_layouts_keep_every_block_and_run(one_thread):
    for name, published in (("tiny-pixart", "pixart-sigma"), ("tiny-sd3", "sd3-medium"), ("tiny-flux", "flux-dev")):
        full = create_transformer(published, device="meta")
        tiny = create_denoiser(name)
        assert DIT_PRESETS[name][0] == DIT_PRESETS[published][0]
        assert [type(m).__name__ for m in tiny.modules()] == [type(m).__name__ for m in full.modules()]
        assert sum(p.numel() for p in tiny.parameters()) < 6e6
    flux = create_transformer("tiny-flux")
    args = denoiser_inputs(flux, batch=1, size=8)
    with torch.no_grad():
        assert denoiser_step(flux, args).shape == (1, 16, 64)


def test_inputs_are_what_the_pipelines_pass():
    pixart, sd3, flux = (create_transformer(n, device="meta") for n in ("pixart-sigma", "sd3-medium", "flux-dev"))
    a = transformer_inputs(pixart, batch=2, size=16, device="meta")
    assert a["hidden_states"].shape == (2, 4, 16, 16) and a["encoder_hidden_states"].shape == (2, 300, 4096)
    b = transformer_inputs(sd3, batch=2, size=16, dtype=torch.float16)
    assert b["encoder_hidden_states"].shape == (2, 333, 4096) and b["pooled_projections"].shape == (2, 2048)
    assert b["hidden_states"].dtype == torch.float16 and b["timestep"].tolist() == [500.0, 500.0]
    c = transformer_inputs(flux, batch=1, size=6)
    assert c["hidden_states"].shape == (1, 9, 64) and c["img_ids"].tolist()[:4] == [[0, 0, 0], [0, 0, 1],
                                                                                    [0, 0, 2], [0, 1, 0]]
    assert c["txt_ids"].shape == (512, 3) and c["guidance"].tolist() == [3.5] and c["timestep"].tolist() == [0.5]
    # the packed tokens are the latent's 2x2 patches, row-major: token 1 is latent rows 0-1, columns 2-3
    latent = torch.randn(1, 16, 6, 6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(c["hidden_states"][0, 1].view(16, 2, 2), latent[0, :, 0:2, 2:4])
    with pytest.raises(ValueError, match="even"):
        transformer_inputs(flux, batch=1, size=7)


def test_preset_helpers():
    assert [is_dit(n) for n in ("tiny", "sdxl", "tiny-flux", "sd3-medium")] == [False, False, True, True]
    assert [latent_multiple(n) for n in ("tiny-pixart", "flux-dev")] == [2, 2]
    assert [attention_downsample(n) for n in ("tiny-sd3", "pixart-sigma")] == [1, 1]
    with pytest.raises(ValueError, match="unknown preset 'sd3'"):
        is_dit("sd3")
    with pytest.raises(ValueError, match="unknown transformer preset 'sd15'"):
        create_transformer("sd15")


def test_demo_sd_runs_a_transformer_preset(tmp_path, capsys, one_thread):
    from tofu_triton.__main__ import main

    argv = ["demo-sd", "--model", "tiny-pixart", "--device", "cpu", "--size", "8", "--batch", "1", "--iters", "1"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "tiny-pixart transformer" in out.splitlines()[0] and "on the 2x2 patch grid" in out.splitlines()[0]
    lines = {line.split()[0]: line for line in out.splitlines() if line.split()}
    assert lines["tomesd"].endswith("not applicable: tomesd patches UNets only")
    assert "merges in 28 of 28 transformer blocks" in lines["ToFu"]
    assert (tmp_path / "merge_sd.png").exists() and "only image tokens merge" in out
    with pytest.raises(SystemExit) as e:  # a UNet setting, refused for a transformer
        main([*argv, "--max-downsample", "2"])
    assert e.value.code == 2
