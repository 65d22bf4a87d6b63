"""The training loop (pipeline/trainer.py) on a toy trainee, one number that takes seeded random steps: the per-step
seed, chunks and checkpoints, resume, the divergence guard, validation with keep-best and early stop, and the
trackers' runs closed however the run ends."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipeline import store, training
from pipeline.config import TrackingConfig
from pipeline.executor import DDPJob, InlineSession
from pipeline.seeds import mix_seed
from pipeline.tracking import StageRun
from pipeline.trainer import VALIDATION_FILE, Loop, train
from pipeline.training import Diverged, check_diverged, gather_metrics


class Toy:
    """w moves by a unit Gaussian draw each step; its "loss" is w^2. `blow_up_at`: from that step on, the
    loss is 1e9 (a diverging run)."""

    def __init__(self, artifact: store.Artifact, blow_up_at: int = 0) -> None:
        self.artifact, self.blow_up_at = artifact, blow_up_at
        self.net = torch.nn.Linear(1, 1, bias=False)
        torch.nn.init.zeros_(self.net.weight)
        self.chunks: list[tuple[int, int]] = []

    @property
    def w(self) -> float:
        return float(self.net.weight.detach())

    def state(self):
        return {"net": self.net.state_dict()}

    def load(self, state):
        self.net.load_state_dict(state["net"])

    def begin_chunk(self, seed, steps):
        self.chunks.append((seed, steps))

    def step(self, nimg):
        with torch.no_grad():
            self.net.weight += torch.randn(())
        loss = 1e9 if self.blow_up_at and nimg >= self.blow_up_at else self.w ** 2
        return {"loss": loss, "nonfinite_steps": 0.0}

    def after_step(self, nimg):
        pass

    def guard_losses(self, step):
        return {"loss": step["loss"]}

    def reduce(self, steps, nimg, img_per_s):
        return {"nimg": nimg, "loss": sum(s["loss"] for s in steps) / len(steps), "w": self.w, "img_per_s": img_per_s}

    def generator(self):
        return SimpleNamespace(net=self.net)

    def save(self, weights):
        self.artifact.write_json("saved.json", {"w": float((weights or self.net.state_dict())["weight"])})


class Scores:
    """A validation whose fd_probe at each call is the next of `figures`."""

    def __init__(self, *figures: float) -> None:
        self.figures = list(figures)

    def score(self, generator, all_reduce, device):
        return {"fd_probe": self.figures.pop(0), "class_accuracy": None, "count": 8}

    def grid(self, generator, device):
        return np.zeros((2, 2, 3), np.uint8)


def _loop(artifact: store.Artifact, **changes) -> Loop:
    settings = {"name": "toy", "artifact": artifact, "seed": 7, "batch": 4, "duration_nimg": 40, "checkpoint_nimg": 16,
                "log_nimg": 8, "divergence_ratio": 100.0, "divergence_patience": 2, "divergence_fix": "Lower toy.lr.",
                **changes}
    return Loop(**settings)


def _run(tmp_path, name: str, toy_kwargs=None, validation=None, session=None, **changes) -> tuple[Toy, dict, store.Artifact]:
    artifact = store.Artifact(str(tmp_path / name))
    toy = Toy(artifact, **(toy_kwargs or {}))
    session = session or InlineSession(DDPJob("toy", artifact.path("checkpoints")))
    train(session, toy, _loop(artifact, **changes), validation)
    return toy, session.last_metrics, artifact


def test_each_step_draws_from_its_own_seed_in_chunks_between_checkpoints(tmp_path):
    toy, _, artifact = _run(tmp_path, "run")
    draws = [torch.randn((), generator=torch.Generator().manual_seed(mix_seed(7, 0, nimg))) for nimg in range(0, 40, 4)]
    assert toy.w == pytest.approx(float(sum(draws)), abs=1e-6)
    assert toy.chunks == [(mix_seed(7, 0, 0), 4), (mix_seed(7, 0, 16), 4), (mix_seed(7, 0, 32), 2)]  # to 16, 32, 40
    assert [r["nimg"] for r in gather_metrics(artifact)] == [8, 16, 24, 32, 40]
    assert json.loads(artifact.read_bytes("saved.json")) == {"w": pytest.approx(toy.w)}


class Killed(InlineSession):
    """Dies right after its first checkpoint, as a killed process would."""

    def report(self, metrics, checkpoint_dir):
        super().report(metrics, checkpoint_dir)
        if checkpoint_dir is not None:
            raise KeyboardInterrupt("killed")


def test_a_killed_and_resumed_run_ends_as_an_uninterrupted_one(tmp_path):
    whole, _, _ = _run(tmp_path, "whole")
    artifact = store.Artifact(str(tmp_path / "resumed"))
    with pytest.raises(KeyboardInterrupt):
        train(Killed(DDPJob("toy", artifact.path("checkpoints"))), Toy(artifact), _loop(artifact))
    resumed, _, _ = _run(tmp_path, "resumed")
    assert resumed.chunks == [(mix_seed(7, 0, 16), 4), (mix_seed(7, 0, 32), 2)]  # from the checkpoint at 16
    assert resumed.w == whole.w
    assert [r["w"] for r in gather_metrics(store.Artifact(str(tmp_path / "resumed")))] == \
        [r["w"] for r in gather_metrics(store.Artifact(str(tmp_path / "whole")))]


def test_a_diverging_run_reports_the_divergence_and_saves_nothing(tmp_path):
    _, metrics, artifact = _run(tmp_path, "run", {"blow_up_at": 20})
    with pytest.raises(Diverged, match=r"toy diverged at 32 images: loss = 1e\+09, above 100 x its starting value .* "
                                       r"for 2 log intervals in a row\. Lower toy.lr\..* not committed"):
        check_diverged(metrics, "toy")
    assert not artifact.exists("saved.json") and metrics["nimg"] == 16  # the chunk it started from


def test_keep_best_saves_the_best_validation_and_a_collapse_stops_the_run(tmp_path):
    scores = Scores(5.0, 2.0, 3.0, 4.5, 4.1, 1.0)  # at 0, 8, 16, 24, 32: the last two above 2 x 2.0
    toy, _, artifact = _run(tmp_path, "run", validation=scores, keep="best", val_every_nimg=8, early_stop_patience=2)
    record = json.loads(artifact.read_bytes(VALIDATION_FILE))
    assert [p["nimg"] for p in record["curve"]] == [0, 8, 16, 24, 32] and record["kept"]["nimg"] == 8
    assert "above 2 x its best (2 at 8 images) for 2 validations in a row" in record["stopped"]
    assert [r["nimg"] for r in gather_metrics(artifact)] == [0, 8, 16, 24, 32]  # no step after the stop
    w_at_8 = gather_metrics(artifact)[1]["w"]
    assert json.loads(artifact.read_bytes("saved.json")) == {"w": pytest.approx(w_at_8)} and toy.w != w_at_8


def test_keep_last_never_stops_early_and_saves_the_last_weights(tmp_path):
    scores = Scores(5.0, 2.0, 3.0, 4.5, 4.1, 9.0)
    toy, _, artifact = _run(tmp_path, "run", validation=scores, keep="last", val_every_nimg=8, early_stop_patience=2)
    record = json.loads(artifact.read_bytes(VALIDATION_FILE))
    assert [p["nimg"] for p in record["curve"]] == [0, 8, 16, 24, 32, 40] and record["stopped"] == ""
    assert record["kept"] == record["curve"][-1]
    assert json.loads(artifact.read_bytes("saved.json")) == {"w": pytest.approx(toy.w)}


def test_a_diverging_run_with_a_validated_best_stops_there_and_saves_the_best(tmp_path):
    scores = Scores(5.0, 2.0, 3.0, 3.0, 3.0, 3.0)
    _, metrics, artifact = _run(tmp_path, "run", {"blow_up_at": 20}, scores, keep="best", val_every_nimg=8)
    record = json.loads(artifact.read_bytes(VALIDATION_FILE))
    assert record["stopped"].startswith("the divergence guard stopped it (toy diverged at 32 images")
    assert "diverged" not in metrics and record["kept"]["nimg"] == 8
    assert [r["nimg"] for r in gather_metrics(artifact)] == [0, 8, 16, 24, 32]  # the rows up to the divergence


class RecordingLive:
    """In place of tracking.LiveLog: what the loop sends to the trackers, and whether their runs were closed."""

    made: list["RecordingLive"] = []

    def __init__(self, run):
        self.rows, self.images, self.closed = [], [], 0
        RecordingLive.made.append(self)

    def add(self, row):
        self.rows.append(row)

    def image(self, tag, image, nimg):
        self.images.append((tag, nimg))

    def flush(self, artifact, chunk_start):
        pass

    def close(self):
        self.closed += 1


@pytest.mark.parametrize("ending", ["the last step", "an early stop", "a divergence", "a divergence keeping the best",
                                    "an error"])
def test_the_trackers_runs_are_closed_however_the_run_ends(tmp_path, monkeypatch, ending):
    monkeypatch.setattr(training, "LiveLog", RecordingLive)
    monkeypatch.setattr(RecordingLive, "made", [])
    tracking = StageRun(TrackingConfig(), "toy", "0123456789abcdef")
    kwargs = {"an early stop": {"validation": Scores(5.0, 2.0, 9.0, 9.0), "keep": "best", "val_every_nimg": 8,
                                "early_stop_patience": 2},
              "a divergence": {"toy_kwargs": {"blow_up_at": 20}},
              "a divergence keeping the best": {"toy_kwargs": {"blow_up_at": 20}, "keep": "best", "val_every_nimg": 8,
                                                "validation": Scores(5.0, 2.0, 3.0, 3.0, 3.0)},
              "an error": {"session": Killed(DDPJob("toy", str(tmp_path / "run" / "checkpoints")))}}.get(ending, {})
    if ending == "an error":
        with pytest.raises(KeyboardInterrupt):
            _run(tmp_path, "run", tracking=tracking, **kwargs)
    else:
        _run(tmp_path, "run", tracking=tracking, **kwargs)
    assert [live.closed for live in RecordingLive.made] == [1]
    assert RecordingLive.made[0].rows  # it did log
