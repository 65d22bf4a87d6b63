"""NVIDIA's released EDM2 teacher as the DAG's entry (teacher.source): a post-hoc reconstruction used as
it is, with its guide, through pairs, distill, evaluate and `onestep sample`; a folder of raw snapshots
reconstructed by phema; keys from the files' content; an encoder or dataset that does not match."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import cli, dag, store
from pipeline import config as C
from pipeline.diffusion.phema import solve_coefficients
from pipeline.diffusion.sampler import edm_sampler, seeded_noise
from pipeline.executor import InlineExecutor
from pipeline.models.edm2 import build_denoiser
from pipeline.weights import load_network, read_weights
from stages.pairs import read_pairs

from helpers import write_release

DATA = ["encode.num_images=32", "encode.shard_size=32", "refstats.num_images=32", "probe.epochs=1"]
SMALL = dict(channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])
RELEASE = "edm2-img16-s-2147483-0.130.pkl"


def _net(seed: int, num_classes: int = 10):
    torch.manual_seed(seed)
    return build_denoiser("S", 16, 3, num_classes, **SMALL)


def _cfg(storage: Path, *extra: str) -> C.Config:
    return C.load_config("ci", [*DATA, *extra, "executor=inline"], storage=str(storage))


def _artifact(cfg: C.Config, stage: str) -> store.Artifact:
    return store.Store(cfg.storage).artifact(stage, dag.cache_keys(dag.graph(), cfg)[stage])


@pytest.fixture
def release(release_pickler, tmp_path) -> dict[str, Path]:
    return {"teacher": write_release(tmp_path / "release" / RELEASE, _net(1)),
            "guide": write_release(tmp_path / "release" / "edm2-img16-xs-uncond-2147483-0.045.pkl", _net(2, 0))}


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
    assert out["release"]["nimg"] == 2147483000 and not store.exists(teacher.path("checkpoints"))
    phema = _artifact(cfg, "phema")
    variant = load_network(phema, "network", "phema-0.1300.safetensors")
    original = _net(1).half().float()  # the release stores float16
    for name, value in original.state_dict().items():
        assert torch.equal(variant.state_dict()[name], value), name

    # The pairs are the released teacher's guided samples, as if sampled from the original networks.
    noise, target, labels, seeds = read_pairs(_artifact(cfg, "pairs").path("shards/pairs-000000.tar"))
    x, y = seeded_noise(list(seeds), (3, 16, 16), 10, "cpu")
    expected = edm_sampler(original.eval(), x, y, num_steps=4, guidance=1.5, guide=_net(2, 0).half().float().eval())
    torch.testing.assert_close(torch.from_numpy(target), expected, atol=1e-4, rtol=1e-4)
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
def test_a_release_that_does_not_fit_the_data_is_refused(encoder, extra, named, release_pickler, tmp_path):
    path = write_release(tmp_path / RELEASE, _net(1), encoder)
    cfg = _cfg(tmp_path / "store", "teacher.source=edm2-release", f"teacher.release={path}", *extra)
    with pytest.raises(ValueError, match=named):
        dag.run(cfg, until="teacher", executor=InlineExecutor())
    assert _artifact(cfg, "teacher").state() != "done"


@pytest.mark.parametrize("where", ["local", "s3"])
def test_raw_snapshots_feed_phema_from_where_they_are(where, release_pickler, tmp_path, request):
    """EDM2's snapshots at 1000, 2000 and 3000 images of two EMA lengths, in a folder or on S3: each
    variant is the weighted sum that the post-hoc EMA solution gives for those times and lengths."""
    folder = tmp_path / "run-00001"
    states = {}
    for kimg in (1, 2, 3):
        for std in (0.05, 0.1):
            net = _net(10 * kimg + int(std * 100))
            write_release(folder / f"network-snapshot-{kimg:07d}-{std:.3f}.pkl", net)
            states[kimg * 1000, std] = {k: v.half().float() for k, v in net.state_dict().items()}
    (folder / "training_options.json").write_text("{}")  # other files in the folder are left alone
    url = str(folder)
    if where == "s3":
        url = f"{request.getfixturevalue('s3_bucket')}/edm2-runs/run-00001"
        for path in folder.iterdir():
            store.write_bytes(f"{url}/{path.name}", path.read_bytes())
    cfg = _cfg(tmp_path / "store", "teacher.source=edm2-snapshots", f"teacher.release={url}",
               "phema.sigma_rels=[0.07,0.12]", "phema.targets_per_task=1")
    dag.run(cfg, until="phema", executor=InlineExecutor())
    teacher = _artifact(cfg, "teacher")
    assert [(s["nimg"], s["sigma_rel"]) for s in teacher.manifest()["outputs"]["snapshots"]] == sorted(states)
    assert not store.exists(teacher.path("snapshots"))  # streamed from the folder, not copied
    times = sorted(states)
    x = solve_coefficients([t for t, _ in times], [s for _, s in times], [3000, 3000], (0.07, 0.12))
    phema = _artifact(cfg, "phema")
    for j, sigma_rel in enumerate((0.07, 0.12)):
        got = read_weights(phema.path(f"phema-{sigma_rel:.4f}.safetensors"))
        for name in got:
            expected = sum(float(x[i, j]) * states[t][name] for i, t in enumerate(times))
            torch.testing.assert_close(got[name], expected, atol=1e-5, rtol=1e-5)
    assert load_network(phema, "network", "phema-0.0700.safetensors").num_classes == 10


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
