"""The evaluate stage on a tiny ci run, with a random-weight Inception saved to a file and loaded by path."""


import numpy as np
from helpers import save_random_inception
from PIL import Image

from pipeline import config as C
from pipeline import dag, store
from pipeline.executor import InlineExecutor
from pipeline.metrics.fid import FeatureStats, frechet_distance, load_inception
from stages.evaluate import EvalJob, Model, evaluate_range

TINY = ["encode.num_images=32", "encode.shard_size=32", "teacher.channels=16", "teacher.batch=4",
        "teacher.snapshot_nimg=8", "teacher.checkpoint_nimg=16", "teacher.duration_nimg=32",
        "teacher.log_nimg=8", "teacher.lr_rampup_nimg=0", "teacher.shuffle_buffer=32",
        "phema.sigma_rels=[0.05,0.1]", "pairs.num_pairs=8", "pairs.num_steps=2", "pairs.pairs_per_shard=8",
        "distill.batch=8", "distill.reg_batch=8", "distill.duration_nimg=16", "distill.checkpoint_nimg=16",
        "distill.log_nimg=8", "distill.lpips_size=32", "refstats.num_images=16",
        "eval.num_images=12", "eval.images_per_task=5", "eval.num_steps=3", "eval.grid_images=4", "eval.batch=4"]


def test_evaluate_reports_every_model_with_an_inception_loaded_by_path(tmp_path):
    weights = save_random_inception(tmp_path / "inception.pt")
    cfg = C.load_config("ci", [*TINY, f"refstats.inception_weights={weights}"], storage=str(tmp_path / "store"))
    dag.run(cfg, until="evaluate", executor=InlineExecutor())
    keys = dag.cache_keys(dag.graph(), cfg)
    art = store.Store(cfg.storage).artifact("evaluate", keys["evaluate"])
    out = art.manifest()["outputs"]
    assert out["metric"] == "FID" and out["num_images"] == 12
    rows = out["models"]
    assert [(r["sigma_rel"], r["steps"], r["nfe"], r["count"]) for r in rows] == [
        (0.05, 3, 5, 12), (0.1, 3, 5, 12), (None, 1, 1, 12)]
    assert out["best_sigma_rel"] == min(rows[:2], key=lambda r: r["fd"])["sigma_rel"]
    assert art.read_json("results.json") == rows
    md = store.read_bytes(art.path("report.md")).decode()
    html = store.read_bytes(art.path("report.html")).decode()
    assert "Best teacher EMA length" in md and "student (1 step)" in html and "<table>" in html
    assert Image.open(art.path("fd_vs_sigma_rel.png")).size[0] > 100
    for r in rows:
        assert Image.open(art.path(r["grid"])).size == (32, 32)  # 4 images of 16 px, 2 x 2

    # The reduced task sums equal one pass over all 12 seeds, and the FD is recomputed from them.
    refstats = store.Store(cfg.storage).artifact("refstats", keys["refstats"])
    phema = store.Store(cfg.storage).artifact("phema", keys["phema"])
    encoder = store.Store(cfg.storage).artifact("encode", keys["encode"]).manifest()["outputs"]["encoder"]
    model = Model("t", phema, "phema-0.0500.safetensors", 0.05, 3)
    whole = evaluate_range(EvalJob([model], encoder, weights, 12, 4, "cpu"), (0, 0, 12))
    stats = FeatureStats.from_dict(whole["stats"])
    ref = np.load(refstats.path("stats.npz"))
    fd = frechet_distance(stats.mean(), stats.cov(), ref["mu"], ref["sigma"])
    assert np.isclose(fd, rows[0]["fd"], rtol=1e-4), (fd, rows[0]["fd"])
    assert load_inception(weights).metric_name == "FID"
