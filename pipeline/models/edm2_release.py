"""Reading NVIDIA's released EDM2 pickles without running anything stored in them.

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

import torch

from pipeline import store


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """A pickle asked for something outside what an EDM2 release file needs."""


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
_NUMPY = ("numpy.core.multiarray", "numpy._core.multiarray")


class ReleaseUnpickler(pickle.Unpickler):
    """Admits tensors, numpy arrays and scalars, plain containers and persistence records; nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("copyreg", "_reconstructor"):
            return _reconstructor
        if (module, name) in _ALLOWED:
            return _ALLOWED[module, name]
        if module.startswith("torch.nn.modules.") and name[:1].isupper():
            return _torch_module(name)  # a container module: its state is read, its class never imported
        if (module in _NUMPY and name in ("_reconstruct", "scalar")) or (module == "numpy" and name in ("ndarray", "dtype")):
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
        return ReleaseUnpickler(io.BytesIO(data)).load()
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


# EDM2's Precond / UNet / Block keyword arguments that onestep's network fixes at EDM2's defaults: a
# release file with other values is refused rather than imported into a network that computes otherwise.
FIXED_KWARGS: dict[str, Any] = {
    "sigma_data": 0.5, "logvar_channels": 128, "label_balance": 0.5, "concat_balance": 0.5,
    "res_balance": 0.3, "attn_balance": 0.3, "clip_act": 256, "channels_per_head": 64,
    "channel_mult_noise": None, "channel_mult_emb": None, "resample_filter": [1, 1],
}
RUNTIME_KWARGS = ("use_fp16", "class_name")  # how EDM2 ran the network, not what it computes
ARCHITECTURE_KWARGS = {"model_channels": "channels", "channel_mult": "channel_mult", "num_blocks": "num_blocks",
                       "attn_resolutions": "attn_resolutions", "dropout": "dropout"}
RENAMED = {"logvar_fourier.": "u_fourier.", "logvar_linear.": "u_linear."}  # EDM2's name -> onestep's


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, (tuple, list)) else value


def network_arguments(record: Persistent) -> dict[str, Any]:
    """`build_denoiser`'s arguments for an EDM2 `Precond` record, from its constructor arguments."""
    if record.class_name != "Precond":
        raise ValueError(f"expected EDM2's network (class Precond), found class {record.class_name!r}")
    kwargs = record.init_kwargs
    missing = [k for k in ("img_resolution", "img_channels", "label_dim") if k not in kwargs]
    if missing:
        raise ValueError(f"the EDM2 network's saved constructor arguments lack {missing}: not a Precond of EDM2's release")
    for name, value in kwargs.items():
        if name in FIXED_KWARGS and _plain(value) != FIXED_KWARGS[name]:
            raise ValueError(f"the EDM2 network has {name}={value!r}; onestep's network fixes it at "
                             f"{FIXED_KWARGS[name]!r}, so it cannot compute the same function")
    unknown = sorted(set(kwargs) - set(FIXED_KWARGS) - set(RUNTIME_KWARGS) - set(ARCHITECTURE_KWARGS)
                     - {"img_resolution", "img_channels", "label_dim"})
    if unknown:
        raise ValueError(f"the EDM2 network has constructor arguments onestep does not know: {unknown}")
    overrides = {ours: _plain(kwargs[theirs]) for theirs, ours in ARCHITECTURE_KWARGS.items() if theirs in kwargs}
    return {"preset": "S", "img_resolution": int(kwargs["img_resolution"]), "img_channels": int(kwargs["img_channels"]),
            "num_classes": int(kwargs["label_dim"]), **overrides}  # S: EDM2's UNet defaults, then the file's


def network_state(record: Persistent) -> dict[str, torch.Tensor]:
    """The record's tensors under onestep's names, float32 (the release stores float16)."""
    out = {}
    for name, value in tensors(record).items():
        for theirs, ours in RENAMED.items():
            name = ours + name[len(theirs):] if name.startswith(theirs) else name
        out[name] = value.float().contiguous()
    return out


def import_network(url: str, out: str, key: str = "ema") -> dict[str, Any]:
    """Write `out/network.json` and `out/network.safetensors` (the format the stages read) from an EDM2
    release pickle at `url` (its `key` entry, `ema` in EDM2's files); returns the network config."""
    from pipeline.models.edm2 import build_denoiser
    from pipeline.training import save_network

    top = load(url)
    record = top.get(key) if isinstance(top, dict) else top
    if not isinstance(record, Persistent):
        found = sorted(top) if isinstance(top, dict) else type(top).__name__
        raise ValueError(f"{store.redact(url)} holds no EDM2 network under {key!r} (found {found})")
    net = build_denoiser(**network_arguments(record))
    try:
        net.load_state_dict(network_state(record))
    except RuntimeError as e:  # missing / unexpected names or other shapes: another architecture
        raise ValueError(f"{store.redact(url)}: the EDM2 network's tensors do not fit onestep's network "
                         f"{net.config}: {e}") from e
    save_network(store.Artifact(out), "network", net)  # as the teacher stage writes its network
    return net.config
