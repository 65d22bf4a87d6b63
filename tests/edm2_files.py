"""Files as NVlabs/edm2's own code writes them, for tests: network snapshots and post-hoc reconstructions
(its `Precond` network, encoder and loss, pickled as its `torch_utils.persistence` pickles them, in the
`dnnlib.util.EasyDict` its training loop writes) and dataset refs (`calculate_metrics.py ref`).

The classes below have EDM2's class names, constructor arguments and attribute, parameter and buffer
names, so that their state_dict names, nesting, dtypes and persistence records are a real file's. Their
forward computes EDM2's documented math (docs/algorithms.md) with those names: a reference written apart from
pipeline/models/edm2.py. Written from EDM2's published structure; no line of its code is copied.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import io
import math
import pickle
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

PERSISTENCE_VERSION = 6  # torch_utils.persistence._version of EDM2's code
_PERSISTENT: set[type] = set()


def persistent(cls: type) -> type:
    """EDM2's `persistence.persistent_class`, as far as a file shows it: each object keeps deep copies of its
    constructor's arguments (`_init_args`, `_init_kwargs`) and is pickled as a persistence record."""
    init = cls.__init__

    @functools.wraps(init)
    def recording_init(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        self._init_args, self._init_kwargs = copy.deepcopy(args), copy.deepcopy(kwargs)

    cls.__init__ = recording_init
    _PERSISTENT.add(cls)
    return cls


# --- magnitude-preserving math (docs/algorithms.md, "Magnitude-preserving layers") -------------------

def normalize(x: torch.Tensor, dim: Any = None, eps: float = 1e-4) -> torch.Tensor:
    dim = tuple(range(1, x.ndim)) if dim is None else dim
    rms = x.float().square().mean(dim, keepdim=True).sqrt()
    return x / (eps + rms).to(x.dtype)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x) / 0.596


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    return ((1 - t) * a + t * b) / math.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    na, nb = a.shape[1], b.shape[1]
    scale = math.sqrt((na + nb) / ((1 - t) ** 2 + t ** 2))
    return torch.cat([a * (scale * (1 - t) / math.sqrt(na)), b * (scale * t / math.sqrt(nb))], dim=1)


def resample(x: torch.Tensor, mode: str) -> torch.Tensor:
    """down: the mean of each 2x2 patch; up: each pixel repeated 2x2; keep: x."""
    if mode == "down":
        return x.unflatten(3, (-1, 2)).unflatten(2, (-1, 2)).mean((3, 5))
    if mode == "up":
        return x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    return x


# --- EDM2's modules (training/networks_edm2.py): its names, its arguments -------------------------

@persistent
class MPFourier(nn.Module):
    def __init__(self, num_channels: int, bandwidth: float = 1) -> None:
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B] -> [B, C]
        return math.sqrt(2) * torch.cos(x.float()[:, None] * self.freqs.float() + self.phases.float())


@persistent
class MPConv(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel: list[int]) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def forward(self, x: torch.Tensor, gain: Any = 1) -> torch.Tensor:
        w = normalize(self.weight.float()) * (gain / math.sqrt(self.weight[0].numel()))
        return x @ w.t() if w.ndim == 2 else F.conv2d(x, w, padding=w.shape[-1] // 2)


@persistent
class Block(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, flavor: str = "enc",
                 resample_mode: str = "keep", resample_filter: list[int] = [1, 1], attention: bool = False,
                 channels_per_head: int = 64, dropout: float = 0, res_balance: float = 0.3, attn_balance: float = 0.3,
                 clip_act: float = 256) -> None:
        super().__init__()
        self.out_channels, self.flavor, self.resample_filter, self.resample_mode = out_channels, flavor, resample_filter, resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0  # no attention below 64 channels
        self.dropout, self.res_balance, self.attn_balance, self.clip_act = dropout, res_balance, attn_balance, clip_act
        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, kernel=[3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels, kernel=[])
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=[3, 3])
        self.conv_skip = MPConv(in_channels, out_channels, kernel=[1, 1]) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, kernel=[1, 1]) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, kernel=[1, 1]) if self.num_heads else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = resample(x, self.resample_mode)
        if self.flavor == "enc":
            x = normalize(self.conv_skip(x) if self.conv_skip is not None else x, dim=1)
        y = self.conv_res0(mp_silu(x))
        y = mp_silu(y * (self.emb_linear(emb, gain=self.emb_gain) + 1)[:, :, None, None])
        y = self.conv_res1(y)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, self.res_balance)
        if self.num_heads:
            x = mp_sum(x, self.attn_proj(self.attention(x)), self.attn_balance)
        return x.clamp(-self.clip_act, self.clip_act)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Cosine self-attention; attn_qkv's output channels are ordered (head, channel, q/k/v)."""
        b, c, h, w = x.shape
        qkv = normalize(self.attn_qkv(x).reshape(b, self.num_heads, c // self.num_heads, 3, h * w), dim=2)
        q, k, v = qkv.unbind(3)  # [B, heads, c_head, HW]
        weights = torch.softmax(q.transpose(2, 3) @ k / math.sqrt(q.shape[2]), dim=-1)  # [B, heads, HW, HW]
        return (v @ weights.transpose(2, 3)).reshape(b, c, h, w)


@persistent
class UNet(nn.Module):
    def __init__(self, img_resolution: int, img_channels: int, label_dim: int, model_channels: int = 192,
                 channel_mult: list[int] = [1, 2, 3, 4], channel_mult_noise: int | None = None,
                 channel_mult_emb: int | None = None, num_blocks: int = 3, attn_resolutions: list[int] = [16, 8],
                 label_balance: float = 0.5, concat_balance: float = 0.5, **block_kwargs: Any) -> None:
        super().__init__()
        widths = [model_channels * m for m in channel_mult]
        noise = model_channels * channel_mult_noise if channel_mult_noise else widths[0]
        emb = model_channels * channel_mult_emb if channel_mult_emb else max(widths)
        self.label_balance, self.concat_balance = label_balance, concat_balance
        self.out_gain = nn.Parameter(torch.zeros([]))
        self.emb_fourier = MPFourier(noise)
        self.emb_noise = MPConv(noise, emb, kernel=[])
        self.emb_label = MPConv(label_dim, emb, kernel=[]) if label_dim else None
        levels = [(img_resolution >> i, width) for i, width in enumerate(widths)]
        self.enc = nn.ModuleDict(_encoder(img_channels + 1, levels, emb, num_blocks, attn_resolutions, block_kwargs))
        skips = [m.out_channels for m in self.enc.values()]
        self.dec = nn.ModuleDict(_decoder(skips, levels, emb, num_blocks, attn_resolutions, block_kwargs))
        self.out_conv = MPConv(widths[0], img_channels, kernel=[3, 3])

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is not None:
            emb = mp_sum(emb, self.emb_label(class_labels * math.sqrt(class_labels.shape[1])), self.label_balance)
        emb = mp_silu(emb)
        x, skips = torch.cat([x, torch.ones_like(x[:, :1])], dim=1), []
        for name, module in self.enc.items():
            x = module(x) if name.endswith("_conv") else module(x, emb)
            skips.append(x)
        for name, block in self.dec.items():
            x = block(mp_cat(x, skips.pop(), self.concat_balance) if "_block" in name else x, emb)
        return self.out_conv(x, gain=self.out_gain)


def _encoder(cin: int, levels: list[tuple[int, int]], emb: int, num_blocks: int, attn: list[int],
             kw: dict[str, Any]) -> dict[str, nn.Module]:
    modules = {}
    for level, (res, width) in enumerate(levels):
        if level == 0:
            modules[f"{res}x{res}_conv"], cin = MPConv(cin, width, kernel=[3, 3]), width
        else:
            modules[f"{res}x{res}_down"] = Block(cin, cin, emb, flavor="enc", resample_mode="down", **kw)
        for i in range(num_blocks):
            modules[f"{res}x{res}_block{i}"], cin = Block(cin, width, emb, flavor="enc", attention=res in attn, **kw), width
    return modules


def _decoder(skips: list[int], levels: list[tuple[int, int]], emb: int, num_blocks: int, attn: list[int],
             kw: dict[str, Any]) -> dict[str, nn.Module]:
    modules, cin = {}, levels[-1][1]
    for level, (res, width) in reversed(list(enumerate(levels))):
        if level == len(levels) - 1:
            modules[f"{res}x{res}_in0"] = Block(cin, cin, emb, flavor="dec", attention=True, **kw)
            modules[f"{res}x{res}_in1"] = Block(cin, cin, emb, flavor="dec", **kw)
        else:
            modules[f"{res}x{res}_up"] = Block(cin, cin, emb, flavor="dec", resample_mode="up", **kw)
        for i in range(num_blocks + 1):
            block = Block(cin + skips.pop(), width, emb, flavor="dec", attention=res in attn, **kw)
            modules[f"{res}x{res}_block{i}"], cin = block, width
    return modules


@persistent
class Precond(nn.Module):
    def __init__(self, img_resolution: int, img_channels: int, label_dim: int, use_fp16: bool = True,
                 sigma_data: float = 0.5, logvar_channels: int = 128, **unet_kwargs: Any) -> None:
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.use_fp16, self.sigma_data = use_fp16, sigma_data
        self.unet = UNet(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim, **unet_kwargs)
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, kernel=[])

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None,
                return_logvar: bool = False) -> Any:
        """D(x, sigma) (docs/algorithms.md, "Network and preconditioning"); class_labels one-hot, None = 0."""
        x, sigma = x.float(), sigma.float().reshape(-1, 1, 1, 1)
        if self.label_dim:
            class_labels = torch.zeros(1, self.label_dim) if class_labels is None else class_labels.float()
        sd2 = self.sigma_data ** 2
        c_skip, c_out, c_in = sd2 / (sigma ** 2 + sd2), sigma * self.sigma_data / (sigma ** 2 + sd2).sqrt(), 1 / (sigma ** 2 + sd2).sqrt()
        c_noise = sigma.flatten().log() / 4
        denoised = c_skip * x + c_out * self.unet(c_in * x, c_noise, class_labels if self.label_dim else None)
        if return_logvar:
            return denoised, self.logvar_linear(self.logvar_fourier(c_noise)).reshape(-1, 1, 1, 1)
        return denoised


# --- encoders (training/encoders.py) and loss (training/training_loop.py) --------------------------

@persistent
class StandardRGBEncoder:
    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__


@persistent
class StabilityVAEEncoder:
    def __init__(self, vae_name: str = "stabilityai/sd-vae-ft-mse", raw_mean: list[float] = [5.81, 3.25, 0.12, -2.15],
                 raw_std: list[float] = [4.17, 4.62, 3.71, 3.28], final_mean: float = 0, final_std: float = 0.5,
                 batch_size: int = 8) -> None:
        self.vae_name, self.batch_size, self._vae = vae_name, int(batch_size), None
        self.scale = np.float32(final_std) / np.float32(raw_std)  # final latents = raw * scale + bias
        self.bias = np.float32(final_mean) - np.float32(raw_mean) * self.scale

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_vae": None}  # the VAE itself is never pickled


@persistent
class EDM2Loss:
    def __init__(self, P_mean: float = -0.4, P_std: float = 1.0, sigma_data: float = 0.5) -> None:
        self.P_mean, self.P_std, self.sigma_data = P_mean, P_std, sigma_data


# --- pickling as torch_utils.persistence does ------------------------------------------------------

def _module(name: str, **members: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    for key, value in members.items():
        value.__module__, value.__qualname__ = name, key
        setattr(module, key, value)
    return module


def _reconstruct_persistent_obj(meta: dict[str, Any]) -> Any:  # the global EDM2's records call
    raise AssertionError("these files are read by pipeline.models.unpickle, which never calls it")


class EasyDict(dict):
    """`dnnlib.util.EasyDict`, pickled by that name (its attribute access is not needed here)."""


EDM2_MODULES = {"torch_utils": types.ModuleType("torch_utils"), "dnnlib": types.ModuleType("dnnlib"),
                "torch_utils.persistence": _module("torch_utils.persistence", _reconstruct_persistent_obj=_reconstruct_persistent_obj),
                "dnnlib.util": _module("dnnlib.util", EasyDict=EasyDict)}


@contextlib.contextmanager
def _edm2_importable() -> Iterator[None]:
    """EDM2's module names in sys.modules while pickling (the pickler checks that its globals import)."""
    added = [name for name in EDM2_MODULES if name not in sys.modules]
    sys.modules.update({name: EDM2_MODULES[name] for name in added})
    try:
        yield
    finally:
        for name in added:
            del sys.modules[name]


class _Pickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, protocol: int | None, module_src: str) -> None:
        super().__init__(file, protocol)
        self.module_src = module_src

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) not in _PERSISTENT:
            return NotImplemented
        meta = {"type": "class", "version": PERSISTENCE_VERSION, "module_src": self.module_src,
                "class_name": type(obj).__name__, "state": obj.__getstate__()}
        return _reconstruct_persistent_obj, (meta,)


def dumps(obj: Any, protocol: int | None = None, module_src: str | None = None) -> bytes:
    """`pickle.dump(obj)` in EDM2's process: each persistent object becomes a call of
    torch_utils.persistence._reconstruct_persistent_obj(meta) with the source of the module that defines
    its class (this one, unless `module_src` says otherwise) and its state."""
    buf = io.BytesIO()
    with _edm2_importable():
        _Pickler(buf, protocol, inspect.getsource(sys.modules[__name__]) if module_src is None else module_src).dump(obj)
    return buf.getvalue()


# --- what EDM2 writes -----------------------------------------------------------------------------

TINY = dict(model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], dropout=0.0)


def precond(seed: int, img_resolution: int = 16, img_channels: int = 3, label_dim: int = 10, **kwargs: Any) -> Precond:
    """A `Precond` made as EDM2's training loop makes it (keyword arguments only), every parameter random
    (gains too, which start at 0, so that every path of the network counts)."""
    torch.manual_seed(seed)
    net = Precond(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim, use_fp16=True,
                  **{**TINY, **kwargs})
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p))
    return net


def snapshot(net: Precond, encoder: Any = None, loss_fn: Any = None, dataset_kwargs: dict | None = None) -> EasyDict:
    """What training_loop.py pickles as `network-snapshot-KKKKKKK-S.SSS.pkl` (and reconstruct_phema.py, a copy
    of it, as a post-hoc reconstruction): the encoder, dataset_kwargs, loss_fn and a float16 copy of an EMA."""
    kwargs = dataset_kwargs or EasyDict(class_name="training.dataset.ImageFolderDataset", path="datasets/img16.zip",
                                        use_labels=True)
    data = EasyDict(encoder=encoder or StandardRGBEncoder(), dataset_kwargs=kwargs, loss_fn=loss_fn or EDM2Loss())
    data["ema"] = copy.deepcopy(net).cpu().eval().requires_grad_(False).to(torch.float16)
    return data


def write(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(dumps(obj))
    return path


def dataset_refs(seed: int, num_images: int = 50, dims: tuple[tuple[str, int], ...] = (("fid", 2048), ("fd_dinov2", 1024))
                 ) -> dict[str, Any]:
    """calculate_metrics.py's dataset refs: {num_images, metric: {mu, sigma}}, float64 numpy arrays, here of
    random features (mu their mean, sigma their unbiased covariance)."""
    rng = np.random.default_rng(seed)
    stats: dict[str, Any] = {"num_images": num_images}
    for metric, dim in dims:
        features = rng.normal(size=(num_images, dim))
        mu = features.mean(0)
        stats[metric] = {"mu": mu, "sigma": (features.T @ features - num_images * np.outer(mu, mu)) / (num_images - 1)}
    return stats


def one_hot(labels: torch.Tensor, label_dim: int) -> torch.Tensor:
    """EDM2's networks take class labels as one-hot vectors; onestep's as indices."""
    return F.one_hot(labels, label_dim).float()


def denoiser(net: Precond) -> Any:
    """EDM2's network, on the float32 of its weights, called as onestep calls a denoiser (labels as indices)."""
    net = copy.deepcopy(net).float().eval()

    def denoise(x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return net(x, sigma, one_hot(labels, net.label_dim) if labels is not None and net.label_dim else None)

    return denoise
