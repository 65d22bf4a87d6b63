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

import dataclasses
import functools
import io
import pickle
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipeline import store
from pipeline.models.edm2 import PRESETS, Denoiser, build_denoiser
from pipeline.weights import load_network, save_network


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
_NUMPY = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
          ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"), ("numpy", "ndarray"),
          ("numpy", "dtype"), ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")}  # protocol 5


class ReleaseUnpickler(pickle.Unpickler):
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
# EDM2's state_dict names -> onestep's: the uncertainty head's modules, and MPFourier's buffers (EDM2's
# `freqs`, `phases`) wherever they are; every other name is the same in both networks.
RENAMED_MODULES = {"logvar_fourier": "u_fourier", "logvar_linear": "u_linear"}
RENAMED_TENSORS = {"freqs": "freq", "phases": "phase"}


def onestep_name(name: str) -> str:
    """The name in onestep's network of the tensor EDM2's `Precond` calls `name`."""
    first, *middle, last = name.split(".")
    return ".".join([RENAMED_MODULES.get(first, first), *middle, RENAMED_TENSORS.get(last, last)])


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
    arguments = {"preset": "S", "img_resolution": int(kwargs["img_resolution"]), "img_channels": int(kwargs["img_channels"]),
                 "num_classes": int(kwargs["label_dim"]), **overrides}  # S: EDM2's UNet defaults, then the file's
    _check_attention_widths(arguments)
    return arguments


def _check_attention_widths(arguments: dict[str, Any]) -> None:
    """EDM2 gives an attention block out_channels // 64 heads, so none below 64 channels; onestep gives it one."""
    arch = dataclasses.replace(PRESETS[arguments["preset"]], **{k: arguments[k] for k in ARCHITECTURE_KWARGS.values()
                                                                  if k in arguments})
    widths = [arch.channels * m for m in arch.channel_mult]
    attended = {w for level, w in enumerate(widths) if arguments["img_resolution"] >> level in arch.attn_resolutions}
    narrow = sorted(w for w in attended | {widths[-1]} if w < FIXED_KWARGS["channels_per_head"])  # + the bottleneck's
    if narrow:
        raise ValueError(f"the EDM2 network has attention at {narrow} channels, where EDM2 computes none (fewer than "
                         "64 channels per head) and onestep's network would: onestep cannot import it")


def network_state(record: Persistent) -> dict[str, torch.Tensor]:
    """The record's tensors under onestep's names, float32 (the release stores float16)."""
    return {onestep_name(name): value.float().contiguous() for name, value in tensors(record).items()}


def release_network(url: str, key: str = "ema") -> tuple[Any, Any]:
    """(onestep's network with the release's weights, float32; the file's top-level object)."""
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
    return net.eval().requires_grad_(False), top


def import_network(url: str, out: str, key: str = "ema") -> dict[str, Any]:
    """Write `out/network.json` and `out/network.safetensors` (the format the stages read) from an EDM2
    release pickle at `url` (its `key` entry, `ema` in EDM2's files); returns the network config."""
    net, _ = release_network(url, key)
    save_network(store.Artifact(out), "network", net)  # as the teacher stage writes its network
    return net.config


def load_guide(url: str) -> Denoiser:
    """A guiding network: a folder with network.json + network.safetensors, or an EDM2 release .pkl."""
    if url.endswith(".pkl"):
        return release_network(url)[0]
    return load_network(store.Artifact(url), "network")


def check_guide(url: str, field: str) -> None:
    """Before any sampling: the guide is where `field` says."""
    if not store.exists(url if url.endswith(".pkl") else store.join(url, "network.json")):
        raise ValueError(f"{field} = {store.redact(url)}: no EDM2 release .pkl, or folder with network.json + "
                         "network.safetensors, there: fix the URL (or set the guidance to 1 and drop the guide)")


# --- the DAG entry: a released teacher instead of training one -----------------------------------

# EDM2's file names: `network-snapshot-{kimg:07d}-{sigma_rel:.3f}.pkl` (raw EMA snapshots) and
# `edm2-img512-s-{kimg}-{sigma_rel:.3f}.pkl` (post-hoc reconstructions); kimg = nimg // 1000.
SNAPSHOT_NAME = re.compile(r"network-snapshot-(\d+)-(\d+\.\d+)\.pkl")
RECONSTRUCTION_NAME = re.compile(r".*-(\d+)-(\d+\.\d+)\.pkl")
ENCODERS = {"StandardRGBEncoder": "rgb", "StabilityVAEEncoder": "vae"}  # EDM2's encoder -> onestep's


def _time_and_length(url: str, pattern: re.Pattern[str], what: str) -> tuple[int, float]:
    name = url.rstrip("/").rsplit("/", 1)[-1]
    match = pattern.fullmatch(name)
    if not match:
        raise ValueError(f"{store.redact(url)}: {what} are named as EDM2 names them ({pattern.pattern}), so that "
                         "their time (thousands of images) and EMA length are known: rename the file")
    return kimg_to_nimg(int(match[1])), float(match[2])


def kimg_to_nimg(kimg: int) -> int:
    """A file name's time in images: EDM2 names a snapshot by nimg // 1000, and writes one every multiple of
    1024 images, so nimg is the multiple of 1024 in [1000 kimg, 1000 kimg + 999] (1000 kimg if there is none)."""
    nimg = (kimg * 1000 + 999) // 1024 * 1024
    return nimg if nimg // 1000 == kimg else kimg * 1000


def check_encoder(top: Any, encode: dict[str, Any], url: str) -> None:
    """The release's encoder (saved with the network) must be the one that made the encode artifact:
    EDM2's RGB encoder is onestep's `rgb`, its SD-VAE encoder onestep's `vae` with the same latent
    statistics and VAE, so that the network sees the same model space and decoding matches."""
    record = top.get("encoder") if isinstance(top, dict) else None
    if not isinstance(record, Persistent):
        return  # a file without its encoder (e.g. some guides): nothing to compare
    ours = encode["encoder"]
    theirs = ENCODERS.get(record.class_name)
    fix = f"--set encode.encoder={theirs}" + (" --set encode.vae=stabilityai/sd-vae-ft-mse" if theirs == "vae" else "")
    if theirs is None:
        raise ValueError(f"{store.redact(url)} uses EDM2's encoder {record.class_name}, which onestep does not have")
    if theirs != ours["name"]:
        raise ValueError(f"{store.redact(url)} was trained on {record.class_name} data, the encode artifact holds "
                         f"{ours['name']} data: encode the dataset as the release did ({fix})")
    if theirs == "vae":
        _check_latent_scaling(record, ours, url)
        vae = str(record.state.get("vae_name", ""))
        if vae.rsplit("/", 1)[-1] != str(ours.get("vae", "")).rstrip("/").rsplit("/", 1)[-1]:
            raise ValueError(f"{store.redact(url)} was trained on latents of the VAE {vae}, the encode artifact "
                             f"used {ours.get('vae')}: set encode.vae to {vae} (or a copy of it)")


def _check_latent_scaling(record: Persistent, ours: dict[str, Any], url: str) -> None:
    """EDM2's VAE encoder keeps its normalisation as `scale` and `bias` (final latents = raw * scale + bias, from
    its raw_mean, raw_std, final_mean and final_std): they must be onestep's (final mean 0, std 0.5)."""
    scale = 0.5 / np.asarray(ours["raw_std"], dtype=np.float64)
    expected = {"scale": scale, "bias": -np.asarray(ours["raw_mean"], dtype=np.float64) * scale}
    found = {k: np.asarray(record.state.get(k, np.nan), dtype=np.float64) for k in expected}
    if not all(found[k].shape == v.shape and np.allclose(found[k], v, rtol=1e-5, atol=1e-6) for k, v in expected.items()):
        raise ValueError(f"{store.redact(url)} normalises VAE latents as raw * {found['scale'].tolist()} + "
                         f"{found['bias'].tolist()}; onestep's VAE encoder (raw_mean {ours['raw_mean']}, raw_std "
                         f"{ours['raw_std']}, final mean 0 and std 0.5) as raw * {expected['scale'].round(6).tolist()} + "
                         f"{expected['bias'].round(6).tolist()}, so the network would see other latents than it was trained on")


def check_dataset(net: Any, encode: dict[str, Any], url: str) -> None:
    """The network's resolution, channels and classes against the encode artifact's data."""
    channels, resolution = encode["encoder"]["model_channels"], encode["shape"][-1]
    if (net.img_channels, net.img_resolution) != (channels, resolution):
        raise ValueError(f"{store.redact(url)} is a network of {net.img_channels}x{net.img_resolution}x"
                         f"{net.img_resolution} inputs, the encode artifact holds {channels}x{resolution}x{resolution}: "
                         "set encode.resolution (and encode.encoder) to the release's")
    if net.num_classes not in (0, encode["num_classes"]):
        raise ValueError(f"{store.redact(url)} has {net.num_classes} class labels, the dataset {encode['num_classes']}")


def release_teacher(url: str, artifact: store.Artifact, encode: dict[str, Any]) -> dict[str, Any]:
    """The teacher stage for `teacher.source: edm2-release`: the released post-hoc reconstruction,
    checked against the encode artifact and written as the teacher's `network`."""
    nimg, sigma_rel = _time_and_length(url, RECONSTRUCTION_NAME, "post-hoc reconstructions")
    net, top = release_network(url)
    check_dataset(net, encode, url)
    check_encoder(top, encode, url)
    save_network(artifact, "network", net)
    return {"source": "edm2-release", "release": {"url": store.redact(url), "nimg": nimg, "sigma_rel": sigma_rel},
            "num_parameters": sum(p.numel() for p in net.parameters()), "network": net.config,
            "snapshots": [], "final_ema": {}, "metrics": {}}


def snapshot_files(folder: str) -> list[dict[str, Any]]:
    """EDM2's raw EMA snapshots in a folder: [{url, nimg, sigma_rel}] sorted by time, then length."""
    _, files = store.list_dir(folder)
    found = [{"url": url, "nimg": nimg, "sigma_rel": sigma_rel} for url in files
             if SNAPSHOT_NAME.fullmatch(url.rsplit("/", 1)[-1])
             for nimg, sigma_rel in [_time_and_length(url, SNAPSHOT_NAME, "raw snapshots")]]
    if not found:
        raise ValueError(f"teacher.release = {store.redact(folder)}: no EDM2 snapshots "
                         "(network-snapshot-KIMG-SIGMA_REL.pkl) in that folder")
    return sorted(found, key=lambda s: (s["nimg"], s["sigma_rel"]))


def release_snapshots(folder: str, artifact: store.Artifact, encode: dict[str, Any]) -> dict[str, Any]:
    """The teacher stage for `teacher.source: edm2-snapshots`: the folder's snapshots indexed for phema,
    which streams them from where they are; the last one is read here to check it and get the network."""
    snapshots = snapshot_files(folder)
    net, top = release_network(snapshots[-1]["url"])
    check_dataset(net, encode, snapshots[-1]["url"])
    check_encoder(top, encode, snapshots[-1]["url"])
    artifact.write_json("network.json", net.config)
    return {"source": "edm2-snapshots", "release": {"url": store.redact(folder)},
            "num_parameters": sum(p.numel() for p in net.parameters()), "network": net.config,
            "snapshots": snapshots, "final_ema": {}, "metrics": {}}


def snapshot_state(url: str) -> dict[str, torch.Tensor]:
    """A raw snapshot's EMA weights under onestep's names, float32."""
    top = load(url)
    record = top.get("ema") if isinstance(top, dict) else None
    if not isinstance(record, Persistent):
        raise ValueError(f"{store.redact(url)} holds no EDM2 network under 'ema'")
    return network_state(record)
