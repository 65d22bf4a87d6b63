"""The distill stage on a tiny ci teacher: it trains, the regression loss falls, the student loads,
a killed run resumes to the same student; validation keeps the best student and stops a collapse
(keep: best only), warns of a student kept from before any step, and the trackers' runs end with it."""

import io
import itertools
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline import config as C
from pipeline import dag, store, tracking
from pipeline.data.encoders import encoder_from_info
from pipeline.diffusion.dmd import OneStepGenerator, student_sigmas
from pipeline.diffusion.phema import sigma_rel_to_gamma
from pipeline.distill import dmd
from pipeline.distill.dmd import DMD
from pipeline.distill.method import Method
from pipeline.distill.validation import against_teacher, report_validation
from pipeline.outputs import ChosenTeacher, PairsOutputs
from pipeline.executor import InlineExecutor, InlineSession
from pipeline.metrics.probe import ProbeFeatures
from pipeline.metrics.validation import Reference, score
from pipeline.sampling import Generator
from pipeline.seeds import counts_per_class, scored_labels, validation_seeds
from pipeline.training import Diverged
from pipeline.weights import load_denoiser, load_probe
from helpers import DISTILL_TINY, DMD2, VALIDATION, save_tiny_decoder, save_tiny_vae

def _cfg(storage: str, *extra: str) -> C.Config:
    return C.load_config("ci", [*DISTILL_TINY, *extra], storage=storage)


def _artifact(cfg: C.Config, stage: str) -> store.Artifact:
    return store.Store(cfg.storage).artifact(stage, dag.cache_keys(dag.graph(), cfg)[stage])


@pytest.fixture(scope="module")
def pairs_store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("distill") / "store"
    for stage in ("pairs", "probe"):  # every upstream of distill
        dag.run(_cfg(str(root)), until=stage, executor=InlineExecutor())
    return root


@pytest.fixture
def storage(pairs_store, tmp_path) -> str:
    shutil.copytree(pairs_store, tmp_path / "store")
    return str(tmp_path / "store")


def _rows(art: store.Artifact) -> list[dict]:
    return [json.loads(line) for line in store.read_bytes(art.path("metrics.jsonl")).decode().splitlines()]


def test_distill_trains_with_finite_losses_and_the_regression_loss_falls(storage):
    # Regression only, with a larger step: the generator must fit the 16 pairs better and better.
    cfg = _cfg(storage, "distill.duration_nimg=256", "distill.lr=0.01", "distill.lambda_reg=100")
    dag.run(cfg, until="distill", executor=InlineExecutor())
    art = _artifact(cfg, "distill")
    rows = _rows(art)
    assert [r["nimg"] for r in rows] == list(range(16, 257, 16))
    for r in rows:
        assert all(np.isfinite(r[k]) for k in ("loss_dm", "loss_reg", "loss_fake", "grad_norm"))
    first, last = np.mean([r["loss_reg"] for r in rows[:2]]), np.mean([r["loss_reg"] for r in rows[-2:]])
    assert last < 0.8 * first, (first, last)
    out = art.manifest()["outputs"]
    assert out["student"]["nfe"] == 1 and out["teacher"]["sigma_rel"] == 0.1


def test_student_loads_and_starts_from_the_teacher(storage):
    cfg = _cfg(storage, "distill.duration_nimg=16", "distill.lr=1e-9", "distill.fake_lr=1e-9")
    dag.run(cfg, until="distill", executor=InlineExecutor())
    student = load_denoiser(_artifact(cfg, "distill"), "student")
    teacher = load_denoiser(_artifact(cfg, "phema"), "network", "phema-0.1000.safetensors")
    z = torch.randn(2, 3, 16, 16)
    labels = torch.tensor([1, 7])
    torch.testing.assert_close(OneStepGenerator(student)(z, labels), teacher(80 * z, torch.full((2,), 80.0), labels),
                               atol=1e-4, rtol=1e-4)


def test_guidance_without_a_guide_is_refused(storage):
    with pytest.raises(ValueError, match="needs a guiding network: set pairs.guide"):
        dag.run(_cfg(storage, "distill.guidance=2"), only=["distill"], executor=InlineExecutor())


class KilledAfterFirstCheckpoint(InlineExecutor):
    """Its first training run dies right after its first checkpoint, as a killed process would."""

    killed = False

    def ddp(self, train_fn, args, job):
        if self.killed:
            return super().ddp(train_fn, args, job)
        self.killed = True

        class Dies(InlineSession):
            def report(self, metrics, checkpoint_dir):
                super().report(metrics, checkpoint_dir)
                raise KeyboardInterrupt("killed")

        train_fn(Dies(job), args)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dmd with validation", "dmd2", "dmd with validation and ema"])
def test_killed_and_rerun_distillation_equals_an_uninterrupted_one(pairs_store, tmp_path, method):
    students, validations = {}, {}
    for name, executor in (("whole", InlineExecutor()), ("killed", KilledAfterFirstCheckpoint())):
        shutil.copytree(pairs_store, tmp_path / name)
        # dmd2: the head and its real-image stream resume too; validation: the best student and the curve
        extra = DMD2 if method == "dmd2" else [*VALIDATION, "distill.early_stop_patience=0"]
        extra += ["distill.ema_sigma_rel=0.1"] if method.endswith("ema") else []
        cfg = _cfg(str(tmp_path / name), "distill.duration_nimg=128", *extra)  # checkpoints at 64 and 128
        if name == "killed":
            with pytest.raises(KeyboardInterrupt):
                dag.run(cfg, until="distill", executor=executor)
            assert _artifact(cfg, "distill").state() != "done"
        dag.run(cfg, until="distill", executor=executor)  # the rerun resumes from the checkpoint at 64
        students[name] = load_file(_artifact(cfg, "distill").path("student.safetensors"))
        validations[name] = _artifact(cfg, "distill").manifest()["outputs"]["validation"]
        validated = [0] if method != "dmd2" else []
        assert [r["nimg"] for r in _rows(_artifact(cfg, "distill"))] == validated + list(range(16, 129, 16))
    assert validations["whole"] == validations["killed"]
    assert [p["nimg"] for p in validations["whole"]["curve"]] == ([0, 32, 64, 96, 128] if method != "dmd2" else [])
    assert students["whole"].keys() == students["killed"].keys()
    for key, value in students["whole"].items():
        assert torch.equal(value, students["killed"][key]), key


@pytest.mark.parametrize("k", [1, 3])
def test_a_step_is_k_minus_1_fresh_fake_updates_then_one_on_gs_batch_then_g(storage, monkeypatch, k):
    events, dm_inputs, fake_inputs = [], [], []
    forward, dm_loss, fake_update, step = (OneStepGenerator.forward, dmd.distribution_matching_loss,
                                           DMD.fake_update, Method.optimizer_step)

    def recording_forward(self, z, labels=None, sigma=None):
        events.append(f"G {len(z)}" + ("" if torch.is_grad_enabled() else " no grad"))
        return forward(self, z, labels, sigma)

    def recording_dm_loss(x, *args, **kwargs):
        events.append("DM loss")
        dm_inputs.append(x.detach().clone())
        return dm_loss(x, *args, **kwargs)

    def recording_fake_update(self, x=None, labels=None):
        events.append("fake update on " + ("G's batch" if x is not None else "a fresh batch"))
        if x is not None:
            fake_inputs.append(x.clone())
        return fake_update(self, x, labels)

    def recording_step(*args):
        events.append("step")
        return step(*args)

    monkeypatch.setattr(dmd, "distribution_matching_loss", recording_dm_loss)
    monkeypatch.setattr(DMD, "fake_update", recording_fake_update)
    monkeypatch.setattr(Method, "optimizer_step", recording_step)
    monkeypatch.setattr(OneStepGenerator, "forward", recording_forward)
    cfg = _cfg(storage, f"distill.fake_updates_per_gen={k}", "distill.duration_nimg=16", "distill.log_nimg=8")
    dag.run(cfg, until="distill", executor=InlineExecutor())
    # DMD2's extra fake updates, each on a fresh batch of G; one forward of G for the DM and pair batches
    # (8 + 8); the fake score learns from that DM batch; then G's DM loss (with that fake score) and step
    one_step = [*["fake update on a fresh batch", "G 8 no grad", "step"] * (k - 1),
                "G 16", "fake update on G's batch", "step", "DM loss", "step"]
    assert events == one_step * 2
    assert len(fake_inputs) == len(dm_inputs) == 2
    assert all(torch.equal(a, b) for a, b in zip(fake_inputs, dm_inputs))


@pytest.mark.slow
def test_a_latent_model_distills_with_the_vae_or_the_lighter_lpips_decoder(tmp_path):
    vae, decoder = save_tiny_vae(tmp_path / "vae"), save_tiny_decoder(tmp_path / "taesd")
    rows = {}
    for name, extra in (("vae", []), ("tiny", [f"distill.lpips_decoder={decoder}"])):
        cfg = _cfg(str(tmp_path / "store"), "encode.encoder=vae", f"encode.vae={vae}", "distill.duration_nimg=8",
                   "distill.log_nimg=8", *extra)  # one step
        dag.run(cfg, until="distill", executor=InlineExecutor())
        rows[name] = _rows(_artifact(cfg, "distill"))
        assert len(rows[name]) == 1 and all(np.isfinite(v) for v in rows[name][0].values())
    assert rows["vae"][0]["loss_dm"] == rows["tiny"][0]["loss_dm"]  # the same step but for LPIPS's decoder
    assert rows["vae"][0]["loss_reg"] != rows["tiny"][0]["loss_reg"]


def test_a_diverging_distillation_stops_before_commit(storage):
    cfg = _cfg(storage, "distill.duration_nimg=256", "distill.lr=100", "distill.fake_lr=100")
    with pytest.raises(Diverged, match=r"distill diverged at \d+ images: .*Lower distill.lr and distill.fake_lr "
                                       r"\(now 100, 100\)\..*not committed"):
        dag.run(cfg, until="distill", executor=InlineExecutor())
    assert _artifact(cfg, "distill").state() != "done"


NO_GUARD = ["distill.divergence_ratio=1e9"]  # the sabotage's fake-score loss would trip the divergence guard


def _sabotage_g_after(monkeypatch, steps: int) -> None:
    """From generator step `steps` + 1 on, every step ends by raising G's output gain by 3: saturated
    colour noise (fd_probe ~10x the untouched student's with the tests' probe)."""
    original, calls = Method.generator_step, itertools.count(1)

    def g_step(self, loss):
        out = original(self, loss)
        if next(calls) > steps:
            with torch.no_grad():
                self.nets.generator.denoiser.unet.out_gain.add_(3.0)
        return out

    monkeypatch.setattr(Method, "generator_step", g_step)


def _rescore(cfg: C.Config) -> float:
    """The stored student's fd_probe on the validation seeds, computed here from its file."""
    student = load_denoiser(_artifact(cfg, "distill"), "student")
    probe = _artifact(cfg, "probe")
    ref = np.load(io.BytesIO(probe.read_bytes("reference.npz")))
    encode = _artifact(cfg, "encode").manifest()["outputs"]
    encoder = encoder_from_info(encode["encoder"])
    counts = counts_per_class(encode["class_counts"], encode["num_classes"])
    generator = Generator.student(student, student_sigmas(cfg.distill.student_steps, cfg.distill.sigma_init))
    figures = score(lambda seeds: generator(seeds, torch.tensor(scored_labels(seeds, counts)), "cpu"), encoder.decode,
                    ProbeFeatures(load_probe(probe), "cpu"), Reference(ref["mu"], ref["sigma"]),
                    validation_seeds(cfg.distill.val_images), 8, lambda t: t, torch.device("cpu"))
    return figures["fd_probe"]


@pytest.mark.slow
def test_keep_best_commits_the_best_validated_student_when_the_last_steps_are_made_worse(storage, monkeypatch):
    _sabotage_g_after(monkeypatch, 8)  # steps 9-12 (images 72-96) wreck G: the validation at 96 is the worst
    cfg = _cfg(storage, *VALIDATION, "distill.duration_nimg=96", "distill.early_stop_patience=0", *NO_GUARD)
    dag.run(cfg, until="distill", executor=InlineExecutor())
    out = _artifact(cfg, "distill").manifest()["outputs"]
    curve = out["validation"]["curve"]
    assert [p["nimg"] for p in curve] == [0, 32, 64, 96] and curve[-1]["fd_probe"] > 10 * min(p["fd_probe"] for p in curve[:-1])
    kept = min(curve, key=lambda p: p["fd_probe"])
    assert out["validation"]["kept"] == kept and out["student"]["nimg"] == kept["nimg"] and kept["nimg"] < 96
    assert _rescore(cfg) == pytest.approx(kept["fd_probe"], rel=1e-6)  # the file holds the weights it was chosen for
    rows = {r["nimg"]: r for r in _rows(_artifact(cfg, "distill"))}
    assert all(rows[p["nimg"]]["val_fd_probe"] == p["fd_probe"] for p in curve)  # the curve is in metrics.jsonl


def test_keep_last_never_stops_early_and_commits_the_last_step_even_when_it_is_worse(storage, monkeypatch):
    _sabotage_g_after(monkeypatch, 4)  # from image 32 on: a collapse that would stop a keep: best run at 96
    cfg = _cfg(storage, *VALIDATION, "distill.duration_nimg=128", "distill.early_stop_ratio=1.5",
               "distill.early_stop_patience=2", "distill.keep=last", *NO_GUARD)
    dag.run(cfg, until="distill", executor=InlineExecutor())
    out = _artifact(cfg, "distill").manifest()["outputs"]
    curve = out["validation"]["curve"]
    assert [p["nimg"] for p in curve] == [0, 32, 64, 96, 128] and out["validation"]["stopped"] == ""
    assert min(p["fd_probe"] for p in curve[2:]) > 1.5 * min(p["fd_probe"] for p in curve[:2])  # it did collapse
    assert out["validation"]["kept"]["nimg"] == out["student"]["nimg"] == 128
    assert _rescore(cfg) == pytest.approx(out["validation"]["kept"]["fd_probe"], rel=1e-6)


@pytest.mark.slow
def test_a_collapse_stops_the_run_early_keeps_the_best_student_and_the_manifest_says_so(storage, monkeypatch, caplog):
    closed = []
    monkeypatch.setattr(tracking.LiveLog, "close", lambda live: closed.append(live.run.stage))
    _sabotage_g_after(monkeypatch, 4)  # from image 32 on
    cfg = _cfg(storage, *VALIDATION, "distill.duration_nimg=512", "distill.early_stop_ratio=1.5",
               "distill.early_stop_patience=2", *NO_GUARD)
    dag.run(cfg, until="distill", executor=InlineExecutor())
    art = _artifact(cfg, "distill")
    out = art.manifest()["outputs"]
    validation = out["validation"]
    assert [p["nimg"] for p in validation["curve"]] == [0, 32, 64, 96]  # stopped after two bad validations
    assert "above 1.5 x its best" in validation["stopped"] and "for 2 validations in a row" in validation["stopped"]
    assert validation["kept"]["nimg"] in (0, 32) and out["student"]["nimg"] == validation["kept"]["nimg"]
    assert _rows(art)[-1]["nimg"] == 96  # no step after the stop
    assert "distill: stopped early" in caplog.text
    assert _rescore(cfg) == pytest.approx(validation["kept"]["fd_probe"], rel=1e-6)
    assert closed == ["distill"]  # the worker's tracker runs (W&B's) end with the early stop


def test_a_student_kept_from_before_any_step_is_committed_with_a_warning(storage, monkeypatch, caplog):
    _sabotage_g_after(monkeypatch, 0)  # every step wrecks G: no validation after the start beats it
    cfg = _cfg(storage, *VALIDATION, "distill.duration_nimg=32", "distill.early_stop_patience=0", *NO_GUARD)
    with caplog.at_level(logging.WARNING, logger="onestep"):
        dag.run(cfg, until="distill", executor=InlineExecutor())
    out = _artifact(cfg, "distill").manifest()["outputs"]
    assert out["student"]["nimg"] == out["validation"]["kept"]["nimg"] == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    warning = next(w for w in warnings if "every validation after the start was worse than the first" in w)
    assert "Try a lower distill.lr and distill.fake_lr (now 0.0001, 0.0001)" in warning


@pytest.mark.slow
def test_a_run_the_divergence_guard_stops_commits_its_best_validated_student_and_says_why(storage, monkeypatch):
    _sabotage_g_after(monkeypatch, 8)  # the fake score's loss leaves its range: the guard stops the run at 96
    cfg = _cfg(storage, *VALIDATION, "distill.duration_nimg=160", "distill.early_stop_patience=0")
    dag.run(cfg, until="distill", executor=InlineExecutor())
    validation = _artifact(cfg, "distill").manifest()["outputs"]["validation"]
    assert validation["stopped"].startswith("the divergence guard stopped it (distill diverged at")
    assert validation["kept"]["nimg"] < 96 and _rescore(cfg) == pytest.approx(validation["kept"]["fd_probe"], rel=1e-6)


@pytest.mark.slow
def test_the_student_is_gs_power_function_ema_and_validation_scores_it(storage):
    # G's own weights after one and after two steps, then the same two steps with an EMA at sigma_rel 0.1:
    # its student is beta theta_1 + (1 - beta) theta_2, beta = (1 - batch / nimg)^(gamma + 1)
    # (docs/algorithms.md, "Power-function EMA and post-hoc EMA")
    thetas = []
    for nimg in (8, 16):
        cfg = _cfg(storage, f"distill.duration_nimg={nimg}", "distill.lr=0.01")
        dag.run(cfg, until="distill", executor=InlineExecutor())
        thetas.append(load_file(_artifact(cfg, "distill").path("student.safetensors")))
    cfg = _cfg(storage, "distill.duration_nimg=16", "distill.lr=0.01", "distill.ema_sigma_rel=0.1")
    dag.run(cfg, until="distill", executor=InlineExecutor())
    student = load_file(_artifact(cfg, "distill").path("student.safetensors"))
    beta = 0.5 ** (sigma_rel_to_gamma(0.1) + 1)
    floats = [k for k, v in student.items() if v.is_floating_point()]
    assert any(not torch.allclose(thetas[0][k], thetas[1][k]) for k in floats)  # G moved in its second step
    for k in floats:
        torch.testing.assert_close(student[k], beta * thetas[0][k] + (1 - beta) * thetas[1][k], rtol=1e-5, atol=1e-6)
    # With validation, the EMA is what is scored and kept: other figures than G's, and the file's own
    curves = {}
    for ema in ("0", "0.1"):
        cfg = _cfg(storage, *VALIDATION, "distill.duration_nimg=64", "distill.lr=0.01", f"distill.ema_sigma_rel={ema}")
        dag.run(cfg, until="distill", executor=InlineExecutor())
        validation = _artifact(cfg, "distill").manifest()["outputs"]["validation"]
        curves[ema] = [p["fd_probe"] for p in validation["curve"]]
    assert curves["0"][0] == curves["0.1"][0] and curves["0"][1:] != curves["0.1"][1:]  # the same start, then not
    assert _rescore(cfg) == pytest.approx(validation["kept"]["fd_probe"], rel=1e-6)


def test_an_ema_outside_the_power_functions_range_is_refused(storage):
    with pytest.raises(ValueError, match=r"distill.ema_sigma_rel = 0.3: must be in \[0, 0.2887\)"):
        _cfg(storage, "distill.ema_sigma_rel=0.3")


def _pairs(chosen: float, selection: list[dict]) -> PairsOutputs:
    return PairsOutputs(num_pairs=0, num_shards=0, shards=[], pairs_made_this_run=0, nfe_per_pair=31,
                        teacher=ChosenTeacher(chosen, f"phema-{chosen:.4f}.safetensors"), selection=selection)


def test_the_student_is_set_beside_the_teacher_pairs_chose_on_the_same_seeds_and_count():
    selection = [{"sigma_rel": 0.05, "fd_probe": 20.0, "class_accuracy": 0.9, "count": 256},
                 {"sigma_rel": 0.1, "fd_probe": 15.0, "class_accuracy": 0.8, "count": 256}]
    kept = {"nimg": 960, "fd_probe": 30.0, "class_accuracy": 0.4, "count": 256}
    versus = against_teacher(kept, _pairs(0.1, selection), 16)
    assert versus["teacher"] == {**selection[1], "num_steps": 16}  # the variant distilled, not the other one
    assert versus["fd_probe_ratio"] == pytest.approx(2.0) and versus["class_accuracy_ratio"] == pytest.approx(0.5)
    assert against_teacher({**kept, "count": 128}, _pairs(0.1, selection), 16) is None  # other seeds' count
    assert against_teacher(kept, _pairs(0.1, []), 16) is None  # pairs.select: fixed scored no variant
    assert against_teacher(None, _pairs(0.1, selection), 16) is None  # no validation
    unconditional = against_teacher({**kept, "class_accuracy": None}, _pairs(0.1, selection), 16)
    assert unconditional["class_accuracy_ratio"] is None and unconditional["fd_probe_ratio"] == pytest.approx(2.0)


def _reported(kept: dict, selection: list[dict], caplog) -> dict:
    """What distill's report makes of a validation.json with `kept`, beside pairs' `selection`."""
    validation = {"curve": [kept], "kept": kept, "stopped": ""}
    with caplog.at_level(logging.INFO, logger="onestep"):
        return report_validation(logging.getLogger("onestep"), validation, C.DistillConfig(val_images=256),
                                 _pairs(0.1, selection), 16)


def test_a_student_that_lost_its_classes_says_so_and_one_that_held_them_does_not(caplog):
    teacher = {"sigma_rel": 0.1, "fd_probe": 15.0, "class_accuracy": 0.9, "count": 256}
    held = _reported({"nimg": 960, "fd_probe": 18.0, "class_accuracy": 0.75, "count": 256}, [teacher], caplog)
    assert held["against_teacher"]["fd_probe_ratio"] == pytest.approx(1.2)
    assert "on the same seeds: fd_probe 15, class accuracy 90.0%" in caplog.text and "lost its classes" not in caplog.text
    lost = _reported({"nimg": 960, "fd_probe": 18.0, "class_accuracy": 0.7, "count": 256}, [teacher], caplog)
    assert lost["against_teacher"]["class_accuracy_ratio"] < 0.8
    assert "the student has lost its classes: class accuracy 70.0% on validation against its teacher's 90.0%" in caplog.text


@pytest.mark.slow
def test_distill_records_its_student_beside_the_teacher_figures_pairs_measured(storage, monkeypatch):
    _sabotage_g_after(monkeypatch, 0)  # every step wrecks G: the student kept (the last) draws colour noise
    cfg = _cfg(storage, *VALIDATION, "distill.val_images=32", "distill.duration_nimg=32", "distill.keep=last",
               "distill.early_stop_patience=0", *NO_GUARD)
    dag.run(cfg, until="distill", executor=InlineExecutor())
    pairs = _artifact(cfg, "pairs").manifest()["outputs"]
    validation = _artifact(cfg, "distill").manifest()["outputs"]["validation"]
    versus, kept = validation["against_teacher"], validation["kept"]
    teacher = next(s for s in pairs["selection"] if s["sigma_rel"] == pairs["teacher"]["sigma_rel"])
    assert versus["teacher"]["fd_probe"] == teacher["fd_probe"] and versus["teacher"]["count"] == kept["count"] == 32
    assert versus["fd_probe_ratio"] == pytest.approx(kept["fd_probe"] / teacher["fd_probe"])
    assert versus["fd_probe_ratio"] > 1.5  # the wreck is far from its teacher
    assert versus["class_accuracy_ratio"] == pytest.approx(kept["class_accuracy"] / teacher["class_accuracy"])
    unmatched = _cfg(storage, *VALIDATION, "distill.duration_nimg=32")  # 24 validation images against pairs' 32
    dag.run(unmatched, until="distill", executor=InlineExecutor())
    assert _artifact(unmatched, "distill").manifest()["outputs"]["validation"]["against_teacher"] is None
