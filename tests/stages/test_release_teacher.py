"""NVIDIA's released EDM2 teacher as the DAG's entry (teacher.source), in files made as EDM2's own code makes
them (tests/edm2_files.py): a post-hoc reconstruction used as it is, with its guide, through pairs, distill,
evaluate and `onestep sample`; a folder of raw snapshots reconstructed by phema, with EDM2's dataset refs as
refstats; keys from the files' content; an encoder or dataset that does not match."""

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import edm2_files as E
from helpers import save_random_inception
from pipeline import cli, dag, store
from pipeline import config as C
from pipeline.diffusion.phema import solve_coefficients
from pipeline.diffusion.sampler import edm_sampler, seeded_noise
from pipeline.executor import InlineExecutor
from pipeline.models.edm2_import import onestep_name
from pipeline.pairs import read_pairs
from pipeline.weights import load_denoiser, read_weights

DATA = ["encode.num_images=32", "encode.shard_size=32", "refstats.num_images=32", "probe.epochs=1"]
RELEASE = "edm2-img16-s-2147483-0.130.pkl"


def _cfg(storage: Path, *extra: str) -> C.Config:
    return C.load_config("ci", [*DATA, *extra, "executor=inline"], storage=str(storage))


def _artifact(cfg: C.Config, stage: str) -> store.Artifact:
    return store.Store(cfg.storage).artifact(stage, dag.cache_keys(dag.graph(), cfg)[stage])


@pytest.fixture
def release(tmp_path) -> dict[str, Path]:
    """EDM2's teacher (conditional) and guide (unconditional) as post-hoc reconstructions."""
    return {"teacher": E.write(tmp_path / "release" / RELEASE, E.snapshot(E.precond(1))),
            "guide": E.write(tmp_path / "release" / "edm2-img16-xs-uncond-2147483-0.045.pkl", E.snapshot(E.precond(2, label_dim=0)))}


@pytest.mark.slow
def test_a_released_teacher_and_its_guide_run_the_dag_without_training(release, tmp_path, capsys):
    guided = [f"teacher.source=edm2-release", f"teacher.release={release['teacher']}", "phema.sigma_rels=[0.13]",
              "pairs.sigma_rel=0.13", f"pairs.guide={release['guide']}", "pairs.guidance=1.5", "pairs.num_pairs=8",
              "pairs.pairs_per_shard=4", "pairs.batch=4", "pairs.num_steps=4", "distill.guidance=1.5"]
    cfg = _cfg(tmp_path / "store", *guided)
    plan = dag.run(cfg, executor=InlineExecutor())
    assert plan.to_run == list(dag.graph())

    teacher = _artifact(cfg, "teacher")
    out = teacher.manifest()["outputs"]
    assert out["source"] == "edm2-release" and out["release"]["sigma_rel"] == 0.13
    assert out["release"]["nimg"] == 2147483648 and not store.exists(teacher.path("checkpoints"))  # 2^31 images
    edm2_teacher = E.denoiser(E.snapshot(E.precond(1))["ema"])  # EDM2's math on the file's weights
    edm2_guide = E.denoiser(E.snapshot(E.precond(2, label_dim=0))["ema"])
    variant = load_denoiser(_artifact(cfg, "phema"), "network", "phema-0.1300.safetensors").eval()
    x, sigma, labels = torch.randn(2, 3, 16, 16), torch.tensor([0.5, 5.0]), torch.tensor([3, 7])
    with torch.no_grad():
        torch.testing.assert_close(variant(x, sigma, labels), edm2_teacher(x, sigma, labels), atol=1e-5, rtol=1e-5)

    # The pairs are the released teacher's guided samples, as EDM2's networks give them (to float32 rounding
    # of two implementations, grown over 7 guided evaluations).
    noise, target, labels, seeds = read_pairs(_artifact(cfg, "pairs").path("shards/pairs-000000.tar"))
    x, y = seeded_noise(list(seeds), (3, 16, 16), 10, "cpu")
    expected = edm_sampler(edm2_teacher, x, y, num_steps=4, guidance=1.5, guide=edm2_guide)
    torch.testing.assert_close(torch.from_numpy(target), expected, atol=1e-3, rtol=1e-3)
    assert _artifact(cfg, "distill").state() == _artifact(cfg, "evaluate").state() == "done"

    args = ["sample", "--config", "ci", "--storage", cfg.storage, "--model", "teacher:0.13", "--steps", "2",
            "--num", "2", "--out", str(tmp_path / "grid.png")]
    for item in [*DATA, *guided, "executor=inline"]:
        args += ["--set", item]
    assert cli.main(args) == 0 and (tmp_path / "grid.png").stat().st_size > 0


def test_the_teachers_key_is_the_files_content(release, tmp_path):
    storage = tmp_path / "store"
    base = ["teacher.source=edm2-release", "phema.sigma_rels=[0.13]", "pairs.sigma_rel=0.13"]
    key = lambda path: dag.cache_keys(dag.graph(), _cfg(storage, *base, f"teacher.release={path}"))["teacher"]
    mirror = tmp_path / "mirror" / RELEASE
    mirror.parent.mkdir()
    shutil.copy(release["teacher"], mirror)
    assert key(release["teacher"]) == key(mirror)  # another copy of the same file: the same teacher
    assert list((storage / "_sha256").iterdir())  # each hash is remembered in the storage
    data = bytearray(mirror.read_bytes())
    data[-100] ^= 1
    mirror.write_bytes(bytes(data))
    assert key(release["teacher"]) != key(mirror)
    with pytest.raises(ValueError, match=r"teacher.release: .*missing.pkl does not exist"):
        key(tmp_path / "missing.pkl")


@pytest.mark.parametrize("encoder,extra,named", [
    ("StabilityVAEEncoder", [], "encode the dataset as the release did .--set encode.encoder=vae"),
    ("StandardRGBEncoder", ["encode.resolution=32"], "3x16x16 inputs, the encode artifact holds 3x32x32"),
])
def test_a_release_that_does_not_fit_the_data_is_refused(encoder, extra, named, tmp_path):
    path = E.write(tmp_path / RELEASE, E.snapshot(E.precond(1), encoder=getattr(E, encoder)()))
    cfg = _cfg(tmp_path / "store", "teacher.source=edm2-release", f"teacher.release={path}", *extra)
    with pytest.raises(ValueError, match=named):
        dag.run(cfg, until="teacher", executor=InlineExecutor())
    assert _artifact(cfg, "teacher").state() != "done"


@pytest.mark.parametrize("where", ["local", "s3"])
def test_raw_snapshots_feed_phema_and_dataset_refs_feed_refstats(where, tmp_path, request):
    """EDM2's snapshots after 1024, 2048 and 3072 images (kimg 1, 2, 3) of two EMA lengths, in a folder or on
    S3: each phema variant is the weighted sum that the post-hoc EMA solution gives for those times and
    lengths; EDM2's dataset refs are refstats' Inception statistics."""
    folder = tmp_path / "run-00001"
    snapshots = {}
    for kimg in (1, 2, 3):
        for std in (0.05, 0.1):
            snapshots[kimg * 1024, std] = E.snapshot(E.precond(10 * kimg + int(std * 100)))
            E.write(folder / f"network-snapshot-{kimg:07d}-{std:.3f}.pkl", snapshots[kimg * 1024, std])
    (folder / "training_options.json").write_text("{}")  # other files in the folder are left alone
    refs = E.dataset_refs(5)
    (tmp_path / "img16.pkl").write_bytes(pickle.dumps(refs))
    url = str(folder)
    if where == "s3":
        url = f"{request.getfixturevalue('s3_bucket')}/edm2-runs/run-00001"
        for path in folder.iterdir():
            store.write_bytes(f"{url}/{path.name}", path.read_bytes())
    inception = save_random_inception(tmp_path / "inception-2015-12-05.pt")
    cfg = _cfg(tmp_path / "store", "teacher.source=edm2-snapshots", f"teacher.release={url}",
               "phema.sigma_rels=[0.07,0.12]", "phema.targets_per_task=1", f"refstats.stats={tmp_path / 'img16.pkl'}",
               f"refstats.inception_weights={inception}")
    dag.run(cfg, only=["encode", "refstats", "teacher", "phema"], executor=InlineExecutor())

    teacher = _artifact(cfg, "teacher")
    times = sorted(snapshots)
    assert [(s["nimg"], s["sigma_rel"]) for s in teacher.manifest()["outputs"]["snapshots"]] == times
    assert not store.exists(teacher.path("snapshots"))  # streamed from the folder, not copied
    x = solve_coefficients([t for t, _ in times], [s for _, s in times], [3072, 3072], (0.07, 0.12))
    phema, states = _artifact(cfg, "phema"), [snapshots[t]["ema"].state_dict() for t in times]
    for j, sigma_rel in enumerate((0.07, 0.12)):
        expected = {name: sum(float(x[i, j]) * state[name].float() for i, state in enumerate(states))
                    for name in states[0]}  # in EDM2's names
        got = read_weights(phema.path(f"phema-{sigma_rel:.4f}.safetensors"))
        assert sorted(got) == sorted(onestep_name(name) for name in expected)
        for name, value in expected.items():
            torch.testing.assert_close(got[onestep_name(name)], value, atol=1e-5, rtol=1e-5)
    reference = E.precond(0)  # EDM2's network with the last variant's weights, against onestep's
    reference.load_state_dict(expected)
    variant = load_denoiser(phema, "network", "phema-0.1200.safetensors").eval()
    images, sigma, labels = torch.randn(2, 3, 16, 16), torch.tensor([0.3, 3.0]), torch.tensor([1, 8])
    with torch.no_grad():
        torch.testing.assert_close(variant(images, sigma, labels), E.denoiser(reference)(images, sigma, labels),
                                   atol=1e-5, rtol=1e-5)

    with _artifact(cfg, "refstats").open("inception.npz") as f:
        stats = np.load(f)
        assert np.array_equal(stats["mu"], refs["fid"]["mu"]) and np.array_equal(stats["sigma"], refs["fid"]["sigma"])


def test_a_reconstruction_has_one_ema_length(release, tmp_path):
    cfg = _cfg(tmp_path / "store", "teacher.source=edm2-release", f"teacher.release={release['teacher']}",
               "phema.sigma_rels=[0.1,0.13]")
    with pytest.raises(ValueError, match=r"post-hoc reconstruction of sigma_rel 0.13.*phema.sigma_rels=\[0.13\]"):
        dag.run(cfg, until="phema", executor=InlineExecutor())


def test_release_settings_are_checked_in_the_config():
    with pytest.raises(ValueError, match="needs teacher.release"):
        C.load_config("ci", ["teacher.source=edm2-release"])
    with pytest.raises(ValueError, match="training one takes none"):
        C.load_config("ci", ["teacher.release=x.pkl"])
    with pytest.raises(ValueError, match="teacher.source = 'other'"):
        C.load_config("ci", ["teacher.source=other", "teacher.release=x.pkl"])
