"""The shared patch lifecycle (tofu_triton.patch.lifecycle), the same tests for every family."""
import copy
import pickle
import subprocess
import sys
import warnings

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import tofu_triton.patch as tp

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")
from transformers import BertConfig, BertModel, CLIPVisionConfig, CLIPVisionModel  # noqa: E402
from transformers import Dinov2Config, Dinov2Model, ViTConfig, ViTForImageClassification  # noqa: E402
from transformers import SiglipVisionConfig, SiglipVisionModel  # noqa: E402


def _images(batch=2):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def _timm():
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=10)
    return model.eval(), dict(x=_images())


def _bert():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32)
    ids = torch.randint(5, 50, (2, 20), generator=torch.Generator().manual_seed(4))
    return BertModel(cfg).eval(), dict(input_ids=ids)


_VISION = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
               intermediate_size=64)


def _vit_classifier():
    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(**_VISION, num_labels=5)).eval(), dict(pixel_values=_images())


def _clip():
    torch.manual_seed(0)
    return CLIPVisionModel(CLIPVisionConfig(**_VISION)).eval(), dict(pixel_values=_images())


def _dinov2():
    torch.manual_seed(0)
    return Dinov2Model(Dinov2Config(**_VISION)).eval(), dict(pixel_values=_images())


def _siglip():
    torch.manual_seed(0)
    return SiglipVisionModel(SiglipVisionConfig(**_VISION)).eval(), dict(pixel_values=_images())


def _eva02():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                              depth=4, num_heads=2, num_classes=10)
    return model.eval(), dict(x=_images())


# family name, builder, patch function, tokens entering the first layer
FAMILIES = {
    "timm": (_timm, tp.timm, 17),
    "bert": (_bert, tp.transformers, 20),
    "vit_classifier": (_vit_classifier, tp.transformers, 17),
    "clip": (_clip, tp.transformers, 17),
    "dinov2": (_dinov2, tp.transformers, 17),
    "siglip": (_siglip, tp.transformers, 16),
    "eva02": (_eva02, tp.timm, 17),
}


def _output(model, inputs):
    with torch.no_grad():
        out = model(**inputs) if "x" not in inputs else model(inputs["x"])
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture(params=list(FAMILIES))
def family(request):
    build, patch, n_tokens = FAMILIES[request.param]
    model, inputs = build()
    return model, inputs, patch, n_tokens


def test_patch_then_unpatch_restores_the_model(family):
    model, inputs, patch, _ = family
    original_types = {name: type(m) for name, m in model.named_modules()}
    keys = set(model.state_dict())
    expected = _output(model, inputs)
    assert not tp.is_patched(model)
    assert patch(model, r=2, mode="tofu") is model
    assert tp.is_patched(model)
    assert set(model.state_dict()) == keys
    assert _output(model, inputs).shape[-1] == expected.shape[-1]
    assert tp.unpatch(model) is model
    assert not tp.is_patched(model)
    assert {name: type(m) for name, m in model.named_modules()} == original_types
    assert all("r" not in vars(m) and "tofu_mode" not in vars(m) for m in model.modules())
    assert torch.equal(_output(model, inputs), expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tp.unpatch(model) is model  # a no-op on an unpatched model, on purpose and without a warning
    assert {name: type(m) for name, m in model.named_modules()} == original_types


def test_plan_and_settings(family):
    model, inputs, patch, n_tokens = family
    patch(model, r=[3, 2], mode="tome")
    steps = tp.plan(model, n_tokens)
    assert [s.r for s in steps] == [3, 2, 0, 0] and steps[0].n_in == n_tokens
    assert [s.mode for s in steps] == ["mean"] * 4
    assert tp.settings(model)["r"] == [3, 2] and tp.settings(model)["tofu_mode"] == "tome"
    if "input_ids" not in inputs:  # vision models know their own input size
        assert tp.plan(model) == steps


def test_repatch_updates_settings_and_rolls_back_bad_ones(family):
    model, inputs, patch, _ = family
    patch(model, r=2, mode="tome")
    cls = type(tp.lifecycle.patched_module(model))
    patch(model, r=1, mode="prune")
    assert type(tp.lifecycle.patched_module(model)) is cls  # no second class swap
    assert tp.settings(model)["r"] == 1
    with pytest.raises(ValueError, match="mode must be one of"):
        patch(model, r=3, mode="fast")
    assert tp.settings(model)["r"] == 1 and tp.settings(model)["tofu_mode"] == "prune"
    tp.unpatch(model)
    with pytest.raises(ValueError, match="r must be >= 0"):
        patch(model, r=-1)
    assert not tp.is_patched(model)
    assert all("r" not in vars(m) for m in model.modules())  # nothing half-done


def test_patched_context_manager(family):
    model, inputs, patch, _ = family
    expected = _output(model, inputs)
    with tp.patched(model, r=2, mode="tome") as m:
        assert m is model and tp.is_patched(model)
    assert not tp.is_patched(model) and torch.equal(_output(model, inputs), expected)
    patch(model, r=1, mode="prune")
    with tp.patched(model, r=3, mode="mlerp"):
        assert tp.settings(model)["r"] == 3
    assert tp.settings(model)["r"] == 1 and tp.settings(model)["tofu_mode"] == "prune"


def test_pickle_and_deepcopy(family):
    model, inputs, patch, _ = family
    patch(model, r=2, mode="tofu")
    expected = _output(model, inputs)
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert tp.is_patched(clone) and torch.equal(_output(clone, inputs), expected)


def test_mistyped_settings_are_refused_and_other_attributes_set(family):
    model, inputs, patch, _ = family
    patch(model, r=2, mode="tome")
    target = tp.lifecycle.patched_module(model)
    before = dict(tp.settings(model))
    # a typo, a patch() argument without its tofu_ prefix, a setting in another case, an unknown tofu_ name
    for name, meant in [("tofu_mdoe", "'tofu_mode'"), ("mode", "'tofu_mode'"), ("R", "'r'"),
                        ("tofu_speed", "the settings are r, tofu_mode")]:
        with pytest.raises(AttributeError, match=f"^'{name}' is not a setting of this patched .*; .*{meant}"):
            setattr(target, name, 1)
        assert name not in vars(target)
    assert tp.settings(model) == before
    target.r = 1  # settings, ordinary attributes, submodules and parameters set as on any module
    target.my_label = "cat"
    target.extra = torch.nn.Linear(2, 2)
    target.scale = torch.nn.Parameter(torch.ones(1))
    assert tp.settings(model)["r"] == 1 and target.my_label == "cat"
    assert "extra.weight" in dict(target.named_parameters()) and "scale" in dict(target.named_parameters())
    tp.unpatch(model)
    target.tofu_speed = 1  # unpatched: nothing is refused


def test_mistyped_unet_ratio_is_refused():
    from test_patch_diffusers import inputs, run, unet

    model = unet("sd15")
    unpatched = run(model, inputs("sd15"))
    model.mode = "mine"  # an attribute of the user's, set before patching, stays settable
    tp.diffusers(model, ratio=0.5, mode="tome", use_rand=False)
    with pytest.raises(AttributeError, match="did you mean 'ratio'"):
        model.rato = 0.0
    with pytest.raises(AttributeError, match="did you mean 'tofu_backend'"):
        model.backend = "reference"
    model.mode = "still mine"
    assert not torch.equal(run(model, inputs("sd15")), unpatched)
    model.ratio = 0.0  # the real setting takes effect: ratio 0 is bitwise the unpatched UNet
    assert torch.equal(run(model, inputs("sd15")), unpatched)


def test_unpatched_models_are_refused_by_introspection():
    model, _ = _timm()
    with pytest.raises(TypeError, match="not patched"):
        tp.plan(model)
    with pytest.raises(TypeError, match="not patched"):
        tp.settings(model)
    with pytest.raises(TypeError, match="no tofu_triton.patch family"):
        with tp.patched(torch.nn.Linear(2, 2), r=1):
            pass


def test_text_model_plan_needs_a_length():
    model, _ = _bert()
    tp.transformers(model, r=2)
    with pytest.raises(ValueError, match="n_tokens"):
        tp.plan(model)


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_family_functions_survive_importing_their_modules():
    # Importing a submodule binds it on the package: the family modules' names must differ from the calls'.
    proc = _run("import tofu_triton.patch as tp\n"
                "import tofu_triton.patch.transformers_models\n"
                "from tofu_triton.patch.timm_models import block_forward\n"
                "assert callable(tp.transformers) and callable(tp.timm), (tp.transformers, tp.timm)\n"
                "assert tp.transformers.__module__ == 'tofu_triton.patch'\n")
    assert proc.returncode == 0, proc.stderr


def test_missing_optional_dependency_says_what_to_install():
    proc = _run("import sys; sys.modules['transformers'] = None\n"
                "import torch, tofu_triton.patch as tp\n"
                "tp.transformers(torch.nn.Linear(2, 2))\n")
    assert proc.returncode != 0
    assert 'pip install "tofu-triton[hf]"' in proc.stderr.splitlines()[-1]
