"""The paper-scale presets: they load with the papers' values, and their networks have the papers'
parameter counts (docs/algorithms.md, "Network and preconditioning")."""

import pytest
import torch

from pipeline import config as C
from pipeline.models.edm2 import build_denoiser

PAPER = {  # preset -> (network, parameters in millions, P_mean, P_std, lr, t_ref, training images, latent channels, resolution)
    "edm2-img512-xs": ("XS", 124.7, -0.4, 1.0, 0.0120, 70000, 2048 << 20, 4, 64),
    "edm2-img512-s": ("S", 280.2, -0.4, 1.0, 0.0100, 70000, 2048 << 20, 4, 64),
    "edm2-img64-s": ("S", 280.2, -0.8, 1.6, 0.0100, 35000, 1024 << 20, 3, 64),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_presets_have_the_papers_values(name):
    network, millions, p_mean, p_std, lr, t_ref, nimg, channels, resolution = PAPER[name]
    cfg = C.load_config(name)
    t = cfg.teacher
    assert (t.preset, t.P_mean, t.P_std, t.lr, t.lr_decay_batches, t.duration_nimg, t.batch) == (
        network, p_mean, p_std, lr, t_ref, nimg, 2048)
    assert cfg.encode.source == "imagenet" and t.use_gpu and t.batch % t.num_workers == 0
    d = cfg.distill
    assert (d.lr, d.batch, d.grad_clip, d.lpips_net, d.lpips_pretrained) == (2e-6, 336, 10.0, "vgg", True)
    assert (cfg.pairs.num_pairs, cfg.pairs.num_steps) == (25000, 256) and cfg.pairs.sigma_rel in cfg.phema.sigma_rels
    assert (cfg.refstats.inception_weights, cfg.refstats.dinov2_weights, cfg.eval.num_images) == ("clean-fid", "hub", 50000)
    latent = cfg.encode.encoder == "vae"
    assert (4 if latent else 3, cfg.encode.resolution // (8 if latent else 1)) == (channels, resolution)
    with torch.device("meta"):  # shapes only: no memory for 280M parameters
        net = build_denoiser(t.preset, resolution, channels, 1000)
    assert sum(p.numel() for p in net.parameters()) / 1e6 == pytest.approx(millions, abs=0.05)


def test_the_defaults_are_a_valid_config():
    """Every section's defaults (the papers' values) validate: a YAML that leaves a section out works."""
    cfg = C.Config()
    assert cfg.distill.duration_nimg % cfg.distill.batch == 0 and cfg.teacher.duration_nimg == 2048 << 20
