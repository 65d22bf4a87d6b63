"""The teacher stage on the ci data: training, resume, DDP equivalence, failures, bad input."""

import json
import os
from dataclasses import replace

import pytest
import torch

from pipeline import config as C
from pipeline import dag, store
from pipeline.data.shards import reader
from pipeline.diffusion.loss import edm2_loss
from pipeline import teacher as T
from pipeline.outputs import EncodeOutputs
from pipeline.executor import DDPJob, InlineExecutor, InlineSession, RayExecutor
from pipeline.models.edm2 import MPConv, build_denoiser
from pipeline.training import STATE_FILE, Diverged
from pipeline.weights import load_denoiser, read_weights

STEPS_CFG = ["encode.num_images=200", "encode.shard_size=100", "teacher.batch=16",
             "teacher.checkpoint_nimg=32", "teacher.snapshot_nimg=32", "teacher.duration_nimg=64",
             "teacher.log_nimg=16", "teacher.lr_rampup_nimg=0"]


def _encoded(storage: str, *extra: str) -> tuple[C.Config, store.Artifact]:
    cfg = C.load_config("ci", [*STEPS_CFG, *extra], storage=storage)
    dag.run(cfg, until="encode", executor=InlineExecutor())
    keys = dag.cache_keys(dag.graph(), cfg)
    return cfg, store.Store(storage).artifact("encode", keys["encode"])


def _shard_urls(encode: store.Artifact) -> list[str]:
    return [encode.path(name) for name in encode.manifest()["outputs"]["shards"]]


def _args(cfg: C.Config, encode: store.Artifact, out: store.Artifact) -> T.TeacherArgs:
    net = T.build_network(cfg.teacher, EncodeOutputs.read(encode))
    return T.TeacherArgs(cfg.teacher, net.config, _shard_urls(encode), encode.manifest()["outputs"]["encoder"],
                         out, cfg.seed)


def _teacher(cfg: C.Config) -> store.Artifact:
    return store.Store(cfg.storage).artifact("teacher", dag.cache_keys(dag.graph(), cfg)["teacher"])


def test_teacher_stage_trains_and_the_loss_falls(tmp_path):
    cfg = C.load_config("ci", ["encode.num_images=200", "encode.shard_size=100"], storage=str(tmp_path))
    dag.run(cfg, until="teacher", executor=InlineExecutor())
    art = _teacher(cfg)
    out = art.manifest()["outputs"]
    rows = [json.loads(line) for line in store.read_bytes(art.path("metrics.jsonl")).decode().splitlines()]
    assert [r["nimg"] for r in rows] == list(range(128, 1025, 128))
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert all(r["nonfinite_steps"] == 0 and r["img_per_s"] > 0 for r in rows)
    assert set(rows[-1]["loss_by_sigma"]) <= set(T.bucket_names())
    # Snapshots of both EMAs every 256 images, listed in the index phema reads.
    assert [(s["nimg"], s["sigma_rel"]) for s in out["snapshots"]] == [
        (n, s) for n in (256, 512, 768, 1024) for s in (0.05, 0.1)]
    assert art.read_json("snapshots/index.json") == out["snapshots"]
    net = load_denoiser(art, "network")
    ema = read_weights(art.path(out["final_ema"]["0.05"]))
    assert set(ema) == set(net.state_dict()) and not torch.equal(ema["unet.out_gain"], net.state_dict()["unet.out_gain"])
    assert out["num_parameters"] == sum(p.numel() for p in net.parameters())
    # On a fixed batch with fixed noise the trained network denoises clearly better than at init.
    encode = store.Store(cfg.storage).artifact("encode", art.manifest()["upstream"]["encode"])
    y, labels = next(iter(reader(_shard_urls(encode), 64)))
    g = torch.Generator().manual_seed(0)
    sigma, noise = torch.exp(torch.randn(64, generator=g) * 1.6 - 0.8), torch.randn(y.shape, generator=g)
    torch.manual_seed(cfg.seed)
    init = build_denoiser(**net.config).eval()
    err = {name: edm2_loss(m, y.float(), labels, sigma, noise).per_sample.mean().item()
           for name, m in (("init", init), ("trained", net))}
    assert err["trained"] < 0.9 * err["init"], err


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    cfg, encode = _encoded(str(tmp_path / "data"))
    whole = store.Artifact(str(tmp_path / "whole"))
    InlineExecutor().ddp(T.train_worker, _args(cfg, encode, whole), DDPJob("teacher", whole.path("checkpoints")))

    class StopAfterFirstCheckpoint(InlineSession):
        def report(self, metrics, checkpoint_dir):
            super().report(metrics, checkpoint_dir)
            raise KeyboardInterrupt("stopped")  # the process dies right after its first checkpoint

    resumed = store.Artifact(str(tmp_path / "resumed"))
    job = DDPJob("teacher", resumed.path("checkpoints"))
    with pytest.raises(KeyboardInterrupt):
        T.train_worker(StopAfterFirstCheckpoint(job), _args(cfg, encode, resumed))
    assert not resumed.exists("network.safetensors") and resumed.piece_done("snapshot-000000000032")
    InlineExecutor().ddp(T.train_worker, _args(cfg, encode, resumed), job)
    for name in ("network.safetensors", T.snapshot_name(0.05, 64), T.snapshot_name(0.1, 32)):
        a, b = read_weights(whole.path(name)), read_weights(resumed.path(name))
        assert all(torch.equal(a[k], b[k]) for k in a), name


def _one_step(session, args):
    """One real train_step on this worker's slice of a fixed global batch; rank 0 saves the result."""
    batch, out, cfg, net_config = args
    torch.manual_seed(0)
    net = build_denoiser(**net_config).train()
    model = session.wrap(net)
    opt = torch.optim.Adam(net.parameters(), lr=0.01, betas=(0.9, 0.99), eps=1e-8)
    per_rank = batch[0].shape[0] // session.world_size
    rows = slice(session.rank * per_rank, (session.rank + 1) * per_rank)
    rounds = [T.Round(*(t[rows][i::2] for t in batch)) for i in range(2)]  # 2 accumulation rounds
    T.train_step(model, list(net.parameters()), opt, rounds, 0.01, cfg)
    if session.rank == 0:
        torch.save(net.state_dict(), out)
    session.report({}, None)


@pytest.mark.slow
def test_two_ddp_workers_match_one_worker(ray_session, tmp_path):
    cfg = C.load_config("ci").teacher
    net_config = build_denoiser("ci", 16, 3, 10).config
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(8, 3, 16, 16, generator=g) * 0.5, torch.randint(0, 10, (8,), generator=g),
             torch.exp(torch.randn(8, generator=g) * 1.2 - 0.5), torch.randn(8, 3, 16, 16, generator=g))
    one, two = str(tmp_path / "one.pt"), str(tmp_path / "two.pt")
    InlineExecutor().ddp(_one_step, (batch, one, cfg, net_config), DDPJob("t1", str(tmp_path / "c1")))
    RayExecutor().ddp(_one_step, (batch, two, cfg, net_config), DDPJob("t2", str(tmp_path / "c2"), num_workers=2))
    a, b = torch.load(one, weights_only=True), torch.load(two, weights_only=True)
    init = build_denoiser(**net_config).state_dict()
    moved = [k for k in a if not torch.equal(a[k], init[k])]
    assert len(moved) > 10  # the step changed the weights, identically in both runs
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def _crash_once(session, args):
    """The real loop, but the worker process dies right after its first checkpoint, once."""
    loop_args, marker = args
    report = session.report

    def report_then_die(metrics, checkpoint_dir):
        report(metrics, checkpoint_dir)
        if not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)

    session.report = report_then_die
    T.train_worker(session, loop_args)


@pytest.mark.slow
def test_ray_train_resumes_from_checkpoint_after_a_lost_worker(ray_session, tmp_path):
    cfg, encode = _encoded(str(tmp_path / "data"))
    whole = store.Artifact(str(tmp_path / "whole"))
    InlineExecutor().ddp(T.train_worker, _args(cfg, encode, whole), DDPJob("teacher", whole.path("checkpoints")))
    crashed = store.Artifact(str(tmp_path / "crashed"))
    job = DDPJob("teacher", crashed.path("checkpoints"), num_workers=1, max_failures=1)
    RayExecutor().ddp(_crash_once, (_args(cfg, encode, crashed), str(tmp_path / "died")), job)
    assert os.path.exists(tmp_path / "died")
    a, b = read_weights(whole.path("network.safetensors")), read_weights(crashed.path("network.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_forced_weight_normalisation_keeps_trained_weights_unit_norm(tmp_path):
    cfg, encode = _encoded(str(tmp_path / "data"))
    out = store.Artifact(str(tmp_path / "t"))
    InlineExecutor().ddp(T.train_worker, _args(cfg, encode, out), DDPJob("teacher", out.path("checkpoints")))
    net = load_denoiser(out, "network").train()
    net(torch.zeros(1, 3, 16, 16), torch.ones(1), torch.zeros(1, dtype=torch.long))  # normalises in place
    for m in net.modules():
        if isinstance(m, MPConv):
            rms = m.weight.flatten(1).square().mean(1).sqrt()
            torch.testing.assert_close(rms, torch.ones_like(rms), atol=1e-3, rtol=0)


def test_bad_input_fails_before_training(tmp_path):
    cfg, _ = _encoded(str(tmp_path / "data"))
    with pytest.raises(ValueError, match="unknown EDM2 preset 'XXXL'"):
        dag.run(replace(cfg, teacher=replace(cfg.teacher, preset="XXXL")), only=["teacher"], executor=InlineExecutor())
    with pytest.raises(ValueError, match="not divisible by num_workers x batch_gpu"):
        C.load_config("ci", ["teacher.num_workers=3"])
    with pytest.raises(ValueError, match="must be a multiple of teacher.batch"):
        C.load_config("ci", ["teacher.snapshot_nimg=100"])
    with pytest.raises(ValueError, match="teacher.use_gpu=false"):
        dag.run(C.load_config("ci", [*STEPS_CFG, "teacher.use_gpu=true"], storage=cfg.storage),
                only=["teacher"], executor=InlineExecutor())
    with pytest.raises(ValueError, match="img_resolution"):
        dag.run(C.load_config("ci", [*STEPS_CFG, "teacher.channel_mult=[1,2,2,2,2,2]"], storage=cfg.storage),
                only=["teacher"], executor=InlineExecutor())
    assert _teacher(cfg).state() == "missing"


# --- the divergence guard ------------------------------------------------------------------------

def test_a_learning_rate_that_diverges_stops_before_commit(tmp_path):
    cfg, _ = _encoded(str(tmp_path), "teacher.lr=1e6")
    with pytest.raises(Diverged, match=r"teacher diverged at \d+ images: .*\. Lower teacher.lr \(now "
                                       r"1e\+06\) or raise teacher.batch \(now 16\)\..* not committed"):
        dag.run(cfg, until="teacher", executor=InlineExecutor())
    assert _teacher(cfg).state() != "done"


def _nan_gradients(monkeypatch, bad_steps: set[int]) -> None:
    """Gradients of the listed optimiser steps (1-based) become NaN before the loop's check sees them."""
    real, calls = T.zero_nonfinite_grads_, []

    def poisoned(params):
        params = list(params)
        calls.append(1)
        if len(calls) in bad_steps:
            for p in params:
                if p.grad is not None:
                    p.grad.fill_(float("nan"))
        return real(params)

    monkeypatch.setattr(T, "zero_nonfinite_grads_", poisoned)


def test_a_nan_step_is_zeroed_and_counted_and_training_goes_on(tmp_path, monkeypatch):
    cfg, _ = _encoded(str(tmp_path))
    _nan_gradients(monkeypatch, {2})
    dag.run(cfg, until="teacher", executor=InlineExecutor())
    rows = [json.loads(line) for line in store.read_bytes(_teacher(cfg).path("metrics.jsonl")).decode().splitlines()]
    assert [r["nonfinite_steps"] for r in rows] == [0, 1, 0, 0]  # a row per step
    assert all(torch.isfinite(v).all() for v in load_denoiser(_teacher(cfg), "network").state_dict().values())


def test_nan_steps_after_a_checkpoint_stop_the_run_and_leave_the_checkpoint(tmp_path, monkeypatch):
    """Steps 3-5 (images 48-80) are non-finite: the guard stops at the third. The checkpoints at 32 and 64
    images stay (the zeroed steps changed nothing non-finite), and the artifact is not committed."""
    cfg, _ = _encoded(str(tmp_path), "teacher.duration_nimg=96")
    _nan_gradients(monkeypatch, {3, 4, 5})
    with pytest.raises(Diverged, match="teacher diverged at 80 images: the loss or its gradients were not finite "
                                       "for 3 steps in a row"):
        dag.run(cfg, until="teacher", executor=InlineExecutor())
    art = _teacher(cfg)
    assert art.state() == "partial"
    checkpoints = InlineSession(DDPJob("teacher", art.path("checkpoints"), 1, False, 0))._checkpoints()
    states = [torch.load(store.join(c, STATE_FILE), weights_only=True) for c in checkpoints]  # local storage
    assert [s["nimg"] for s in states] == [32, 64]
    assert all(torch.isfinite(v).all() for s in states for v in s["net"].values())
