"""EDM2 magnitude-preserving UNet and its preconditioned denoiser (EDM2, Karras et al. 2024).

Pure architecture, no I/O. `build_denoiser` is the entry point; the returned `Denoiser`
maps `(x, sigma, labels) -> x0` with labels as class indices, and exposes the learned
uncertainty `u(sigma)`. Its formulas: docs/algorithms.md, "Magnitude-preserving layers" and
"Network and preconditioning".
"""

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

SIGMA_DATA = 0.5


# --- Magnitude-preserving primitives (docs/algorithms.md, "Magnitude-preserving layers") ---


def normalize(
    x: torch.Tensor, dim: int | tuple[int, ...] | None = None, eps: float = 1e-4
) -> torch.Tensor:
    """x / (eps + rms(x over dim)); dim defaults to all but the first axis."""
    if dim is None:
        dim = tuple(range(1, x.ndim))
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    rms = norm * math.sqrt(norm.numel() / x.numel())  # L2 norm / sqrt(elements reduced)
    return x / (eps + rms).to(x.dtype)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU scaled back to unit magnitude: 0.596 = sqrt(E[silu(z)^2]), z ~ N(0, 1)."""
    return F.silu(x) / 0.596


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """Magnitude-preserving blend ((1-t) a + t b) / sqrt((1-t)^2 + t^2)."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Magnitude-preserving concatenation weighting a by (1-t) and b by t."""
    n_a, n_b = a.shape[dim], b.shape[dim]
    c = math.sqrt((n_a + n_b) / ((1 - t) ** 2 + t**2))
    return torch.cat([a * (c / math.sqrt(n_a) * (1 - t)), b * (c / math.sqrt(n_b) * t)], dim=dim)


def resample(x: torch.Tensor, mode: str = "keep") -> torch.Tensor:
    """`down` = 2x2 average pooling, `up` = nearest-neighbour x2, `keep` = identity."""
    if mode == "down":
        return F.avg_pool2d(x, 2)
    if mode == "up":
        return F.interpolate(x, scale_factor=2, mode="nearest")
    assert mode == "keep", mode
    return x


def cosine_attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Cosine self-attention (EDM2 block, step 5): qkv [B, 3C, H, W] -> [B, C, H, W]. The channels are
    laid out as EDM2's [heads, c_head, 3] (q, k and v interleaved per channel), so its weights load."""
    b, c3, h, w = qkv.shape
    q, k, v = qkv.reshape(b, num_heads, c3 // (3 * num_heads), 3, h * w).unbind(3)
    q, k, v = (normalize(y, dim=2).transpose(2, 3) for y in (q, k, v))  # [B, heads, HW, c_head]
    y = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(c_head)) v
    return y.transpose(2, 3).reshape(b, c3 // 3, h, w)


class MPFourier(nn.Module):
    """Fourier features sqrt(2) cos(x f + phi) with fixed random f and phi, computed in fp32."""

    def __init__(self, num_channels: int) -> None:
        super().__init__()
        self.register_buffer("freq", 2 * math.pi * torch.randn(num_channels))
        self.register_buffer("phase", 2 * math.pi * torch.rand(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B] -> [B, C]
        y = torch.outer(x.float(), self.freq.float()) + self.phase.float()
        return (math.sqrt(2) * torch.cos(y)).to(x.dtype)


class MPConv(nn.Module):
    """Bias-free linear (kernel ()) or conv layer with forced weight normalisation."""

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, ...]) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def forward(self, x: torch.Tensor, gain: float | torch.Tensor = 1.0) -> torch.Tensor:
        w = self.weight.float()
        if self.training:
            with torch.no_grad():
                self.weight.copy_(normalize(w))  # forced weight normalisation
        w = normalize(w) * (gain / math.sqrt(w[0].numel()))  # unit-norm rows times gain
        w = w.to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=w.shape[-1] // 2)


# --- UNet (docs/algorithms.md, "Network and preconditioning"; EDM2, Figure 21) ---


class Block(nn.Module):
    """Residual block, encoder (`enc`) or decoder (`dec`) flavour, with optional attention."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        flavor: str,
        resample_mode: str = "keep",
        attention: bool = False,
        dropout: float = 0.0,
        channels_per_head: int = 64,
        res_balance: float = 0.3,
        attn_balance: float = 0.3,
        clip_act: float = 256.0,
    ) -> None:
        super().__init__()
        assert flavor in ("enc", "dec"), flavor
        self.out_channels = out_channels
        self.flavor, self.resample_mode, self.dropout = flavor, resample_mode, dropout
        self.res_balance, self.attn_balance, self.clip_act = res_balance, attn_balance, clip_act
        self.num_heads = max(out_channels // channels_per_head, 1) if attention else 0
        if self.num_heads and out_channels % self.num_heads:
            raise ValueError(f"attention needs channels divisible by the heads, got {out_channels}")
        self.emb_gain = nn.Parameter(torch.zeros([]))
        res0_in = out_channels if flavor == "enc" else in_channels  # enc: skip conv comes first
        self.conv_res0 = MPConv(res0_in, out_channels, (3, 3))
        self.emb_linear = MPConv(emb_channels, out_channels, ())
        self.conv_res1 = MPConv(out_channels, out_channels, (3, 3))
        skip = in_channels != out_channels
        self.conv_skip = MPConv(in_channels, out_channels, (1, 1)) if skip else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, (1, 1)) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, (1, 1)) if self.num_heads else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = resample(x, self.resample_mode)
        if self.flavor == "enc":
            x = normalize(self.conv_skip(x) if self.conv_skip else x, dim=1)  # pixel norm
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1  # [B, C]
        y = mp_silu(y * c[:, :, None, None].to(y.dtype))
        if self.dropout:
            y = F.dropout(y, p=self.dropout, training=self.training)
        y = self.conv_res1(y)
        if self.flavor == "dec" and self.conv_skip:
            x = self.conv_skip(x)
        x = mp_sum(x, y, self.res_balance)
        if self.num_heads:
            y = self.attn_proj(cosine_attention(self.attn_qkv(x), self.num_heads))
            x = mp_sum(x, y, self.attn_balance)
        return x.clip(-self.clip_act, self.clip_act)


Levels = list[tuple[int, int]]  # (resolution, width) per UNet level, highest resolution first


def _encoder(
    cin: int, levels: Levels, num_blocks: int, attn: list[int], **kw: Any
) -> nn.ModuleDict:
    """Per level: a 3x3 conv (first level) or a `down` block, then num_blocks blocks."""
    enc = nn.ModuleDict()
    for level, (res, width) in enumerate(levels):
        at = f"{res}x{res}"
        if level == 0:
            enc[f"{at}_conv"] = MPConv(cin, width, (3, 3))
            cin = width
        else:
            enc[f"{at}_down"] = Block(cin, cin, flavor="enc", resample_mode="down", **kw)
        for i in range(num_blocks):
            enc[f"{at}_block{i}"] = Block(cin, width, flavor="enc", attention=res in attn, **kw)
            cin = width
    return enc


def _decoder(
    skips: list[int], levels: Levels, num_blocks: int, attn: list[int], **kw: Any
) -> nn.ModuleDict:
    """Lowest level: in0 (attention) and in1, other levels an `up` block; then num_blocks + 1."""
    dec, cin = nn.ModuleDict(), levels[-1][1]
    for level, (res, width) in reversed(list(enumerate(levels))):
        at = f"{res}x{res}"
        if level == len(levels) - 1:
            dec[f"{at}_in0"] = Block(cin, cin, flavor="dec", attention=True, **kw)
            dec[f"{at}_in1"] = Block(cin, cin, flavor="dec", **kw)
        else:
            dec[f"{at}_up"] = Block(cin, cin, flavor="dec", resample_mode="up", **kw)
        for i in range(num_blocks + 1):  # input: mp_cat(x, skip)
            cin += skips.pop()
            dec[f"{at}_block{i}"] = Block(cin, width, flavor="dec", attention=res in attn, **kw)
            cin = width
    return dec


class UNet(nn.Module):
    """EDM2 UNet F(x, c_noise, labels); labels are class indices [B] or None."""

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        num_classes: int,
        channels: int,
        channel_mult: list[int],
        num_blocks: int,
        attn_resolutions: list[int],
        dropout: float,
        label_balance: float = 0.5,
        concat_balance: float = 0.5,
    ) -> None:
        super().__init__()
        widths = [channels * m for m in channel_mult]
        emb_channels = channels * max(channel_mult)
        self.num_classes = num_classes
        self.label_balance, self.concat_balance = label_balance, concat_balance
        self.emb_fourier = MPFourier(channels)
        self.emb_noise = MPConv(channels, emb_channels, ())
        self.emb_label = MPConv(num_classes, emb_channels, ()) if num_classes else None
        kw = dict(emb_channels=emb_channels, dropout=dropout)
        levels = [(img_resolution >> level, width) for level, width in enumerate(widths)]
        cin = img_channels + 1  # one constant channel of ones
        self.enc = _encoder(cin, levels, num_blocks, attn_resolutions, **kw)
        skips = [m.out_channels for m in self.enc.values()]
        self.dec = _decoder(skips, levels, num_blocks, attn_resolutions, **kw)
        self.out_gain = nn.Parameter(torch.zeros([]))
        self.out_conv = MPConv(widths[0], img_channels, (3, 3))

    def embedding(self, c_noise: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Noise (and class) embedding [B, emb_channels]; missing labels = zero label vector."""
        emb = self.emb_noise(self.emb_fourier(c_noise))
        if self.emb_label is not None:
            onehot = torch.zeros_like(emb[:, :1]).expand(-1, self.num_classes)
            if labels is not None:
                onehot = F.one_hot(labels, self.num_classes).to(emb.dtype)
            emb_label = self.emb_label(onehot * math.sqrt(self.num_classes))
            emb = mp_sum(emb, emb_label, self.label_balance)
        return mp_silu(emb)

    def forward(
        self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None, return_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """F(x); with return_features also the encoder's outputs, one per encoder module from the input
        resolution down to the bottleneck (the last, [B, C, H / 2^(levels-1), W / 2^(levels-1)]): DMD2's
        discriminator head reads the bottleneck, a multi-level head all of them."""
        emb = self.embedding(c_noise, labels)
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for module in self.enc.values():
            x = module(x) if isinstance(module, MPConv) else module(x, emb)
            skips.append(x)
        features = list(skips) if return_features else None  # the decoder pops skips
        for name, block in self.dec.items():
            if "_block" in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = block(x, emb)
        out = self.out_conv(x, gain=self.out_gain)
        return (out, features) if return_features else out


# --- Preconditioning (docs/algorithms.md, "Network and preconditioning") ---


class Denoiser(nn.Module):
    """D(x, sigma, labels) = c_skip x + c_out F(c_in x, c_noise, labels); uncertainty u(sigma).

    `config` holds the keyword arguments of `build_denoiser` that rebuild this architecture.
    A model with num_classes = 0 is unconditional and ignores `labels`, so it can be called
    like a conditional one (e.g. as a guiding network).
    """

    def __init__(
        self,
        unet: UNet,
        config: dict[str, Any],
        sigma_data: float = SIGMA_DATA,
        u_channels: int = 128,
    ) -> None:
        super().__init__()
        self.unet, self.config, self.sigma_data = unet, config, sigma_data
        self.img_resolution = config["img_resolution"]
        self.img_channels = config["img_channels"]
        self.num_classes = config["num_classes"]
        self.u_fourier = MPFourier(u_channels)
        self.u_linear = MPConv(u_channels, 1, ())

    def forward(
        self, x: torch.Tensor, sigma: float | torch.Tensor, labels: torch.Tensor | None = None,
        return_u: bool = False, return_features: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """x [B, C, H, W], sigma scalar or [B], labels [B] class indices or None -> x0.

        With return_u also u(sigma) [B], computed inside forward so that DDP sees its use; with
        return_features also the UNet encoder's outputs, a list ending at the bottleneck: (x0, [u,] features).
        """
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        sigma = sigma.reshape(-1, 1, 1, 1).expand(x.shape[0], 1, 1, 1)
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / (sigma**2 + sd2).sqrt()
        c_in = 1 / (sigma**2 + sd2).sqrt()
        c_noise = sigma.log().flatten() / 4
        out = self.unet(c_in * x, c_noise, labels, return_features=return_features)
        f, features = out if return_features else (out, None)
        x0 = c_skip * x + c_out * f
        extra = ((self.u(sigma.flatten()),) if return_u else ()) + ((features,) if return_features else ())
        return (x0, *extra) if extra else x0

    def u(self, sigma: float | torch.Tensor) -> torch.Tensor:
        """Learned uncertainty (log-variance) u(sigma) [B] for sigma [B] (or a scalar -> [1])."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=self.u_fourier.freq.device)
        c_noise = sigma.log().reshape(-1) / 4
        return self.u_linear(self.u_fourier(c_noise)).reshape(-1)


# --- Presets (docs/algorithms.md, "Network and preconditioning") and the factory ---


@dataclasses.dataclass(frozen=True)
class Architecture:
    """The preset-dependent UNet hyper-parameters; each field is also an override."""

    channels: int
    dropout: float
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)
    num_blocks: int = 3
    attn_resolutions: tuple[int, ...] = (16, 8)


PRESETS: dict[str, Architecture] = {
    "XS": Architecture(channels=128, dropout=0.0),
    "S": Architecture(channels=192, dropout=0.0),
    "M": Architecture(channels=256, dropout=0.1),
    "L": Architecture(channels=320, dropout=0.1),
    "XL": Architecture(channels=384, dropout=0.1),
    "XXL": Architecture(channels=448, dropout=0.1),
    "ci": Architecture(32, 0.0, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,)),
    "demo": Architecture(64, 0.0, channel_mult=(1, 2, 2), num_blocks=2, attn_resolutions=(8,)),
}


def build_denoiser(
    preset: str, img_resolution: int, img_channels: int, num_classes: int, **overrides: Any
) -> Denoiser:
    """EDM2 denoiser from a preset name (PRESETS) with optional architecture overrides."""
    if preset not in PRESETS:
        raise ValueError(f"unknown EDM2 preset {preset!r}; choose one of {list(PRESETS)}")
    fields = [f.name for f in dataclasses.fields(Architecture)]
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"unknown EDM2 override(s) {unknown}; valid overrides are {fields}")
    arch = dataclasses.replace(PRESETS[preset], **overrides)
    if img_resolution % 2 ** (len(arch.channel_mult) - 1):
        raise ValueError(
            f"img_resolution {img_resolution} must be divisible by 2^(len(channel_mult) - 1)"
        )
    config = dict(
        preset=preset,
        img_resolution=int(img_resolution),
        img_channels=int(img_channels),
        num_classes=int(num_classes),
        channels=int(arch.channels),
        channel_mult=[int(m) for m in arch.channel_mult],
        num_blocks=int(arch.num_blocks),
        attn_resolutions=[int(r) for r in arch.attn_resolutions],
        dropout=float(arch.dropout),
    )
    unet_kwargs = {k: v for k, v in config.items() if k != "preset"}
    return Denoiser(UNet(**unet_kwargs), config)
