"""The DINOv2 feature network of FD_DINOv2 (EDM2, Karras et al. 2024, "Analyzing and Improving the
Training Dynamics of Diffusion Models"; docs/algorithms.md, "Fréchet distance").

Features are DINOv2 ViT-L/14's final-LayerNorm'd CLS token (1024-d) of each image after EDM2's
preprocessing: bicubic antialiased resize to 224x224, [0, 1], ImageNet mean/std. The network is
timm's VisionTransformer at 224x224 (16x16 patches), with the position embedding of the 518x518
weights resampled once at load time exactly as the official DINOv2 model does at run time.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import timm
import torch
import torch.nn.functional as F
from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url, try_to_load_from_cache
from safetensors.torch import load_file

from pipeline import store

DINOV2_DIM = 1024
HUB_ID = "timm/vit_large_patch14_dinov2.lvd142m"  # timm's port of the official weights on the HF hub
HUB_FILE = "model.safetensors"
OFFICIAL_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth"
TIMM_MODEL = "vit_large_patch14_dinov2"
IMG_SIZE = 224  # EDM2 resizes every image to this
GRID = IMG_SIZE // 14  # 16x16 patches of 14 pixels
INTERPOLATE_OFFSET = 0.1  # official DINOv2's historical offset in the position-embedding scale factor
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Dinov2Features:
    """1024-d DINOv2 ViT-L/14 CLS features of uint8 images, preprocessed as EDM2's FD_DINOv2."""

    dim = DINOV2_DIM
    name = "dinov2"  # metric keys: fd_dinov2

    def __init__(self, model: torch.nn.Module, device: str) -> None:
        self.model = model.to(device).eval()
        self.device = device
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    @torch.no_grad()
    def features(self, images: np.ndarray) -> np.ndarray:
        """uint8 [B, H, W, 3] -> float64 [B, 1024]."""
        assert images.dtype == np.uint8 and images.ndim == 4 and images.shape[-1] == 3, images.shape
        x = torch.from_numpy(images).to(self.device).permute(0, 3, 1, 2).float()  # [B, 3, H, W] in [0, 255]
        x = F.interpolate(x, size=(IMG_SIZE, IMG_SIZE), mode="bicubic", antialias=True) / 255
        return self.model((x - self.mean) / self.std).double().cpu().numpy()


def load_dinov2(weights: str, device: str = "cpu") -> Dinov2Features:
    """"hub" (HF hub cache), or a path or fsspec URL of timm's model.safetensors or the official
    dinov2_vitl14_pretrain.pth."""
    path = _hub_file() if weights == "hub" else _local_file(weights)
    dinov2 = Dinov2Features(_vit(_state_dict(path, weights), path, weights), device)
    _check_output(dinov2, weights)
    return dinov2


@functools.lru_cache(maxsize=2)
def worker_dinov2(weights: str, device: str = "cpu") -> Dinov2Features:
    """load_dinov2, kept for the life of the process: a Ray worker that runs several tasks builds
    the network once, not once per task."""
    return load_dinov2(weights, device)


def resample_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """[1, 1 + M*M, C] -> [1, 1 + grid*grid, C] as official DINOv2's interpolate_pos_encoding for a
    (14 grid) x (14 grid) input: bicubic in float32 with scale (grid + 0.1) / M, no antialias; CLS kept."""
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:]
    side = math.isqrt(patches.shape[1])
    assert side * side == patches.shape[1], pos_embed.shape
    if side == grid:
        return pos_embed
    x = patches.float().reshape(1, side, side, -1).permute(0, 3, 1, 2)  # [1, C, M, M]
    scale = (grid + INTERPOLATE_OFFSET) / side
    x = F.interpolate(x, scale_factor=(scale, scale), mode="bicubic", antialias=False)
    assert x.shape[-2:] == (grid, grid), x.shape
    return torch.cat([cls, x.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(pos_embed.dtype)], dim=1)


def _weights_error(weights: str, reason: str) -> ValueError:
    return ValueError(
        f"cannot load the DINOv2 network refstats.dinov2_weights={store.redact(weights)!r}: {reason}. "
        f"Without internet: on a machine with internet download {HUB_FILE} of the Hugging Face model "
        f"{HUB_ID} (or the official {OFFICIAL_URL}), copy it where every worker can read it, and set "
        "refstats.dinov2_weights=/path/or/url/model.safetensors (a local path or fsspec URL)."
    )


def _hub_file() -> str:
    """timm's weights through the HF hub cache: downloaded once, offline afterwards. Without a
    connection one HEAD request fails at once (hf_hub_download alone retries for ~25 s)."""
    try:
        cached = try_to_load_from_cache(HUB_ID, HUB_FILE)
        if isinstance(cached, str):
            return cached
        get_hf_file_metadata(hf_hub_url(HUB_ID, HUB_FILE))  # one try, no retries
        return hf_hub_download(HUB_ID, HUB_FILE)
    except Exception as e:  # offline mode, no connection, HTTP errors: all end with the same fix
        raise _weights_error("hub", f"cannot download {HUB_FILE} of {HUB_ID} ({type(e).__name__}: {e})") from e


def _local_file(weights: str) -> str:
    try:
        return store.local_file(weights, "dinov2")
    except OSError as e:  # no such file or object, no credentials, an unknown protocol
        raise _weights_error(weights, str(e)) from e


def _state_dict(path: str, weights: str) -> dict[str, torch.Tensor]:
    """Float32 tensors of timm's safetensors file or of the official torch state dict."""
    try:
        if path.endswith(".safetensors"):
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a safetensors / torch file, or one holding arbitrary objects
        raise _weights_error(weights, f"cannot read {path} ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise _weights_error(weights, f"{path} is not a state dict (a dict of tensors)")
    state.pop("mask_token", None)  # the official file's masked-image-modeling token: unused here
    return {k: v.float() for k, v in state.items()}


def _vit(state: dict[str, torch.Tensor], path: str, weights: str) -> torch.nn.Module:
    """timm's ViT-L/14 at 224x224 holding `state`, position embedding resampled to 16x16."""
    with torch.device("meta"):  # no random init of 304M parameters: every one is assigned below
        model = timm.create_model(TIMM_MODEL, pretrained=False, img_size=IMG_SIZE, num_classes=0)
    pos_embed = state.get("pos_embed")
    patches = pos_embed.shape[1] - 1 if pos_embed is not None and pos_embed.ndim == 3 else 0
    if patches < 1 or math.isqrt(patches) ** 2 != patches:
        raise _weights_error(weights, f"{path} has no pos_embed [1, 1 + M*M, C]: not DINOv2 ViT-L/14 weights")
    state["pos_embed"] = resample_pos_embed(pos_embed, GRID)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:  # missing, unexpected or wrongly shaped parameters
        raise _weights_error(weights, f"{path} is not DINOv2 ViT-L/14 weights ({e})") from e
    return model


def _check_output(dinov2: Dinov2Features, weights: str) -> None:
    """One black image through the network: a wrong file fails here, not inside a task."""
    try:
        dinov2.features(np.zeros((1, 8, 8, 3), np.uint8))
    except Exception as e:  # e.g. a network moved to a device that cannot run it
        raise _weights_error(weights, f"its network fails on a 224x224 image ({type(e).__name__}: {e})") from e
