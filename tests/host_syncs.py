"""A CPU stand-in for `torch.cuda.set_sync_debug_mode`: records every op that, on CUDA tensors,
makes the host wait for the device, and the Python line that called it.

Such ops read a value back (`item`, `int(t)`, `bool(t)`, `torch.equal`) or give an output whose
shape depends on the data (`nonzero`, boolean-mask indexing, `masked_select`, `unique`,
`repeat_interleave` without `output_size`). On the CPU nothing waits, so a CPU run cannot time
them; this records them instead, so that the CPU suite keeps them out of the training step. What
it cannot see on the CPU: device-to-host copies (`.cpu()`, `.tolist()`, `.numpy()` are no-ops or
plain reads there). The GPU tests use the real debug mode, which sees those too.
"""
from __future__ import annotations

import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_VALUE_READ = {"_local_scalar_dense", "equal", "is_nonzero"}
_DATA_DEPENDENT_SHAPE = {"nonzero", "masked_select", "_unique", "_unique2", "unique_dim", "unique_consecutive"}
_MASK_INDEXING = {"index", "index_put", "index_put_", "_index_put_impl_"}
_THIS_FILE = str(Path(__file__).resolve())


def _is_sync(func, args, kwargs) -> bool:
    name = func.overloadpacket.__name__
    if name in _VALUE_READ or name in _DATA_DEPENDENT_SHAPE:
        return True
    if name in _MASK_INDEXING:  # x[mask]: a nonzero inside the kernel
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None)
    if name == "repeat_interleave":  # with a repeats tensor, the output length is read from it
        repeats = args[0] if func._overloadname == "Tensor" else args[1]
        return isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None
    return False


def _caller() -> str:
    """The innermost frame outside torch and this file: where the step asked for the value."""
    for frame in reversed(traceback.extract_stack()):
        path = frame.filename.replace("\\", "/")
        if "/torch/" not in path and frame.filename != _THIS_FILE:
            return f"{path.rsplit('site-packages/', 1)[-1]}:{frame.lineno} ({frame.name})"
    return "?"


class HostSyncDetector(TorchDispatchMode):
    """with HostSyncDetector() as d: ...; d.syncs = [(op, caller), ...]"""

    def __init__(self):
        super().__init__()
        self.syncs: list[tuple[str, str]] = []
        _pass_through_flex_attention()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_sync(func, args, kwargs):
            self.syncs.append((func.overloadpacket.__name__, _caller()))
        return func(*args, **kwargs)


def _pass_through_flex_attention() -> None:
    """FlexAttention is a higher-order op: it needs a rule per dispatch mode. Ours runs it as is
    (its internals are torch's; its inputs and outputs are what this mode watches)."""
    try:
        from torch._higher_order_ops.flex_attention import flex_attention, flex_attention_backward
    except ImportError:  # an older or newer torch without these: nothing to register
        return
    for hop in (flex_attention, flex_attention_backward):
        if HostSyncDetector not in hop.python_key_table:
            hop.py_impl(HostSyncDetector)(lambda mode, *args, _hop=hop, **kwargs: _hop(*args, **kwargs))

