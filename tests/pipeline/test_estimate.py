"""`--dry-run`'s cost table: closed forms of each stage's work and storage, GPU-hours from the preset's
rates, rates that agree with the derivation their label states, and the table in the CLI's output."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline import cli
from pipeline import config as C
from pipeline import estimate as E
from pipeline.models.edm2 import build_denoiser

MI = 1 << 20


def _costs(preset: str, *overrides: str) -> dict[str, E.Cost]:
    return {c.stage: c for c in E.costs(C.load_config(preset, list(overrides)))}


def test_each_stage_costs_what_its_settings_say():
    c = _costs("edm2-img512-s")
    assert c["encode"].storage_bytes == E.IMAGENET_TRAIN * 8 * 64 * 64 * 2  # latent mean + std, float16
    assert c["encode"].gpu_s == pytest.approx(E.IMAGENET_TRAIN / 354)
    assert c["teacher"].gpu_s == pytest.approx(2048 * MI / 654)  # 2048 Mi images at 654 img/s
    assert c["pairs"].denoiser_evals == 25000 * 511  # 256 Heun steps: 2 * 256 - 1 evaluations
    assert c["pairs"].storage_bytes == 25000 * 2 * 4 * 64 * 64 * 4  # noise and target, float32
    params = E.num_parameters(C.load_config("edm2-img512-s"))
    assert params / 1e6 == pytest.approx(280.2, abs=0.05)
    assert c["phema"].storage_bytes == 6 * params * 4
    snapshots = 2048 * MI // (8 * MI) * 2
    assert c["teacher"].storage_bytes == snapshots * params * 4 + 2 * params * 4 * 5 + params * 4

    chosen = _costs("edm2-img512-s", "pairs.select=best", "pairs.select_images=1000")["pairs"]
    assert chosen.denoiser_evals == (25000 + 6 * 1000) * 511  # six variants sample 1,000 images each
    guided = _costs("edm2-release-img512-s")  # guidance 1.4: the guide's evaluation too
    assert guided["pairs"].denoiser_evals == 2 * 25000 * 511
    assert _costs("edm2-release-img512-s", "pairs.select=best")["pairs"].denoiser_evals == 2 * 25000 * 511  # one variant
    assert guided["teacher"].gpu_s == 0 and guided["phema"].storage_bytes == params * 4
    steps = 25599840 // 336
    dmd2 = _costs("edm2-img64-s", "distill.fake_updates_per_gen=5")["distill"].denoiser_evals
    dmd = _costs("edm2-img64-s")["distill"].denoiser_evals
    assert dmd2 - dmd == steps * 4 * 4 * 336  # four more fake-score updates, each on a fresh G forward
    assert _costs("edm2-img64-s")["refstats"].gpu_s == 0  # pixels: no decoder


def test_a_rate_not_stated_shows_no_gpu_hours():
    c = _costs("ci")
    assert c["teacher"].gpu_s is None and c["encode"].gpu_s == 0  # ci trains, but states no rates; rgb needs no VAE
    table = E.table(C.load_config("ci"))
    assert "no per-GPU rates stated" in table and "(rates not stated" in table.splitlines()[-1]
    with pytest.raises(ValueError, match="estimate.train_img_per_s = -1.0"):
        C.load_config("ci", ["estimate.train_img_per_s=-1"])


@pytest.mark.parametrize("preset", ["edm2-img512-s", "edm2-img512-xs", "edm2-img64-s"])
def test_the_presets_rates_are_what_their_label_says(preset):
    """The presets' rates are labelled as derived from FLOPs at 40% of the H100's 989 TFLOP/s: check that
    derivation against the network's FLOPs counted here."""
    cfg = C.load_config(preset)
    assert "derived" in cfg.estimate.basis and "not measured" in cfg.estimate.basis
    channels, resolution = E.model_shape(cfg)
    with torch.device("meta"):
        net = build_denoiser(cfg.teacher.preset, resolution, channels, 1000)
        with FlopCounterMode(display=False) as counter:
            net(torch.randn(1, channels, resolution, resolution), torch.ones(1), torch.zeros(1, dtype=torch.long))
    per_s = 0.4 * 989e12 / counter.get_total_flops()
    assert cfg.estimate.denoiser_img_per_s == pytest.approx(per_s, rel=0.01)
    assert cfg.estimate.train_img_per_s == pytest.approx(per_s / 3, rel=0.01)


def test_dry_run_prints_the_cost_of_what_would_run(tmp_path, capsys):
    assert cli.main(["run", "--config", "ci", "--storage", str(tmp_path), "--dry-run",
                     "--set", "estimate.train_img_per_s=0.01", "--set", "estimate.denoiser_img_per_s=1000"]) == 0
    out = capsys.readouterr().out
    table = out[out.index("estimate at per-GPU rates"):].splitlines()
    assert [line.split()[0] for line in table[2:]] == ["encode", "probe", "refstats", "teacher", "phema", "pairs",
                                                       "distill", "evaluate", "total"]
    teacher = next(line for line in table if line.startswith("teacher"))
    assert "28.4" in teacher.split()  # 1024 training images at 0.01 img/s: 28.4 hours
    assert not list(tmp_path.iterdir())  # nothing ran, nothing was written
