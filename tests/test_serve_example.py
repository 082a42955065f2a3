"""examples/ray_serve_vit.py and tofu_triton.serve's request checks, without Ray: what a user sees before a
server starts (tests/test_serve.py runs the server itself, when Ray Serve is installed)."""
import importlib.util
import io
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tofu_triton.serve import BadRequest, decode_request

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "ray_serve_vit.py"


def _example():
    spec = importlib.util.spec_from_file_location("ray_serve_vit", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


def test_example_without_ray_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(SystemExit) as e:
        _example().main(["--model", "smoke"])
    # A SystemExit with a message: Python prints it alone on stderr and exits with 1.
    assert str(e.value) == 'this example needs Ray Serve (ray is not installed): pip install "tofu-triton[serve]"'


@pytest.mark.parametrize("argv, message", [
    (["--tokens", "-4"], "--tokens must be >= 0"),
    (["--replicas", "0"], "--replicas must be >= 1"),
    (["--port", "70000"], "--port must be in 1..65535"),
])
def test_example_checks_arguments_before_ray(argv, message, monkeypatch, capsys):
    example = _example()
    # Importing Ray fails here: an argument checked after it would end in the install hint, with code 1.
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(SystemExit) as e:
        example.main(["--model", "smoke", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err.strip().splitlines()[-1]


def test_bad_image_bodies_say_what_was_expected():
    for body in (b"\x00garbage bytes", b"GIF89a"):
        with pytest.raises(BadRequest) as e:
            decode_request({"Content-Type": "image/png"}, body, 64, transform=None)
        message = str(e.value)
        assert "0x" not in message and "BytesIO" not in message and " a application" not in message
        assert message == ("the body is not an image file PIL can read (PNG, JPEG, ...) and its Content-Type is not "
                           "application/x-tensor: send an image file, or a raw tensor with Content-Type: "
                           "application/x-tensor, X-Shape: 3,64,64 and X-Dtype (one of bfloat16, float16, float32)")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
    with pytest.raises(BadRequest, match=r"^the body is a damaged image file \(.*truncated.*\): send an image file"):
        decode_request({}, buf.getvalue()[:200], 64, transform=None)
