"""Fréchet distance, mergeable feature statistics and the Inception feature extractor
(docs/algorithms.md, "Fréchet distance").

Features are clean-fid's "clean" mode: each image resized to 299x299 by PIL bicubic on float
channels, then the TorchScript Inception-v3 of "inception-2015-12-05.pt" (StyleGAN2-ADA's port
of the TF-slim weights) as clean-fid's InceptionV3W calls it: 2048-d pool features.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import shutil
import socket
import tempfile
from collections.abc import Iterator

import numpy as np
import torch
from cleanfid.downloads_helper import check_download_inception, inception_url
from cleanfid.resize import build_resizer

from pipeline import store

FEATURE_DIM = 2048
CLEAN_FID_FILE = "inception-2015-12-05.pt"
CLEAN_FID_DIR = "./" if platform.system() == "Windows" else "/tmp"  # where clean-fid's feature_extractor keeps it
DOWNLOAD_TIMEOUT_S = 30.0  # per socket operation: no connection fails in this time, not a hang
RANDOM_SEED = 0  # the "random" network's weights: the same in every process


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """|mu1 - mu2|^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)), in float64 (docs/algorithms.md, "Fréchet distance")."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    dim = mu1.shape[0]
    if mu1.shape != (dim,) or mu2.shape != (dim,) or s1.shape != (dim, dim) or s2.shape != (dim, dim):
        raise ValueError(f"shapes differ: mu {mu1.shape} {mu2.shape}, sigma {s1.shape} {s2.shape}")
    trace_sqrt = _trace_sqrt_product(s1, s2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
    """Tr sqrtm(S1 S2) for covariances: S1 S2 is similar to sqrt(S1) S2 sqrt(S1), which is
    symmetric PSD, so the trace is the sum of the square roots of its eigenvalues. Two
    symmetric eigendecompositions instead of a general sqrtm (faster: docs/results.md), and
    exact for the rank-deficient covariances of small samples."""
    root = _psd_sqrt(s1)
    eig = np.linalg.eigvalsh(root @ s2 @ root)
    return float(np.sqrt(np.clip(eig, 0, None)).sum())


class FeatureStats:
    """Running float64 count, sum [D] and sum of outer products [D, D]; mergeable across tasks."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.count = 0
        self.sum = np.zeros(dim, np.float64)
        self.sum_outer = np.zeros((dim, dim), np.float64)

    def add(self, features: np.ndarray) -> None:
        """Accumulate a batch of features [N, D] (any array-like on the CPU)."""
        x = np.asarray(features, np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"features must be [N, {self.dim}], got {x.shape}")
        self.count += x.shape[0]
        self.sum += x.sum(axis=0)
        self.sum_outer += x.T @ x

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        """New stats holding both sets of features."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge stats of dimension {self.dim} and {other.dim}")
        out = FeatureStats(self.dim)
        out.count = self.count + other.count
        out.sum = self.sum + other.sum
        out.sum_outer = self.sum_outer + other.sum_outer
        return out

    __add__ = merge

    def mean(self) -> np.ndarray:
        if self.count < 1:
            raise ValueError("no features added")
        return self.sum / self.count

    def cov(self) -> np.ndarray:
        """Unbiased covariance [D, D] (docs/algorithms.md, "Fréchet distance")."""
        if self.count < 2:
            raise ValueError(f"covariance needs at least 2 features, got {self.count}")
        mu = self.mean()
        return (self.sum_outer - self.count * np.outer(mu, mu)) / (self.count - 1)

    def to_dict(self) -> dict[str, np.ndarray]:
        count = np.array(self.count, np.int64)
        return {"count": count, "sum": self.sum.copy(), "sum_outer": self.sum_outer.copy()}

    @classmethod
    def from_dict(cls, d: dict[str, np.ndarray]) -> "FeatureStats":
        stats = cls(int(np.asarray(d["sum"]).shape[0]))
        stats.count = int(d["count"])
        stats.sum = np.asarray(d["sum"], np.float64).copy()
        stats.sum_outer = np.asarray(d["sum_outer"], np.float64).copy()
        return stats


class InceptionFeatures:
    """2048-d Inception-v3 pool features of uint8 images, preprocessed as clean-fid's "clean" mode."""

    dim = FEATURE_DIM

    def __init__(self, layers: torch.nn.Module, device: str, random: bool) -> None:
        # (x - 128) / 128 at 299x299 -> 2048 values per image; channels_last is faster on a CPU (docs/results.md)
        self.layers = layers.to(device, memory_format=torch.channels_last).eval()
        self.device = device
        self.random = random
        self.resize = build_resizer("clean")  # make_resizer("PIL", False, "bicubic", (299, 299))

    @property
    def metric_name(self) -> str:
        return "FD (random-weight Inception)" if self.random else "FID"

    @torch.no_grad()
    def features(self, images: np.ndarray) -> np.ndarray:
        """uint8 [B, H, W, 3] -> float64 [B, 2048]."""
        assert images.dtype == np.uint8 and images.ndim == 4 and images.shape[-1] == 3, images.shape
        x = np.stack([self.resize(image) for image in images]).transpose(0, 3, 1, 2)  # float32 in [0, 255]
        x = torch.from_numpy(x).to(self.device, memory_format=torch.channels_last)
        out = self.layers((x - 128) / 128).view(len(images), FEATURE_DIM)  # as InceptionV3W.forward
        return out.double().cpu().numpy()


def load_inception(weights: str, device: str = "cpu") -> InceptionFeatures:
    """"clean-fid" (its download cache), a path or fsspec URL of inception-2015-12-05.pt, or "random"."""
    if weights == "random":
        inception = InceptionFeatures(_random_inception(), device, random=True)
    else:
        path = _clean_fid_file() if weights == "clean-fid" else _local_file(weights)
        inception = InceptionFeatures(_torchscript_layers(path, weights), device, random=False)
    _check_output(inception, weights)
    return inception


@functools.lru_cache(maxsize=2)
def worker_inception(weights: str, device: str = "cpu") -> InceptionFeatures:
    """load_inception, kept for the life of the process: a Ray worker that runs several tasks
    (refstats' ranges, then evaluate's) builds the network once, not once per task (~5 s each)."""
    return load_inception(weights, device)


def _weights_error(weights: str, reason: str) -> ValueError:
    return ValueError(
        f"cannot load the Inception network refstats.inception_weights={store.redact(weights)!r}: {reason}. "
        f"Without internet: download {inception_url} on a machine with internet, copy it where every "
        "worker can read it, and set refstats.inception_weights=/path/or/url/inception-2015-12-05.pt "
        "(a local path or fsspec URL); 'random' gives a random-weight network (an FD, not FID)."
    )


def _random_inception() -> torch.nn.Module:
    """torchvision's Inception-v3, seeded random init, fc dropped: 2048-d pool features."""
    from torchvision.models import inception_v3

    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG as it was
        torch.manual_seed(RANDOM_SEED)
        net = inception_v3(weights=None, aux_logits=False, init_weights=True)
        net.fc = torch.nn.Identity()
        _calibrate_batchnorm(net, torch.rand(8, 3, 299, 299) * 2 - 1)
    return net


@torch.no_grad()
def _calibrate_batchnorm(net: torch.nn.Module, x: torch.Tensor) -> None:
    """Set BatchNorm statistics from one fixed batch: with the default running stats (0, 1) a
    random-weight Inception's activations grow to ~1e11 and the Fréchet distance loses precision."""
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: exactly this batch's statistics
    net.train()(x)
    net.eval()


def _clean_fid_file() -> str:
    """clean-fid's cached weights; downloaded once by clean-fid's own function when missing."""
    path = os.path.join(CLEAN_FID_DIR, CLEAN_FID_FILE)
    if os.path.exists(path):
        return path
    partial = tempfile.mkdtemp(dir=CLEAN_FID_DIR, prefix="inception-download-")  # no half file at `path`
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            os.replace(check_download_inception(fpath=partial), path)
    except Exception as e:  # URLError, timeouts, HTTP errors: all end with the same fix
        raise _weights_error("clean-fid", f"clean-fid could not download it ({type(e).__name__}: {e})") from e
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return path


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """clean-fid's urlopen takes no timeout: bound it through the socket default."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def _local_file(weights: str) -> str:
    try:
        return store.local_file(weights, "inception")
    except OSError as e:  # no such file or object, no credentials, an unknown protocol
        raise _weights_error(weights, str(e)) from e


def _torchscript_layers(path: str, weights: str) -> torch.nn.Module:
    """The `layers` submodule of the TorchScript file, which clean-fid's InceptionV3W runs."""
    try:
        module = torch.jit.load(path, map_location="cpu")
    except Exception as e:  # RuntimeError for anything that is not a TorchScript archive
        raise _weights_error(weights, f"{path} is not a TorchScript file ({type(e).__name__}: {e})") from e
    if not hasattr(module, "layers"):
        raise _weights_error(weights, f"{path} has no `layers` submodule: not inception-2015-12-05.pt")
    return module.layers


def _check_output(inception: InceptionFeatures, weights: str) -> None:
    """One black image through the network: a wrong file fails here, not inside a task."""
    try:
        inception.features(np.zeros((1, 8, 8, 3), np.uint8))
    except Exception as e:  # a TorchScript network of another shape
        raise _weights_error(weights, f"its network fails on a 299x299 image ({type(e).__name__}: {e})") from e
