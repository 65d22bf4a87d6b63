"""Two Ray nodes on one machine (ray.cluster_utils.Cluster, one raylet each with 1 CPU):
pairs tasks spread over both and make the same pairs as one process; local storage is refused
unless declared shared."""

import shutil

import numpy as np
import pytest

from pipeline import config as C
from pipeline import dag, store
from pipeline.executor import InlineExecutor, RayExecutor
from pipeline.pairs import read_pairs

from helpers import PAIRS_TINY, NodeRecordingExecutor, ray_cluster


@pytest.fixture(scope="module")
def two_nodes():
    """Replaces the session's Ray instance with a two-node cluster for this module, then restores it."""
    with ray_cluster({"num_cpus": 1}, {"num_cpus": 1}) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def phema_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode") / "store"
    dag.run(_cfg(str(root)), until="phema", executor=InlineExecutor())
    return root


def _cfg(storage: str, *extra: str) -> C.Config:
    return C.load_config("ci", [*PAIRS_TINY, "pairs.pairs_per_shard=2", *extra], storage=storage)


def _pairs(cfg: C.Config) -> list[np.ndarray]:
    art = store.Store(cfg.storage).artifact("pairs", dag.cache_keys(dag.graph(), cfg)["pairs"])
    parts = [read_pairs(art.path(name)) for name in art.manifest()["outputs"]["shards"]]
    return [np.concatenate([p[i] for p in parts]) for i in range(4)]


def test_pairs_spread_over_both_nodes_equal_a_single_process_run(two_nodes, phema_store, tmp_path):
    shutil.copytree(phema_store, tmp_path / "one")
    shutil.copytree(phema_store, tmp_path / "two")
    one = _cfg(str(tmp_path / "one"))
    two = _cfg(str(tmp_path / "two"), "pairs.spread=true", "shared_storage=true")  # both raylets see /tmp
    dag.run(one, until="pairs", executor=InlineExecutor())
    executor = NodeRecordingExecutor()
    assert executor.num_nodes() == 2
    dag.run(two, until="pairs", executor=executor)
    assert len(executor.nodes) == 6 and len(set(executor.nodes)) == 2  # 6 shards, on both nodes
    for a, b in zip(_pairs(one), _pairs(two)):
        np.testing.assert_array_equal(a, b)


def test_local_storage_is_refused_on_two_nodes_before_any_stage(two_nodes, tmp_path):
    cfg = _cfg(str(tmp_path / "store"))
    with pytest.raises(ValueError, match="is a local path but the Ray cluster has 2 nodes"):
        dag.run(cfg, executor=RayExecutor())
    assert not (tmp_path / "store" / "encode").exists()
