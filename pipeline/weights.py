"""The files a network is stored as: `{name}.safetensors` (weights) + `{name}.json` (the config
that rebuilds it), for denoisers (teacher, phema variants, student) and the probe classifier.

Training, evaluation and the EDM2 importer all read and write through here; nothing in it trains.
"""

from __future__ import annotations

import io

import numpy as np
import safetensors.torch
import torch

from pipeline import store
from pipeline.metrics.probe import ProbeNet
from pipeline.metrics.validation import Reference
from pipeline.models.edm2 import Denoiser, build_denoiser


def weights_bytes(state: dict[str, torch.Tensor]) -> bytes:
    return safetensors.torch.save({k: v.detach().cpu().contiguous() for k, v in state.items()})


def read_weights(url: str) -> dict[str, torch.Tensor]:
    """A safetensors file (network, snapshot, variant); a damaged one is an error naming it and the fix."""
    data = store.read_bytes(url)  # checked against its manifest's checksum, once committed
    try:
        return safetensors.torch.load(data)
    except (safetensors.SafetensorError, ValueError) as e:
        raise store.ChecksumMismatch(f"{store.redact(url)} cannot be read ({type(e).__name__}: {e}): it is damaged; "
                                     f"{store.damage_hint(url)}") from e


def save_network(artifact: store.Artifact, name: str, net: Denoiser, state: dict[str, torch.Tensor] | None = None) -> None:
    """`{name}.safetensors` (weights) and `{name}.json` (the config that rebuilds the network)."""
    with artifact.open(f"{name}.safetensors", "wb") as f:
        f.write(weights_bytes(net.state_dict() if state is None else state))
    artifact.write_json(f"{name}.json", net.config)


def load_denoiser(where: store.Artifact | str, name: str = "network", weights: str | None = None) -> Denoiser:
    """The network saved by `save_network` in an artifact or any folder (a path or fsspec URL): `forward(x, sigma,
    labels) -> x0` in float32, in eval mode; `weights` another file of the same config (a phema variant)."""
    artifact = store.Artifact(store.normalize_url(where)) if isinstance(where, str) else where
    net = build_denoiser(**artifact.read_json(f"{name}.json"))
    net.load_state_dict(read_weights(artifact.path(weights or f"{name}.safetensors")))
    return net.eval().requires_grad_(False)


def load_probe(artifact: store.Artifact) -> ProbeNet:
    """The trained probe of a probe artifact, in eval mode."""
    net = ProbeNet(**artifact.read_json("probe.json"))
    net.load_state_dict(read_weights(artifact.path("probe.safetensors")))
    return net.eval().requires_grad_(False)


def load_reference(artifact: store.Artifact) -> Reference:
    """The probe's statistics of the training images, that fd_probe is measured against."""
    ref = np.load(io.BytesIO(artifact.read_bytes("reference.npz")))
    return Reference(ref["mu"], ref["sigma"])
