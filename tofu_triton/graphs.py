"""Serve a model from CUDA graphs, one per batch size (docs/design.md §3.4).

At small batch a GPU forward is bound by the host: Python, dispatch and
kernel launches take longer than the kernels. Replaying a captured CUDA
graph costs one launch whatever the model does, so a server that keeps a
graph per batch size pays the host cost once, at capture::

    runner = tofu_triton.graphs.CudaGraphRunner(model, example=torch.randn(1, 3, 224, 224, device="cuda"),
                                                batch_sizes=(1, 2, 4, 8, 16, 32))
    logits = runner(images)          # images [B, 3, 224, 224], B <= 32: padded to the next size, replayed

A patched model captures like any other: its steps launch the same kernels on
the same shapes every time (output shapes depend only on N and the schedule),
and nothing in a forward waits for the GPU. The other way to get the same
effect is ``torch.compile(model, mode="reduce-overhead", fullgraph=True)``,
which also captures graphs per input shape (a patched model compiles with
``fullgraph=True``: tests/test_patch_timm.py; not yet timed on a GPU).

Graphs are captured on the first batch of each size, or all at once by
:meth:`CudaGraphRunner.capture_all` (largest first, so the smaller graphs
reuse the larger ones' memory: they share one pool). On a device other than CUDA the
runner calls the model eagerly (same padding, same results), so the same
server code runs on a CPU. A runner is not reentrant: one replay at a time
(it takes a lock); settings of a patched model (``model.r`` ...) are fixed at
capture, so make a new runner after changing them.
"""
import threading
from typing import Dict, Sequence

import torch
from torch import Tensor, nn

from . import dispatch


class CudaGraphRunner:
    """Run ``model`` on batches of ``example``'s shape (any batch size up to the largest
    of ``batch_sizes``) from one CUDA graph per size in ``batch_sizes``.

    example: [B0, ...] a tensor with the shape, dtype and device of the inputs
    (its batch size is ignored). Each call takes x [B, ...] and returns the
    model's output for those B rows (a new tensor, not the graph's buffer).
    """

    def __init__(self, model: nn.Module, example: Tensor, batch_sizes: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
                 warmup: int = 3):
        sizes = sorted(set(batch_sizes))
        if not sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in sizes):
            raise ValueError(f"batch_sizes must be positive ints, got {batch_sizes!r}")
        if not isinstance(example, Tensor) or example.dim() < 1:
            raise TypeError("example must be a tensor [B, ...] with the shape, dtype and device of the inputs")
        self.model, self.sizes, self.warmup = model, sizes, warmup
        self.item_shape, self.dtype, self.device = tuple(example.shape[1:]), example.dtype, example.device
        self._graphs: Dict[int, tuple] = {}  # batch size -> (graph, static input, static output)
        self._pool = None
        self._lock = threading.Lock()

    @property
    def captured(self) -> Sequence[int]:
        """Batch sizes with a captured graph so far."""
        return sorted(self._graphs)

    def capture_all(self) -> "CudaGraphRunner":
        """Capture every batch size now (at server start), largest first; returns the runner."""
        if self.device.type == "cuda":
            with self._lock:
                for size in reversed(self.sizes):
                    if size not in self._graphs:
                        self._capture(size)
        return self

    def __call__(self, x: Tensor) -> Tensor:
        if tuple(x.shape[1:]) != self.item_shape or x.dtype != self.dtype or x.device != self.device:
            raise ValueError(f"x must be [B, {', '.join(map(str, self.item_shape))}] {self.dtype} on {self.device} "
                             f"(the runner's example); got {list(x.shape)} {x.dtype} on {x.device}")
        batch = x.shape[0]
        size = next((b for b in self.sizes if b >= batch), None)
        if size is None:
            raise ValueError(f"batch of {batch} is larger than the largest batch size {self.sizes[-1]}: split it, "
                             "or make the runner with a larger size in batch_sizes")
        padded = x if size == batch else torch.cat([x, x.new_zeros(size - batch, *self.item_shape)])
        if self.device.type != "cuda":
            with torch.inference_mode():
                return self.model(padded)[:batch]
        with self._lock:
            graph, static_in, static_out = self._graphs.get(size) or self._capture(size)
            static_in.copy_(padded)
            graph.replay()
            return static_out[:batch].clone()

    def _capture(self, size: int):
        static_in = torch.zeros(size, *self.item_shape, dtype=self.dtype, device=self.device)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        # The first calls compile the kernels and build caches: choosing as the capture will (for_graphs).
        with torch.inference_mode(), torch.cuda.device(self.device), torch.cuda.stream(stream), dispatch.for_graphs():
            for _ in range(self.warmup):
                self.model(static_in)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.device(self.device), torch.cuda.graph(graph, pool=self._pool):
            static_out = self.model(static_in)
        self._graphs[size] = (graph, static_in, static_out)
        return self._graphs[size]
