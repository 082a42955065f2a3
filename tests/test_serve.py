"""The Ray Serve deployment (tofu_triton.serve) on a local Ray instance: real HTTP on 127.0.0.1."""
import importlib.util
import io
import json
import os
import socket
import subprocess
import sys
import types
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

serve = pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install -e \".[serve]\")")
import ray  # noqa: E402

import tofu_triton.patch as tp  # noqa: E402
from tofu_triton.models import create_vit  # noqa: E402
from tofu_triton.serve import TENSOR_TYPE, BadRequest, build_app, decode_request  # noqa: E402

REQUESTS, CONCURRENCY, DEADLINE_S = 64, 8, 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url, body: bytes, headers=None):
    req = urllib.request.Request(url, data=body, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=DEADLINE_S) as res:
            return res.status, json.loads(res.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _tensor_request(x: torch.Tensor, dtype="float32"):
    headers = {"Content-Type": TENSOR_TYPE, "X-Shape": ",".join(map(str, x.shape)), "X-Dtype": dtype}
    return x.to(getattr(torch, dtype)).contiguous().numpy().tobytes(), headers


@pytest.fixture(scope="module")
def server():
    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app("smoke", tokens=2, mode="tofu", replicas=2, cpus_per_replica=0.5, max_batch=8),
                  route_prefix="/")
        yield f"http://127.0.0.1:{port}/"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_concurrent_requests_get_what_the_model_computes(server):
    model = tp.timm(create_vit("smoke"), r=2, mode="tofu")
    images = torch.randn(REQUESTS, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(images)
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        answers = list(pool.map(lambda x: _post(server, *_tensor_request(x)), images, timeout=DEADLINE_S))
    for (status, body), want in zip(answers, expected):
        assert status == 200, body
        torch.testing.assert_close(torch.tensor(body["logits"]), want, rtol=1e-4, atol=1e-5)
        assert body["top5"][0][0] == int(want.argmax())


def test_bad_requests_get_400_and_the_server_keeps_serving(server):
    x = torch.randn(3, 64, 64)
    body, headers = _tensor_request(x)
    bad = [
        (b"\x00garbage bytes", {}, "not an image file"),
        (b"", {}, "empty body"),
        (*_tensor_request(torch.randn(3, 32, 32)), "X-Shape must be 3,64,64"),
        (body, dict(headers, **{"X-Dtype": "int8"}), "X-Dtype must be one of"),
        (body[:-4], headers, "the body has"),
        (body, dict(headers, **{"X-Shape": "three"}), "X-Shape must be '3,H,W'"),
    ]
    for payload, hdrs, message in bad:
        status, answer = _post(server, payload, hdrs)
        assert status == 400 and message in answer["error"], (status, answer)
    status, answer = _post(server, body, headers)
    assert status == 200 and len(answer["logits"]) == 1000  # the smoke preset keeps timm's 1000 classes


def test_image_files_are_decoded_with_the_models_transform(server):
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    pixels = (torch.rand(80, 72, 3, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    status, answer = _post(server, buf.getvalue(), {"Content-Type": "image/png"})
    assert status == 200
    model = tp.timm(create_vit("smoke"), r=2, mode="tofu")
    transform = create_transform(**resolve_data_config({"input_size": (3, 64, 64)}, model=model))
    with torch.no_grad():
        want = model(transform(Image.fromarray(pixels))[None])[0]
    torch.testing.assert_close(torch.tensor(answer["logits"]), want, rtol=1e-4, atol=1e-5)


def test_decode_request_checks_without_a_server():
    transform = lambda image: torch.zeros(3, 8, 8)  # noqa: E731
    body, headers = _tensor_request(torch.ones(3, 8, 8), "float16")
    assert torch.equal(decode_request(headers, body, 8, transform), torch.ones(3, 8, 8))
    nan, headers = _tensor_request(torch.full((3, 8, 8), float("nan")))
    with pytest.raises(BadRequest, match="NaN"):
        decode_request(headers, nan, 8, transform)


EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "ray_serve_vit.py"


@pytest.mark.parametrize("argv, message", [
    (["--model", "vit_nope"], "unknown model 'vit_nope'"),
    # Offline with an empty cache: refused before Ray starts, where replicas would retry the download forever.
    (["--model", "vit_tiny_patch16_224", "--pretrained"], "not in the local cache and HF_HUB_OFFLINE is set"),
])
def test_example_script_refuses_in_one_line(argv, message, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, str(EXAMPLE), *argv], capture_output=True, text=True, timeout=120,
                          env=env)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert message in done.stderr.strip().splitlines()[-1]


def test_example_script_stops_on_ctrl_c_without_a_traceback(monkeypatch, capsys):
    # Ray stands in as fakes: serve.run raises what Ctrl-C raises in a real blocking run.
    spec = importlib.util.spec_from_file_location("ray_serve_vit", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    calls = []

    def interrupted(app, **kwargs):
        calls.append("run")
        raise KeyboardInterrupt

    fake_serve = types.ModuleType("ray.serve")
    fake_serve.start = lambda **kwargs: calls.append("start")
    fake_serve.run = interrupted
    fake_serve.shutdown = lambda: calls.append("shutdown")
    fake_ray = types.ModuleType("ray")
    fake_ray.init, fake_ray.serve = (lambda address=None: calls.append("init")), fake_serve
    monkeypatch.setitem(sys.modules, "ray", fake_ray)
    monkeypatch.setitem(sys.modules, "ray.serve", fake_serve)
    monkeypatch.setattr(example, "build_app", lambda *args, **kwargs: "app")
    assert example.main(["--model", "smoke"]) == 0
    assert calls == ["init", "start", "run", "shutdown"]
    assert capsys.readouterr().err == "stopping the server (Ctrl-C)\n"
