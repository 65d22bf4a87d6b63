"""The phema stage on a tiny ci teacher: reconstruction, task grouping, resume, bad input, loading."""

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline import config as C
from pipeline import dag, store
from pipeline.diffusion.phema import solve_coefficients
from pipeline.executor import InlineExecutor, Resources
from pipeline.weights import load_denoiser, read_weights
from pipeline.outputs import PhemaOutputs
from pipeline.stage import Stage
from stages import phema as P

# 8 steps of 4 images; both EMAs (0.05, 0.10) snapshotted every 8 images: 4 times, 8 snapshots.
TEACHER = ["encode.num_images=32", "encode.shard_size=32", "teacher.channels=16", "teacher.batch=4",
           "teacher.snapshot_nimg=8", "teacher.checkpoint_nimg=16", "teacher.duration_nimg=32",
           "teacher.log_nimg=8", "teacher.lr_rampup_nimg=0", "teacher.shuffle_buffer=32"]
SIGMA_RELS = "phema.sigma_rels=[0.05,0.06,0.075,0.09,0.1,0.15]"


class RecordingExecutor(InlineExecutor):
    """Inline, and keeps the items of every map call (one item = one task)."""

    def __init__(self) -> None:
        self.tasks: list[list[Any]] = []

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], resources: Resources = Resources(),
            desc: str = "") -> list[Any]:
        self.tasks.append(list(items))
        return super().map(fn, items, resources, desc)


def _nodes() -> dict[str, Stage]:
    return dag.graph()


def _cfg(storage: str, *extra: str) -> C.Config:
    return C.load_config("ci", [*TEACHER, *extra], storage=storage)


def _artifact(cfg: C.Config, stage: str) -> store.Artifact:
    return store.Store(cfg.storage).artifact(stage, dag.cache_keys(_nodes(), cfg)[stage])


def _phema(storage: str, *extra: str, executor: InlineExecutor | None = None) -> store.Artifact:
    cfg = _cfg(storage, *extra)
    dag.run(cfg, until="phema", executor=executor or InlineExecutor(), nodes=_nodes())
    return _artifact(cfg, "phema")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("phema") / "store"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a network this small trains fastest on one thread, and a busy machine hurts less
    try:
        dag.run(_cfg(str(root)), until="teacher", executor=InlineExecutor(), nodes=_nodes())
    finally:
        torch.set_num_threads(threads)
    return root


@pytest.fixture
def storage(trained: Path, tmp_path: Path) -> str:
    """A private copy of the trained teacher's storage."""
    shutil.copytree(trained, tmp_path / "store")
    return str(tmp_path / "store")


def _variant(art: store.Artifact, sigma_rel: float) -> dict[str, torch.Tensor]:
    return read_weights(art.path(PhemaOutputs.variant_file(sigma_rel)))


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return sum((a[k].double() - b[k].double()).square().sum() for k in a).sqrt().item()


@pytest.mark.parametrize("nimg", [0, 16])
def test_tracked_lengths_reproduce_their_snapshot_and_others_the_weighted_sum(storage, nimg):
    art = _phema(storage, SIGMA_RELS, f"phema.nimg={nimg}")
    out = art.manifest()["outputs"]
    target = nimg or 32
    teacher = _artifact(_cfg(storage), "teacher").manifest()["outputs"]["snapshots"]
    used = [s for s in teacher if s["nimg"] <= target]
    assert out["nimg"] == target and out["snapshots_used"] == used and len(used) == 2 * target // 8
    assert [(v["sigma_rel"], v["file"], v["nimg"]) for v in out["variants"]] == [
        (s, PhemaOutputs.variant_file(s), target) for s in (0.05, 0.06, 0.075, 0.09, 0.1, 0.15)]
    snaps = [read_weights(_artifact(_cfg(storage), "teacher").path(s["file"])) for s in used]
    for s in used[-2:]:  # the two EMAs tracked during training, at the target time
        variant, snapshot = _variant(art, s["sigma_rel"]), snaps[used.index(s)]
        assert all(torch.allclose(variant[k], snapshot[k], rtol=0, atol=1e-6) for k in snapshot)
    x = solve_coefficients([s["nimg"] for s in used], [s["sigma_rel"] for s in used], [target] * 2, [0.075, 0.15])
    for j, sigma_rel in enumerate((0.075, 0.15)):
        variant = _variant(art, sigma_rel)
        for k in variant:  # the weighted sum of the snapshot files, in float64
            expected = sum(float(x[i, j]) * snap[k].double() for i, snap in enumerate(snaps))
            torch.testing.assert_close(variant[k].double(), expected, rtol=1e-5, atol=1e-5)


def test_lengths_between_the_tracked_ones_lie_between_their_snapshots(storage):
    art = _phema(storage, SIGMA_RELS)
    short, long = _variant(art, 0.05), _variant(art, 0.1)
    span = _distance(short, long)
    from_short = [_distance(_variant(art, s), short) for s in (0.05, 0.06, 0.075, 0.09, 0.1)]
    from_long = [_distance(_variant(art, s), long) for s in (0.05, 0.06, 0.075, 0.09, 0.1)]
    assert span > 0
    assert from_short == sorted(from_short) and from_long == sorted(from_long, reverse=True)
    for near_short, near_long in zip(from_short[1:4], from_long[1:4]):  # close to the segment short-long
        assert 0 < near_short < span and 0 < near_long < span and near_short + near_long < 1.1 * span
    assert _distance(_variant(art, 0.15), short) > span  # a longer EMA lies beyond the 0.10 one


def test_one_task_or_many_give_identical_files(storage):
    many, one = RecordingExecutor(), RecordingExecutor()
    art = _phema(storage, SIGMA_RELS, "phema.targets_per_task=1", executor=many)
    files = {v["file"]: store.read_bytes(art.path(v["file"])) for v in art.manifest()["outputs"]["variants"]}
    cfg = _cfg(storage, SIGMA_RELS, "phema.targets_per_task=10")
    dag.run(cfg, force=["phema"], until="phema", executor=one, nodes=_nodes())
    assert [len(t) for t in many.tasks[-1]] == [1] * 6 and [len(t) for t in one.tasks[-1]] == [6]
    assert _artifact(cfg, "phema") == art and art.manifest()["outputs"]["made_this_run"] == [
        0.05, 0.06, 0.075, 0.09, 0.1, 0.15]
    assert {name: store.read_bytes(art.path(name)) for name in files} == files


def test_rerun_after_a_crash_remakes_only_the_missing_variant(storage):
    art = _phema(storage, SIGMA_RELS)
    before = {v["file"]: store.read_bytes(art.path(v["file"])) for v in art.manifest()["outputs"]["variants"]}
    for name in (PhemaOutputs.variant_file(0.075), f"{store.PIECES}/{P.piece_name(0.075)}.json", store.MANIFEST):
        store.remove(art.path(name))
    executor = RecordingExecutor()
    assert _phema(storage, SIGMA_RELS, executor=executor) == art
    assert executor.tasks == [[[P.Target(0.075, executor.tasks[0][0][0].weights)]]]
    assert art.manifest()["outputs"]["made_this_run"] == [0.075]
    assert {name: store.read_bytes(art.path(name)) for name in before} == before


@pytest.mark.parametrize("nimg, message", [
    (64, r"phema.nimg = 64 is after the teacher's last snapshot \(32 images\)"),
    (4, r"at least two teacher snapshots at or before 4 images, found 0"),
    (12, r"phema.nimg = 12 is not a snapshot time"),
])
def test_bad_nimg_fails_before_any_task(storage, nimg, message):
    executor = RecordingExecutor()
    with pytest.raises(ValueError, match=message):
        _phema(storage, f"phema.nimg={nimg}", executor=executor)
    assert executor.tasks == [] and _artifact(_cfg(storage, f"phema.nimg={nimg}"), "phema").state() == "missing"


def test_one_tracked_length_at_the_first_snapshot_is_too_few():
    snapshots = [{"file": f"s{n}", "nimg": n, "sigma_rel": 0.05} for n in (32, 64)]
    with pytest.raises(ValueError, match="at least two teacher snapshots at or before 32 images, found 1"):
        P.select_snapshots(snapshots, 32)
    assert P.select_snapshots(snapshots, 0) == (64, snapshots)


def test_a_variant_loads_through_load_denoiser_and_denoises(storage):
    art = _phema(storage, "phema.sigma_rels=[0.1]")
    net = load_denoiser(art, "network", weights="phema-0.1000.safetensors")
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in _variant(art, 0.1).items())
    by_path = load_denoiser(art.url, weights="phema-0.1000.safetensors")  # a folder, as a user names it
    assert all(torch.equal(v, by_path.state_dict()[k]) for k, v in net.state_dict().items())
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = net(x, torch.tensor([0.5, 5.0]), torch.tensor([0, 1]))
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert not torch.allclose(out[0], x[0]) and not torch.allclose(out[1], x[1])
