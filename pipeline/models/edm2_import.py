"""EDM2's released networks as onestep's: the mapping from EDM2's `Precond` to `pipeline.models.edm2`.

A release file is read by the restricted unpickler (pipeline/models/unpickle.py); its network record's
constructor arguments become `build_denoiser`'s, its tensors onestep's state dict, after checks that the
two networks compute the same function. Also here: EDM2's file names (time and EMA length), and the
checks of a release against the dataset it is to be a teacher of.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np
import torch

from pipeline import store
from pipeline.models.edm2 import PRESETS, Denoiser, build_denoiser
from pipeline.models.unpickle import Persistent, load, tensors
from pipeline.outputs import EncodeOutputs
from pipeline.weights import load_denoiser, save_network


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
    return load_denoiser(url)


def check_guide(url: str, field: str) -> None:
    """Before any sampling: the guide is where `field` says."""
    if not store.exists(url if url.endswith(".pkl") else store.join(url, "network.json")):
        raise ValueError(f"{field} = {store.redact(url)}: no EDM2 release .pkl, or folder with network.json + "
                         "network.safetensors, there: fix the URL (or set the guidance to 1 and drop the guide)")


# EDM2's file names: `network-snapshot-{kimg:07d}-{sigma_rel:.3f}.pkl` (raw EMA snapshots) and
# `edm2-img512-s-{kimg}-{sigma_rel:.3f}.pkl` (post-hoc reconstructions); kimg = nimg // 1000.
SNAPSHOT_NAME = re.compile(r"network-snapshot-(\d+)-(\d+\.\d+)\.pkl")
RECONSTRUCTION_NAME = re.compile(r".*-(\d+)-(\d+\.\d+)\.pkl")
ENCODERS = {"StandardRGBEncoder": "rgb", "StabilityVAEEncoder": "vae"}  # EDM2's encoder -> onestep's


def time_and_length(url: str, pattern: re.Pattern[str], what: str) -> tuple[int, float]:
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


def check_encoder(top: Any, ours: dict[str, Any], url: str) -> None:
    """The release's encoder (saved with the network) must be the one that made the encode artifact:
    EDM2's RGB encoder is onestep's `rgb`, its SD-VAE encoder onestep's `vae` with the same latent
    statistics and VAE, so that the network sees the same model space and decoding matches."""
    record = top.get("encoder") if isinstance(top, dict) else None
    if not isinstance(record, Persistent):
        return  # a file without its encoder (e.g. some guides): nothing to compare
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


def check_dataset(net: Any, encode: EncodeOutputs, url: str) -> None:
    """The network's resolution, channels and classes against the encode artifact's data."""
    channels, resolution = encode.encoder["model_channels"], encode.shape[-1]
    if (net.img_channels, net.img_resolution) != (channels, resolution):
        raise ValueError(f"{store.redact(url)} is a network of {net.img_channels}x{net.img_resolution}x"
                         f"{net.img_resolution} inputs, the encode artifact holds {channels}x{resolution}x{resolution}: "
                         "set encode.resolution (and encode.encoder) to the release's")
    if net.num_classes not in (0, encode.num_classes):
        raise ValueError(f"{store.redact(url)} has {net.num_classes} class labels, the dataset {encode.num_classes}")


def snapshot_files(folder: str) -> list[dict[str, Any]]:
    """EDM2's raw EMA snapshots in a folder: [{url, nimg, sigma_rel}] sorted by time, then length."""
    _, files = store.list_dir(folder)
    found = [{"url": url, "nimg": nimg, "sigma_rel": sigma_rel} for url in files
             if SNAPSHOT_NAME.fullmatch(url.rsplit("/", 1)[-1])
             for nimg, sigma_rel in [time_and_length(url, SNAPSHOT_NAME, "raw snapshots")]]
    if not found:
        raise ValueError(f"teacher.release = {store.redact(folder)}: no EDM2 snapshots "
                         "(network-snapshot-KIMG-SIGMA_REL.pkl) in that folder")
    return sorted(found, key=lambda s: (s["nimg"], s["sigma_rel"]))


def snapshot_state(url: str) -> dict[str, torch.Tensor]:
    """A raw snapshot's EMA weights under onestep's names, float32."""
    top = load(url)
    record = top.get("ema") if isinstance(top, dict) else None
    if not isinstance(record, Persistent):
        raise ValueError(f"{store.redact(url)} holds no EDM2 network under 'ema'")
    return network_state(record)
