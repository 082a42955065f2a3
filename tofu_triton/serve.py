"""A Ray Serve deployment of a ToFu-patched timm ViT: dynamic batching, any number of replicas.

Run it with ``examples/ray_serve_vit.py``; ``build_app`` returns the application for
``serve.run`` (``pip install -e ".[serve]"`` for Ray Serve).

Requests: ``POST /`` with either

* an image file (PNG, JPEG, ...; any ``Content-Type`` but the one below): decoded, resized and
  normalised with the model's own timm evaluation transform; or
* a raw tensor: ``Content-Type: application/x-tensor``, headers ``X-Shape: 3,H,W`` and
  ``X-Dtype: float32`` (or ``float16``), the body its bytes in C order, already normalised, at the
  model's input size.

The answer is JSON: ``{"top5": [[class, probability], ...], "logits": [...]}``. A request that
cannot be served (garbage bytes, wrong shape, unknown dtype, empty body) gets ``400`` with
``{"error": "..."}`` and the replica keeps serving. Concurrent requests are batched by
``@serve.batch`` (up to ``--max-batch`` per forward), so each forward of the patched model sees a
real batch, which is where token reduction pays off.
"""
import io
from typing import Dict, List, Optional

import torch

TENSOR_TYPE = "application/x-tensor"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class BadRequest(ValueError):
    """A request the server cannot answer; its message goes back with status 400."""


def decode_request(headers: Dict[str, str], body: bytes, input_size: int, transform) -> torch.Tensor:
    """The [3, input_size, input_size] float32 tensor a request carries, or BadRequest saying why not."""
    if not body:
        raise BadRequest("empty body: send an image file or a raw tensor")
    headers = {k.lower(): v for k, v in headers.items()}
    if headers.get("content-type", "").split(";")[0].strip() == TENSOR_TYPE:
        dtype_name = headers.get("x-dtype", "float32")
        if dtype_name not in DTYPES:
            raise BadRequest(f"X-Dtype must be one of {sorted(DTYPES)}, got {dtype_name!r}")
        try:
            shape = tuple(int(v) for v in headers.get("x-shape", "").split(","))
        except ValueError:
            raise BadRequest(f"X-Shape must be '3,H,W', got {headers.get('x-shape')!r}") from None
        want = (3, input_size, input_size)
        if shape != want:
            raise BadRequest(f"X-Shape must be {','.join(map(str, want))} for this model, got {shape}")
        dtype = DTYPES[dtype_name]
        expected = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        if len(body) != expected:
            raise BadRequest(f"a {dtype_name} tensor of shape {shape} has {expected} bytes, the body has {len(body)}")
        tensor = torch.frombuffer(bytearray(body), dtype=dtype).reshape(shape).float()
        if not torch.isfinite(tensor).all():
            raise BadRequest("the tensor has NaN or inf values")
        return tensor
    from PIL import Image, UnidentifiedImageError

    expected = (f"send an image file, or a raw tensor with Content-Type: {TENSOR_TYPE}, X-Shape: "
                f"3,{input_size},{input_size} and X-Dtype (one of {', '.join(sorted(DTYPES))})")
    try:
        image = Image.open(io.BytesIO(body)).convert("RGB")
    except UnidentifiedImageError:  # its message names the in-memory buffer, which tells the client nothing
        raise BadRequest(f"the body is not an image file PIL can read (PNG, JPEG, ...) and its Content-Type is not "
                         f"{TENSOR_TYPE}: {expected}") from None
    except OSError as e:  # an image file PIL knows, but damaged: truncated, bad data
        raise BadRequest(f"the body is a damaged image file ({e}): {expected}") from None
    return transform(image)


def top5(logits: torch.Tensor) -> List[List[float]]:
    probs = logits.float().softmax(-1)
    values, indices = probs.topk(min(5, probs.shape[-1]))
    return [[int(i), float(v)] for i, v in zip(indices, values)]


def build_app(model: str = "vit_base_patch16_224", tokens: int = 16, mode: str = "tofu", replicas: int = 1,
              pretrained: bool = False, seed: int = 0, checkpoint: Optional[str] = None, dtype: str = "auto",
              max_batch: int = 16, gpus_per_replica: Optional[float] = None, cpus_per_replica: float = 1.0):
    """A Ray Serve application of one patched ViT deployment (``mode="none"`` serves it unpatched)."""
    from ray import serve
    from starlette.responses import JSONResponse

    @serve.deployment
    class ViT:
        def __init__(self):
            import tofu_triton.patch as tp
            from tofu_triton.models import create_vit, load_weights

            self.device = "cuda" if torch.cuda.is_available() else "cpu"
            if self.device == "cpu":
                torch.set_num_threads(max(1, int(cpus_per_replica)))  # one replica must not take every core
            net = create_vit(model, pretrained=pretrained, seed=seed)
            if checkpoint:
                load_weights(net, checkpoint)
            use = DTYPES.get(dtype, torch.float16 if self.device == "cuda" else torch.float32)
            self.dtype = use
            self.model = net.to(self.device, use)
            if mode != "none":
                tp.timm(self.model, r=tokens, mode=mode)
            from timm.data import create_transform, resolve_data_config

            self.input_size = self.model.patch_embed.img_size[0]
            cfg = resolve_data_config({"input_size": (3, self.input_size, self.input_size)}, model=self.model)
            self.transform = create_transform(**cfg)

        @serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=0.005)
        async def infer(self, images: List[torch.Tensor]) -> List[torch.Tensor]:
            batch = torch.stack(images).to(self.device, self.dtype)
            with torch.inference_mode():
                return list(self.model(batch).float().cpu())

        async def __call__(self, request):
            try:
                image = decode_request(dict(request.headers), await request.body(), self.input_size, self.transform)
            except BadRequest as e:
                return JSONResponse({"error": str(e)}, status_code=400)
            logits = await self.infer(image)
            return JSONResponse({"top5": top5(logits), "logits": logits.tolist()})

    gpus = gpus_per_replica if gpus_per_replica is not None else (1.0 if torch.cuda.is_available() else 0.0)
    actor = {"num_gpus": gpus} if gpus > 0 else {"num_cpus": cpus_per_replica}
    return ViT.options(num_replicas=replicas, ray_actor_options=actor, max_ongoing_requests=4 * max_batch).bind()
