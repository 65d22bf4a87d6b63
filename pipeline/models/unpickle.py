"""Reading NVIDIA's network pickles (EDM2's releases) without running anything stored in them.

EDM2 publishes networks, raw EMA snapshots and dataset references as Python pickles of
`torch_utils.persistence` objects: each persistent object is pickled as a call of
`torch_utils.persistence._reconstruct_persistent_obj(meta)`, where `meta` holds the class's source
code, its name and the object's saved `__dict__`. A plain `pickle.load` imports that source, that is,
runs code from the file. Here an unpickler admits only the globals that rebuilding tensors, numpy
arrays and plain containers needs, and turns each persistence record into a `Persistent` that keeps
the class name and state: parameters, buffers and constructor arguments are read from it; its
source is kept as text and never executed. Everything else in a file is refused.
"""

from __future__ import annotations

import functools
import io
import pickle
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipeline import store


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """A pickle asked for something outside what a network release file needs."""


@dataclass
class Persistent:
    """One `torch_utils.persistence` object as saved: its class name and `__dict__`, never rebuilt."""

    class_name: str
    state: dict[str, Any]
    module_src: str = field(default="", repr=False)  # the pickled source, kept as text only

    @property
    def init_args(self) -> tuple[Any, ...]:
        return tuple(self.state.get("_init_args", ()))

    @property
    def init_kwargs(self) -> dict[str, Any]:
        return dict(self.state.get("_init_kwargs", {}))


class TorchModule:
    """A non-persistent torch module in a release file (ModuleList, ModuleDict, ...): name and state."""

    class_name = ""

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.state = state


class EasyDict(dict):
    """`dnnlib.util.EasyDict`, a dict with attribute access (the release files' top level)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as e:
            raise AttributeError(name) from e


def _reconstruct_persistent_obj(meta: dict[str, Any]) -> Persistent:
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("state"), dict):
        raise UnsafePickleError(f"a persistence record that is not a saved class instance: {sorted(meta)!r}")
    return Persistent(str(meta["class_name"]), meta["state"], str(meta.get("module_src", "")))


def _load_from_bytes(data: bytes) -> Any:
    """A pickled torch storage: torch's own weights-only loader, itself restricted, reads the inner file."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafePickleError(f"a nested torch storage asks for more than tensors: {e}") from e


@functools.cache
def _torch_module(name: str) -> type:
    return type(name, (TorchModule,), {"class_name": name})


_ALLOWED = {  # (module, name) -> what it becomes here
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("dnnlib.util", "EasyDict"): EasyDict,
    ("dnnlib", "EasyDict"): EasyDict,
    ("torch.storage", "_load_from_bytes"): _load_from_bytes,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
}
_NUMPY = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
          ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"), ("numpy", "ndarray"),
          ("numpy", "dtype"), ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")}  # protocol 5


class RestrictedUnpickler(pickle.Unpickler):
    """Admits tensors, numpy arrays and scalars, plain containers and persistence records; nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("copyreg", "_reconstructor"):
            return _reconstructor
        if (module, name) in _ALLOWED:
            return _ALLOWED[module, name]
        if module.startswith("torch.nn.modules.") and name[:1].isupper():
            return _torch_module(name)  # a container module: its state is read, its class never imported
        if (module, name) in _NUMPY:
            return super().find_class(module, name)
        raise UnsafePickleError(f"refused {module}.{name}: an EDM2 release file holds only tensors, numpy "
                                "arrays, plain containers and torch_utils.persistence records")


def _reconstructor(cls: type, base: type, state: Any) -> Any:
    """copyreg's rebuilder of old-style reductions, for the classes admitted above only."""
    if base is not object or state is not None or not (issubclass(cls, (TorchModule, EasyDict))):
        raise UnsafePickleError(f"refused copyreg._reconstructor({cls!r}, {base!r}, ...)")
    return object.__new__(cls) if issubclass(cls, TorchModule) else cls()


def loads(data: bytes, name: str = "the file") -> Any:
    """The release file's top-level object, with persistence records as `Persistent`."""
    try:
        return RestrictedUnpickler(io.BytesIO(data)).load()
    except UnsafePickleError:
        raise
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError, IndexError) as e:
        raise ValueError(f"{name} is not a complete EDM2 pickle ({type(e).__name__}: {e}): "
                         "a truncated download or another kind of file; download it again") from e


def load(url: str) -> Any:
    """`loads` of a local path or fsspec URL (https://, s3://, ...)."""
    return loads(store.read_bytes(url), store.redact(url))


def tensors(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """The state dict of a `Persistent` or `TorchModule` tree: parameters and buffers under dotted
    module paths, as `module.state_dict()` names them (non-persistent buffers left out)."""
    state = obj.state
    skip = set(state.get("_non_persistent_buffers_set", ()))
    out = {prefix + k: v.detach() for k, v in state.get("_parameters", {}).items() if v is not None}
    out.update({prefix + k: v for k, v in state.get("_buffers", {}).items() if v is not None and k not in skip})
    for name, child in state.get("_modules", {}).items():
        if child is not None:
            out.update(tensors(child, f"{prefix}{name}."))
    return out
