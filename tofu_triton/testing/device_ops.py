"""Counting the device work of code run on the CPU (tests/test_launches.py, bench/launches.py)."""

_NO_KERNEL = {
    "empty", "empty_strided", "new_empty", "new_empty_strided", "empty_like", "lift_fresh", "resize_", "_unsafe_view",
    "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size",
}


class DeviceOps:
    """Counts the device work of code run on the CPU, as a GPU would launch it.

    Inside ``with DeviceOps() as ops:``, ``ops.aten`` counts (by name) every
    aten op that launches a kernel on a GPU: views, metadata and allocations
    are left out; ``ops.triton`` counts Triton launches (by kernel name),
    each as one launch, without the torch ops Triton's CPU interpreter runs
    inside it. With ``stub=True`` the kernels are not run at all (their
    outputs stay unwritten), which keeps a ViT-B forward on the Triton path
    quick on the CPU; with ``aten=False`` aten ops are not watched (no
    dispatch mode: for timing with stubbed kernels). ``ops.total`` is the sum
    of both counts.
    """

    def __init__(self, stub: bool = False, aten: bool = True):
        self.stub, self.watch_aten = stub, aten
        self.aten, self.triton = {}, {}
        self._inside_kernel = False
        self._mode = None
        self._patched = []

    @property
    def total(self) -> int:
        return sum(self.aten.values()) + sum(self.triton.values())

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.overloadpacket.__name__
                if not counter._inside_kernel and not func.is_view and name not in _NO_KERNEL:
                    counter.aten[name] = counter.aten.get(name, 0) + 1
                return func(*args, **(kwargs or {}))

        for cls in _triton_function_classes():
            original = cls.run

            def run(fn_self, *args, _original=original, **kwargs):
                name = getattr(fn_self, "__name__", None) or fn_self.fn.__name__
                counter.triton[name] = counter.triton.get(name, 0) + 1
                if counter.stub:
                    return None
                counter._inside_kernel = True
                try:
                    return _original(fn_self, *args, **kwargs)
                finally:
                    counter._inside_kernel = False

            cls.run = run
            self._patched.append((cls, original))
        if self.watch_aten:
            self._mode = _Mode()
            self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        if self._mode is not None:
            self._mode.__exit__(*exc)
            self._mode = None
        for cls, original in self._patched:
            cls.run = original
        self._patched.clear()
        return False


def _triton_function_classes():
    """The classes whose ``run`` launches a @triton.jit kernel (compiled, and the CPU interpreter's)."""
    from triton.runtime.jit import JITFunction

    classes = [JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction

        classes.append(InterpretedFunction)
    except ImportError:  # a Triton without the interpreter
        pass
    return classes
