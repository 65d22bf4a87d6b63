"""The paper-scale presets, before a cluster is paid for: each one's plan passes the resource check of
a simulated GPU cluster (ray.cluster_utils: four nodes of 8 GPUs, as the presets are written for) and
fails, naming the setting, on one too small; and a shrunk copy of each (`--set` sizes down, nothing
else) runs end to end on the CPU: ImageNet's layout, the VAE, a released teacher and guide."""

import pickle
from pathlib import Path

import numpy as np
import pytest

from pipeline import config as C
from pipeline import dag, store
from pipeline.executor import InlineExecutor, RayExecutor

import edm2_files as E
from helpers import make_imagenet, ray_cluster, save_random_inception, save_tiny_vae

PRESETS = ["edm2-img512-xs", "edm2-img512-s", "edm2-img64-s", "edm2-release-img512-s", "edm2-release-img64-s"]
GB = 1 << 30


def _node(gpus: int, cpus: int) -> dict:
    return {"num_cpus": cpus, "num_gpus": gpus, "object_store_memory": 80 << 20}


@pytest.fixture(scope="module")
def gpu_cluster():
    """Replaces the session's Ray instance with four simulated 8-GPU nodes (and a CPU-less head)."""
    with ray_cluster(_node(0, 0), *[_node(8, 16)] * 4) as cluster:
        yield cluster


@pytest.mark.parametrize("preset", PRESETS)
def test_each_preset_fits_the_cluster_it_is_written_for(gpu_cluster, preset):
    cfg = C.load_config(preset)
    nodes = dag.graph()
    dag.check_resources(RayExecutor(), list(nodes.values()), cfg)  # raises if a stage does not fit
    uses_gpus = [n for n in nodes if getattr(getattr(cfg, nodes[n].section), "num_gpus", 0)
                 or getattr(getattr(cfg, nodes[n].section), "use_gpu", False)]
    assert {"teacher", "pairs", "distill", "evaluate"} <= set(uses_gpus)


@pytest.mark.parametrize("override,named", [
    ("teacher.num_workers=64", r"teacher.use_gpu with 64 worker\(s\) needs 64 GPU\(s\), the cluster has 32"),
    ("pairs.num_gpus=16", "pairs asks for 16 GPU"),
    ("eval.num_cpus=32", "no node has them"),  # 64 CPUs in all, but a task runs on one node of 16
])
def test_a_plan_the_cluster_cannot_hold_is_refused_before_anything_runs(gpu_cluster, override, named):
    if override.startswith("teacher"):
        override_cfg = C.load_config("edm2-img512-s", [override, "teacher.batch_gpu=32"])
    else:
        override_cfg = C.load_config("edm2-img512-s", [override])
    with pytest.raises(ValueError, match=named):
        dag.check_resources(RayExecutor(), list(dag.graph().values()), override_cfg)


# --- shrunk copies, end to end on the CPU ------------------------------------------------------

SHRINK = [  # sizes and devices only: every other setting stays the preset's
    "encode.num_images=0", "encode.resolution=32", "encode.shard_size=16", "encode.batch=8", "encode.num_gpus=0",
    "probe.resolution=0", "probe.channels=[8,16]", "probe.feature_dim=16", "probe.epochs=1", "probe.batch=8",
    "probe.ref_images=16", "probe.holdout=0.25", "probe.num_gpus=0",
    "refstats.dinov2_weights=", "refstats.batch=8", "refstats.images_per_task=16", "refstats.num_gpus=0",
    "teacher.channels=16", "teacher.channel_mult=[1,2]", "teacher.num_blocks=1", "teacher.attn_resolutions=[8]",
    "teacher.batch=8", "teacher.duration_nimg=32", "teacher.snapshot_nimg=8", "teacher.checkpoint_nimg=16",
    "teacher.log_nimg=8", "teacher.lr_rampup_nimg=8", "teacher.shuffle_buffer=16", "teacher.num_workers=1",
    "teacher.use_gpu=false",
    "pairs.num_pairs=8", "pairs.num_steps=3", "pairs.pairs_per_shard=4", "pairs.batch=4", "pairs.num_gpus=0",
    "pairs.spread=false",
    "distill.batch=4", "distill.reg_batch=4", "distill.duration_nimg=8", "distill.checkpoint_nimg=8",
    "distill.log_nimg=4", "distill.val_images=8", "distill.val_batch=8", "distill.lpips_net=alex",
    "distill.lpips_pretrained=false", "distill.lpips_size=32",
    "distill.num_workers=1", "distill.use_gpu=false",
    "eval.num_images=8", "eval.num_steps=2", "eval.grid_rows=2", "eval.grid_columns=2", "eval.images_per_task=8",
    "eval.batch=8", "eval.num_gpus=0", "executor=inline",
]


@pytest.fixture(scope="module")
def offline(tmp_path_factory) -> dict[str, str]:
    """What the presets download, made here: ImageNet's layout, a VAE, Inception, EDM2's refs."""
    root = tmp_path_factory.mktemp("presets")
    refs = root / "refs.pkl"
    refs.write_bytes(pickle.dumps(E.dataset_refs(0)))
    return {"imagenet": str(make_imagenet(root / "imagenet", ["n01440764", "n01443537"], 16, as_tars=False)),
            "vae": save_tiny_vae(root / "vae"), "inception": save_random_inception(root / "inception.pt"),
            "refs": str(refs), "root": str(root)}


def _release_files(offline: dict[str, str], cfg: C.Config) -> list[str]:
    """A released teacher (and guide) of the shrunk network's shape under the preset's file names."""
    folder = Path(offline["root"]) / "release"
    latent = cfg.encode.encoder == "vae"
    channels, resolution = (4, 16) if latent else (3, 32)
    encoder = E.StabilityVAEEncoder(vae_name=offline["vae"]) if latent else E.StandardRGBEncoder()
    made = []
    for field, url, classes in (("teacher.release", cfg.teacher.release, 2), ("pairs.guide", cfg.pairs.guide, 0)):
        if url:
            net = E.precond(len(made), img_resolution=resolution, img_channels=channels, label_dim=classes)
            made.append(f"{field}={E.write(folder / url.rsplit('/', 1)[1], E.snapshot(net, encoder=encoder))}")
    return made


@pytest.mark.parametrize("preset", PRESETS)
def test_a_shrunk_copy_of_each_preset_runs_end_to_end(preset, offline, one_thread):
    cfg = C.load_config(preset, SHRINK)
    files = [f"encode.path={offline['imagenet']}", f"refstats.inception_weights={offline['inception']}"]
    files += [f"encode.vae={offline['vae']}"] if cfg.encode.encoder == "vae" else []
    files += [f"refstats.stats={offline['refs']}"] if cfg.refstats.stats else []
    cfg = C.load_config(preset, [*SHRINK, *files, *_release_files(offline, cfg)],
                        storage=str(Path(offline["root"]) / "store"))
    full = C.load_config(preset)
    for section in ("teacher", "pairs", "distill"):  # what the preset is about survives the shrink
        for name in ("P_mean", "P_std", "lr", "lr_decay_batches", "source", "sigma_rel", "guidance",
                     "fake_updates_per_gen", "lambda_reg", "grad_clip"):
            if hasattr(getattr(full, section), name):
                assert getattr(getattr(cfg, section), name) == getattr(getattr(full, section), name), (section, name)
    dag.run(cfg, executor=InlineExecutor())
    st = store.Store(cfg.storage)
    keys = dag.cache_keys(dag.graph(), cfg)
    assert all(st.artifact(n, keys[n]).state() == "done" for n in dag.graph())
    out = st.artifact("evaluate", keys["evaluate"]).manifest()["outputs"]
    assert np.isfinite(out["student_over_best_teacher"]) and "fd_inception" in out["models"][0]
