"""A CPU stand-in for `torch.cuda.set_sync_debug_mode`: records every op that, on CUDA tensors,
makes the host wait for the device, and the Python line that called it.

Such ops read a value back (`item`, `int(t)`, `bool(t)`, `torch.equal`) or give an output whose
shape depends on the data (`nonzero`, boolean-mask indexing, `masked_select`, `unique`,
`repeat_interleave` without `output_size`). On the CPU nothing waits, so a CPU run cannot time
them; this records them instead, so that the CPU suite keeps them out of the training step. What
it cannot see on the CPU: device-to-host copies (`.cpu()`, `.tolist()`, `.numpy()` are no-ops or
plain reads there). The GPU tests use the real debug mode, which sees those too.

With a `DeviceResidency`, it emulates where tensors would live on a GPU: only reads of tensors that
would be on the device count (a host counter read back is free there), plus blocking copies from
the device to the host. What stands for the GPU: tensors marked as moved there (the emulated
device marks them), and the outputs of every op that has such an input. Blind spot: factory ops
(`torch.zeros(..., device=x.device)`) make host tensors on the CPU, so reads of them are missed.
"""
from __future__ import annotations

import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

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


class DeviceResidency:
    """The CPU tensors that stand for GPU tensors in an emulated GPU run."""

    def __init__(self):
        self._on_device = WeakIdKeyDictionary()

    def mark(self, tensor: torch.Tensor) -> torch.Tensor:
        self._on_device[tensor] = True
        return tensor

    def __contains__(self, tensor: torch.Tensor) -> bool:
        return tensor in self._on_device

    def any_of(self, *trees) -> bool:
        return any(isinstance(t, torch.Tensor) and t in self for t in tree_leaves(trees))


class HostSyncDetector(TorchDispatchMode):
    """with HostSyncDetector() as d: ...; d.syncs = [(op, caller), ...]

    `residency`: count only what would wait on a GPU (see the module docstring)."""

    def __init__(self, residency: DeviceResidency | None = None):
        super().__init__()
        self.syncs: list[tuple[str, str]] = []
        self.residency = residency
        _pass_through_flex_attention()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        residency = self.residency
        if residency is None:
            if _is_sync(func, args, kwargs):
                self.syncs.append((func.overloadpacket.__name__, _caller()))
            return func(*args, **kwargs)
        from_device = residency.any_of(args, kwargs)
        if func.overloadpacket.__name__ == "copy_" and args[0] not in residency:
            if from_device and not (kwargs.get("non_blocking") or (len(args) > 2 and args[2])):
                self.syncs.append(("copy_ (device to host)", _caller()))
            return func(*args, **kwargs)  # the destination stays on the host
        if from_device and _is_sync(func, args, kwargs):
            self.syncs.append((func.overloadpacket.__name__, _caller()))
        out = func(*args, **kwargs)
        if from_device:
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    residency.mark(t)
        return out


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

