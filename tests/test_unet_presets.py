"""tofu_triton.models' Stable Diffusion UNet presets: the published SD 1.5 / SDXL configs, the tiny CPU ones,
and the inputs of one denoising step. Random weights; nothing downloads."""
import pytest
import torch

pytest.importorskip("diffusers", reason="diffusers is not installed (pip install -e \".[test]\")")

from tofu_triton.models import (  # noqa: E402
    UNET_PRESETS, attention_downsample, create_unet, latent_multiple, unet_config, unet_inputs, unet_step,
)


@pytest.mark.parametrize("name, params, blocks", [("sd15", 859_520_964, 16), ("sdxl", 2_567_463_684, 70)])
def test_published_configs_have_the_published_size(name, params, blocks):
    model = create_unet(name, device="meta")  # shapes only: nothing is allocated
    assert sum(p.numel() for p in model.parameters()) == params
    assert sum(type(m).__name__ == "BasicTransformerBlock" for m in model.modules()) == blocks
    side = model.config.sample_size  # 64 (512 px) and 128 (1024 px)
    out = unet_step(model, unet_inputs(model, batch=2, size=side, device="meta"))
    assert out.shape == (2, 4, side, side)


def test_inputs_of_a_step():
    sd, xl = create_unet("tiny"), create_unet("tiny-xl")
    a = unet_inputs(sd, batch=3, size=16, seed=4)
    assert a["sample"].shape == (3, 4, 16, 16) and a["encoder_hidden_states"].shape == (3, 77, 32)
    assert a["timestep"].tolist() == [500] * 3 and "added_cond_kwargs" not in a
    b = unet_inputs(xl, batch=2, size=16, dtype=torch.float64)
    cond = b["added_cond_kwargs"]
    assert cond["text_embeds"].shape == (2, 32) and cond["text_embeds"].dtype == torch.float64
    assert cond["time_ids"].tolist() == [[128, 128, 0, 0, 128, 128]] * 2  # 8x the latent: pixels
    assert torch.equal(unet_inputs(sd, 3, 16, seed=4)["sample"], a["sample"])
    with torch.no_grad():  # SDXL's added conditioning fits the model
        assert unet_step(xl, unet_inputs(xl, batch=2, size=16)).shape == (2, 4, 16, 16)


def test_builds_are_seeded_and_leave_the_global_rng_alone():
    state = torch.get_rng_state()
    a, b, c = create_unet("tiny", seed=1), create_unet("tiny", seed=1), create_unet("tiny", seed=2)
    assert torch.equal(torch.get_rng_state(), state)
    pa, pb, pc = (torch.nn.utils.parameters_to_vector(m.parameters()) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    half = create_unet("tiny", seed=1, dtype=torch.float16)
    assert not half.training and all(p.dtype == torch.float16 for p in half.parameters())


def test_layout_helpers_and_unknown_names():
    assert set(UNET_PRESETS) == {"tiny", "tiny-xl", "sd15", "sdxl"}
    assert [latent_multiple(n) for n in ("tiny", "sd15", "tiny-xl", "sdxl")] == [8, 8, 4, 4]
    assert [attention_downsample(n) for n in ("tiny", "sd15", "tiny-xl", "sdxl")] == [1, 1, 2, 2]
    unet_config("sd15")["cross_attention_dim"] = 0  # a copy
    assert UNET_PRESETS["sd15"]["cross_attention_dim"] == 768
    with pytest.raises(ValueError, match="unknown UNet preset 'sd3'.*tiny, tiny-xl, sd15, sdxl"):
        create_unet("sd3")
