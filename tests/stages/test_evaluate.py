"""The evaluate stage on a tiny ci run: the probe's metrics, FID with a random-weight Inception saved to a
file and loaded by path, the real row, per-class grids, and task sums that reduce to one pass."""

import importlib.util
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from helpers import save_random_inception
from PIL import Image

from pipeline import config as C
from pipeline import dag, store
from pipeline.evaluation import EvalJob, Model, evaluate_range
from pipeline.executor import InlineExecutor
from pipeline.metrics.fid import FeatureStats, frechet_distance
from pipeline.report import BLOCK_GAP, CELL_GAP, METRICS, MIN_CELL
from pipeline.seeds import counts_per_class

TINY = ["encode.num_images=80", "encode.shard_size=40", "teacher.channels=16", "teacher.batch=4",
        "teacher.snapshot_nimg=8", "teacher.checkpoint_nimg=16", "teacher.duration_nimg=32",
        "teacher.log_nimg=8", "teacher.lr_rampup_nimg=0", "teacher.shuffle_buffer=32",
        "phema.sigma_rels=[0.05,0.1]", "pairs.num_pairs=8", "pairs.num_steps=2", "pairs.pairs_per_shard=8",
        "distill.batch=8", "distill.reg_batch=8", "distill.duration_nimg=16", "distill.checkpoint_nimg=16",
        "distill.log_nimg=8", "distill.lpips_size=32", "refstats.num_images=16", "probe.holdout=0.5",
        "eval.num_images=12", "eval.images_per_task=5", "eval.num_steps=3", "eval.grid_rows=4", "eval.grid_columns=3",
        "eval.batch=4"]


def _seedsets():
    """workflows/seedsets.py, a script beside the package, loaded from its file."""
    path = Path(__file__).resolve().parents[2] / "workflows" / "seedsets.py"
    spec = importlib.util.spec_from_file_location("seedsets", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _artifact(cfg: C.Config, stage: str) -> store.Artifact:
    return store.Store(cfg.storage).artifact(stage, dag.cache_keys(dag.graph(), cfg)[stage])


@pytest.mark.slow
def test_evaluate_reports_every_model_and_the_real_row(tmp_path):
    weights = save_random_inception(tmp_path / "inception.pt")
    cfg = C.load_config("ci", [*TINY, f"refstats.inception_weights={weights}"], storage=str(tmp_path / "store"))
    dag.run(cfg, until="evaluate", executor=InlineExecutor())
    art = _artifact(cfg, "evaluate")
    out = art.manifest()["outputs"]
    assert out["metric"] == "fd_inception" and out["num_images"] == 12
    rows = out["models"]
    assert [(r["model"], r["sigma_rel"], r["nfe"], r["count"]) for r in rows] == [
        ("teacher", 0.05, 5, 12), ("teacher", 0.1, 5, 12), ("student", None, 1, 12), ("real", None, 0, 12)]
    for r in rows:
        assert set(METRICS) <= set(r) and r["fd_dinov2"] is None  # not configured: a key, with no value
        assert all(np.isfinite(r[k]) for k in ("fd_probe", "class_accuracy", "precision", "recall", "fd_inception"))
    assert out["best_sigma_rel"] == min(rows[:2], key=lambda r: r["fd_inception"])["sigma_rel"]
    assert out["student_over_best_teacher"] == round(rows[2]["fd_inception"] / min(r["fd_inception"] for r in rows[:2]), 4)
    # The real row is the probe's held-out images: its class accuracy is the probe's on the same images.
    probe = _artifact(cfg, "probe").manifest()["outputs"]
    assert probe["holdout_images"] >= 12
    assert art.read_json("results.json") == rows
    md = store.read_bytes(art.path("report.md")).decode()
    html = store.read_bytes(art.path("report.html")).decode()
    assert "Best teacher EMA length by FID" in md and "| FD probe | class accuracy | precision | recall | FID |" in md
    assert "real (held-out)" in html and "<table>" in html and "dinov2: not computed" in md
    kept = _artifact(cfg, "distill").manifest()["outputs"]["student"]["nimg"]
    assert f"The student is distill's generator after {kept:,} of 16 images (the best of its 2 validations" in md
    teacher = _artifact(cfg, "pairs").manifest()["outputs"]["teacher"]
    assert f"Its teacher is the phema variant sigma_rel {teacher['sigma_rel']:g}, chosen by {teacher['chosen_by']}." in md
    for png in ("plots/metric-fd_inception.png", "plots/teacher-loss.png", "plots/distill-loss_reg.png"):
        assert Image.open(art.path(png)).size[0] > 300 and f"src='{png}'" in html
    # One class per row (classes 0, 3, 6, 9), 3 samples each, then a gap and the real images beside.
    cell = 16 * -(-MIN_CELL // 16)  # 16-px samples enlarged, pixels kept sharp
    assert Image.open(art.path(rows[0]["grid"])).size[1] == 4 * cell + 3 * CELL_GAP
    assert Image.open(art.path(rows[0]["grid"])).size[0] > 3 * cell + 2 * CELL_GAP + BLOCK_GAP

    # The reduced task sums equal one pass over all 12 seeds, and the metrics are recomputed from it.
    phema, refstats = _artifact(cfg, "phema"), _artifact(cfg, "refstats")
    encode = _artifact(cfg, "encode").manifest()["outputs"]
    model = Model("teacher", phema, "phema-0.0500.safetensors", 0.05, 3)
    job = EvalJob([model], encode["encoder"], {"inception": weights}, _artifact(cfg, "probe"), {}, [], [0], 1, 12,
                  cfg.seed, "cpu", counts_per_class(encode["class_counts"], encode["num_classes"]))
    whole = evaluate_range(job, (0, 0, 12))
    stats = FeatureStats.from_dict(whole["stats"]["inception"])
    ref = np.load(refstats.path("inception.npz"))
    fd = frechet_distance(stats.mean(), stats.cov(), ref["mu"], ref["sigma"])
    assert np.isclose(fd, rows[0]["fd_inception"], rtol=1e-4), (fd, rows[0]["fd_inception"])
    assert whole["correct"] / whole["labelled"] == rows[0]["class_accuracy"]

    # workflows/seedsets.py: its first seed set is evaluate's own, figure for figure; the second, other seeds.
    seedsets = _seedsets()
    sets = seedsets.measure(cfg, 2)
    assert [r["label"] for r in sets] == [r["label"] for r in rows[:3]]
    for got, want in zip(sets, rows):
        first, second = got["sets"]
        assert first["class_accuracy"] == want["class_accuracy"] and first["count"] == second["count"] == 12
        for metric in ("fd_probe", "precision", "recall"):
            assert np.isclose(first[metric], want[metric], rtol=1e-6), (got["label"], metric, first[metric], want[metric])
        assert second["fd_probe"] != first["fd_probe"]
    means = {r["label"]: np.mean([s["fd_probe"] for s in r["sets"]]) for r in sets}
    best = min(means[r["label"]] for r in sets[:2])
    assert f"mean fd_probe: {means[sets[2]['label']] / best:.2f}x" in seedsets.table(sets)

    # Without the probe: no real row, no probe metrics, no validation in distill; the teacher is not retrained.
    off = replace(cfg, probe=replace(cfg.probe, enabled=False), pairs=replace(cfg.pairs, select="fixed"),
                  distill=replace(cfg.distill, val_every_nimg=0, keep="last"))
    plan = dag.run(off, until="evaluate", executor=InlineExecutor())
    assert plan.to_run == ["probe", "pairs", "distill", "evaluate"]
    rows = _artifact(off, "evaluate").manifest()["outputs"]["models"]
    assert [r["model"] for r in rows] == ["teacher", "teacher", "student"]
    assert all(r["fd_probe"] is None and r["fd_inception"] > 0 for r in rows)
