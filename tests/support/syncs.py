"""Count, on a CPU, the places where a training step would make the host wait for a GPU.

On a GPU the host runs ahead of the device, queueing kernels; it stops and waits ("syncs") whenever it needs a value
that lives on the device: ``.item()``/``bool()``/``int()``/``float()`` of a device tensor, ``.tolist()``,
``.numpy()`` / ``.cpu()`` of one (a device-to-host copy), a ``copy_`` from the device into host memory, and every
operation whose *output shape* depends on device data (``nonzero``, ``unique``, ``masked_select``, boolean-mask
indexing, ``repeat_interleave`` without an output size, ``bincount``), which must read a count back to allocate.

:class:`HostSyncCounter` finds those on a CPU-only machine. Which tensors "live on the device" is tracked
explicitly: the tensors handed to it (the model's parameters and buffers, the optimizer's state, the batch after
its move to the device) and every output of an operation with such an input; host tensors (loader output, NumPy
results, what a gloo exchange of Python numbers returns) are not. A ``TorchDispatchMode`` sees every aten operation of the step,
forward and backward; the Python-level conversions that never reach the dispatcher on a CPU (``.cpu()``,
``.numpy()``, ``.tolist()``, ``__array__``) are wrapped while the counter is active. Only the thread that entered
the counter is observed (the loader's threads do host work by design).

Limits, stated: a device-to-host copy written as ``.to("cpu")`` cannot be told from a device-to-device
``.to(device)`` when the device *is* the CPU, so it is not seen (grain's step code uses ``.cpu()`` for reads); a
tensor made by a factory call (``torch.zeros(..., device=d)``) starts as a host tensor, because on a CPU the
dispatcher cannot tell ``device=d`` from the default; kernels that sync inside a library call without any of the
above are not seen either.
"""

from __future__ import annotations

import threading
import weakref
from collections import Counter
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

aten = torch.ops.aten

#: Operations that read device data back to the host, or whose output shape depends on device data.
SYNC_OPS = {
    aten._local_scalar_dense.default: "item/bool/int/float",
    aten.nonzero.default: "nonzero",
    aten._unique2.default: "unique",
    aten.unique_dim.default: "unique(dim)",
    aten.unique_consecutive.default: "unique_consecutive",
    aten.masked_select.default: "masked_select",
    aten.repeat_interleave.Tensor: "repeat_interleave",
    aten.bincount.default: "bincount",
    aten.equal.default: "equal",
}


class HostSyncCounter(TorchDispatchMode):
    """``with HostSyncCounter(device_tensors) as c: ...`` → ``c.events``: one entry per host sync, in order.

    Args:
        device_tensors: the tensors that are on the device when the observed code starts (parameters, buffers,
            optimizer state, the batch).
    """

    def __init__(self, device_tensors: Iterable[torch.Tensor]):
        super().__init__()
        self._device: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()
        for t in device_tensors:
            self.mark(t)
        self.events: list[str] = []
        self._thread = threading.get_ident()
        self._saved: dict[str, Any] = {}

    # -- which tensors are on the device
    def mark(self, t: torch.Tensor) -> None:
        self._device[id(t)] = t

    def on_device(self, t: Any) -> bool:
        if not isinstance(t, torch.Tensor):
            return False
        if self._device.get(id(t)) is t:
            return True
        base = t._base
        return base is not None and self._device.get(id(base)) is base

    def _record(self, what: str) -> None:
        if threading.get_ident() == self._thread:
            self.events.append(what)

    # -- every aten operation
    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        device_in = any(self.on_device(t) for t in tensors)
        if device_in and threading.get_ident() == self._thread:
            if func in SYNC_OPS:
                self._record(SYNC_OPS[func])
            elif func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default) and any(
                    isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in tree_leaves(args[1])):
                self._record("boolean-mask indexing")
            elif func is aten.copy_.default and not self.on_device(args[0]) and self.on_device(args[1]):
                self._record("copy device->host")
        out = func(*args, **kwargs)
        if device_in:
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.mark(t)
        return out

    # -- conversions that do not reach the dispatcher on a CPU
    def __enter__(self) -> HostSyncCounter:
        counter = self
        originals = {name: getattr(torch.Tensor, name) for name in ("cpu", "numpy", "tolist", "__array__")}
        self._saved = originals

        def cpu(t: torch.Tensor, *a: Any, **k: Any) -> torch.Tensor:
            if not counter.on_device(t):
                return originals["cpu"](t, *a, **k)
            counter._record(".cpu()")
            with torch.utils._python_dispatch._disable_current_modes():
                return t.detach().clone()  # a host copy: a different tensor from the device one

        def reader(name: str) -> Any:
            def read(t: torch.Tensor, *a: Any, **k: Any) -> Any:
                if counter.on_device(t):
                    counter._record(f".{name}()")
                return originals[name](t, *a, **k)
            return read

        torch.Tensor.cpu = cpu  # type: ignore[method-assign]
        for name in ("numpy", "tolist", "__array__"):
            setattr(torch.Tensor, name, reader(name))
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        try:
            super().__exit__(*exc)
        finally:
            for name, fn in self._saved.items():
                setattr(torch.Tensor, name, fn)

    def summary(self) -> dict[str, int]:
        return dict(Counter(self.events))
