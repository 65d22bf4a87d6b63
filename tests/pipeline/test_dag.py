"""The DAG's caching rules on a three-stage graph of small fake stages (a -> b -> c, a -> c)."""

import uuid
from dataclasses import dataclass, field, replace
from types import SimpleNamespace

import pytest

from pipeline import config as C
from pipeline import dag, store
from pipeline.config import throughput
from pipeline.executor import InlineExecutor
from pipeline.stage import DRIVER, Stage

@dataclass(frozen=True)
class Section:
    value: int = 1
    batch: int = throughput(8)

@dataclass(frozen=True)
class FakeConfig:
    storage: str
    seed: int = 0
    executor: str = "inline"
    max_in_flight: int = 4
    shared_storage: bool = False
    lease_timeout_s: float = 60.0
    preset: str = "fake"
    tracking: C.TrackingConfig = field(default_factory=C.TrackingConfig)
    a: Section = field(default_factory=Section)
    b: Section = field(default_factory=Section)
    c: Section = field(default_factory=Section)

def _nodes(calls: list[str]) -> dict[str, Stage]:
    def stage(name):
        def run(ctx, cfg, inputs):
            calls.append(name)
            upstream = sum(art.manifest()["outputs"]["total"] for art in inputs.values())
            with ctx.artifact.open("value.txt", "wb") as f:
                f.write(str(cfg.value).encode())
            return {"total": cfg.value + upstream}
        return run

    upstream = {"a": (), "b": ("a",), "c": ("a", "b")}
    return {n: Stage(n, "1", n, up, DRIVER, stage(n)) for n, up in upstream.items()}

@pytest.fixture
def env():
    calls: list[str] = []
    cfg = FakeConfig(storage=f"memory://dag-{uuid.uuid4().hex}")

    def go(cfg=cfg, **kw):
        return dag.run(cfg, executor=InlineExecutor(), nodes=_nodes(calls), **kw)

    return SimpleNamespace(cfg=cfg, calls=calls, run=go)

def test_first_run_computes_everything_then_everything_is_cached(env):
    plan = env.run()
    assert env.calls == ["a", "b", "c"] and plan.to_run == ["a", "b", "c"]
    assert env.run().to_run == [] and env.calls == ["a", "b", "c"]

def test_keys_follow_result_fields_and_upstream(env):
    nodes = _nodes([])
    base = dag.cache_keys(nodes, env.cfg)
    faster = dag.cache_keys(nodes, FakeConfig(env.cfg.storage, b=Section(batch=64)))
    changed_b = dag.cache_keys(nodes, FakeConfig(env.cfg.storage, b=Section(value=2)))
    assert faster == base  # throughput-only fields are not part of the key
    assert changed_b["a"] == base["a"]
    assert changed_b["b"] != base["b"] and changed_b["c"] != base["c"]
    assert dag.cache_keys(nodes, FakeConfig(env.cfg.storage, seed=1))["a"] != base["a"]
    assert all(len(k) == 16 and int(k, 16) >= 0 for k in base.values())

def test_changing_a_field_reruns_that_stage_and_downstream(env):
    env.run()
    env.calls.clear()
    env.run(FakeConfig(env.cfg.storage, b=Section(value=5)))
    assert env.calls == ["b", "c"]

def test_force_recomputes_the_stage_and_everything_downstream(env):
    env.run()
    env.calls.clear()
    plan = env.run(force=["b"])
    assert env.calls == ["b", "c"] and plan.forced == ["b", "c"]

def test_only_runs_one_stage_from_cached_upstream(env):
    with pytest.raises(ValueError, match=r"stage b needs the a artifact .* run `onestep run --until a`"):
        env.run(only=["b"])
    assert env.calls == []
    env.run(until="a")
    assert env.calls == ["a"]
    env.run(only=["b"])
    assert env.calls == ["a", "b"]

def test_until_runs_a_stage_and_its_ancestors(env):
    plan = env.run(until="b")
    assert env.calls == ["a", "b"] and plan.selected == ["a", "b"]

def test_dry_run_and_partial_state(env):
    plan = env.run(dry_run=True)
    assert plan.to_run == ["a", "b", "c"] and env.calls == []
    env.run(until="a")
    nodes = _nodes([])
    keys = dag.cache_keys(nodes, env.cfg)

    store.Store(env.cfg.storage).artifact("b", keys["b"]).commit_piece("p0", {})
    plan = env.run(dry_run=True)
    assert plan.states == {"a": "done", "b": "partial", "c": "missing"}

def test_unknown_stage_names_are_errors(env):
    with pytest.raises(ValueError, match="unknown stage; stages: a, b, c"):
        env.run(only=["z"])

def test_manifest_records_config_upstream_and_outputs(env):
    env.run()
    keys = dag.cache_keys(_nodes([]), env.cfg)

    manifest = store.Store(env.cfg.storage).artifact("c", keys["c"]).manifest()
    assert manifest["upstream"] == {"a": keys["a"], "b": keys["b"]}
    assert manifest["config"] == {"value": 1, "batch": 8}
    assert manifest["outputs"] == {"total": 4}  # c: 1, a: 1, b: 1 + 1
    assert manifest["files"] == {"value.txt": 1} and manifest["wall_time_s"] >= 0

def test_ray_executor_refuses_memory_storage():
    with pytest.raises(ValueError, match="executor=inline"):
        dag.check_executor_storage("ray", "memory://x")

def test_local_storage_is_refused_on_a_multi_node_cluster():
    with pytest.raises(ValueError, match=r"storage /data/run is a local path but the Ray cluster has 3 nodes.*s3://"):
        dag.check_cluster_storage(3, "/data/run", shared=False)
    dag.check_cluster_storage(3, "/mnt/nfs/run", shared=True)  # the user says every node mounts it
    dag.check_cluster_storage(3, "s3://bucket/run", shared=False)
    dag.check_cluster_storage(1, "/data/run", shared=False)

@pytest.mark.parametrize("setting, message", [
    ("distill.use_gpu=true", r"distill.use_gpu with 1 worker\(s\) needs 1 GPU"),
    ("pairs.num_gpus=1", r"pairs asks for 1 GPU\(s\) per task"),
    ("teacher.num_workers=2", "executor=inline runs one training worker"),
])
def test_every_stage_is_checked_against_the_cluster_before_the_first_starts(setting, message):
    cfg = C.load_config("ci", [setting], storage=f"memory://dag-{uuid.uuid4().hex}")
    with pytest.raises(ValueError, match=message):
        dag.run(cfg, executor=InlineExecutor())
    assert store.walk_files(cfg.storage) == []  # not even encode ran

def test_a_conditional_upstream_is_read_and_keyed_only_when_its_condition_holds(env):
    calls: list[str] = []
    nodes = _nodes(calls)
    nodes["c"] = replace(nodes["c"], upstream_if={"b": ("value", 2)})
    without, with_b = env.cfg, FakeConfig(env.cfg.storage, c=Section(value=2))
    plan = dag.run(without, until="c", executor=InlineExecutor(), nodes=nodes)
    assert calls == ["a", "c"] and plan.selected == ["a", "c"]  # b is neither made nor read
    manifest = store.Store(without.storage).artifact("c", plan.keys["c"]).manifest()
    assert manifest["upstream"] == {"a": plan.keys["a"]} and manifest["outputs"] == {"total": 2}
    other_b = FakeConfig(env.cfg.storage, b=Section(value=7))
    assert dag.cache_keys(nodes, other_b)["c"] == plan.keys["c"]  # b's settings do not reach c's key
    plan = dag.run(with_b, until="c", executor=InlineExecutor(), nodes=nodes)
    assert calls == ["a", "c", "b", "c"] and plan.keys["c"] != dag.cache_keys(nodes, without)["c"]
    assert store.Store(with_b.storage).artifact("c", plan.keys["c"]).manifest()["outputs"] == {"total": 5}  # 2 + a 1 + b 2


def test_pairs_reads_the_probe_only_to_choose_its_teacher():
    nodes = dag.graph()
    fixed = C.load_config("ci", ["pairs.select=fixed"])
    assert nodes["pairs"].inputs(fixed) == ("phema",)
    assert nodes["pairs"].inputs(C.load_config("ci", ["pairs.select=best"])) == ("encode", "probe", "phema")
    other_probe = C.load_config("ci", ["pairs.select=fixed", "probe.epochs=9"])
    assert dag.cache_keys(nodes, other_probe)["pairs"] == dag.cache_keys(nodes, fixed)["pairs"]
    assert "pairs" not in dag.closure(nodes, {"probe"}, downstream=True, cfg=fixed)  # --force probe keeps the pairs
    assert "pairs" in dag.closure(nodes, {"probe"}, downstream=True, cfg=C.load_config("ci", ["pairs.select=best"]))
