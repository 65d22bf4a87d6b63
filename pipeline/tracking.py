"""Live experiment tracking through one adapter: TensorBoard event files inside each training artifact,
MLflow (one parent run per DAG run, a child run per stage that runs), Weights & Biases (a run per stage,
grouped by DAG run).

    onestep run --config ci --set 'tracking.backends=[tensorboard,mlflow]' --set tracking.mlflow_uri=http://127.0.0.1:5000

The driver opens the runs (`dag_run`, `DagRun.stage`) and closes them with the stage's headline numbers
and report files (`DagRun.end`). A training stage's rank-0 worker, in another process, logs every
metrics row and image as it comes (`LiveLog`, behind `training.MetricsLog`) from the picklable
`StageRun` it is handed. A backend that fails is dropped for the rest of the process after one warning
line: tracking never stops a run, and never enters a cache key. Event files reach the artifact through
`store`, one per checkpoint chunk (object stores cannot append).
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import store
from pipeline.config import Config, TrackingConfig, to_dict

if TYPE_CHECKING:  # numpy loads only where images are logged: `onestep status` stays fast
    import numpy as np

log = logging.getLogger("onestep")

# Under metrics/: training logs, whose wall times differ from run to run (see integrity._content).
TENSORBOARD_DIR = "metrics/tensorboard"
# The files of a finished stage that go to its MLflow and W&B runs: the report, its plots and grids, the logs.
REPORT_FILES = re.compile(r"^(report\.(html|md)|results\.json|metrics\.jsonl|(plots|grids)/[^/]+\.png)$")
FIXES = {"mlflow": "check tracking.mlflow_uri and that its server is up", "wandb": "check WANDB_API_KEY or set "
         "tracking.wandb_mode=offline", "tensorboard": "check that the storage takes the artifact's files"}
_dropped: set[str] = set()  # backends that failed in this process: not tried again
_wandb_runs: dict[str, Any] = {}  # W&B run id -> the run open in this process


def _guarded(backend: str, what: str, fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args), or None once `backend` has failed in this process (warned about once)."""
    if backend in _dropped:
        return None
    try:
        return fn(*args)
    except Exception as e:  # any failure of a tracker: the run goes on without it
        _dropped.add(backend)
        why = ("it is not installed: pip install 'onestep[tracking]'" if isinstance(e, ImportError)
               else f"{type(e).__name__}: {store.redact(str(e)).splitlines()[0][:300] if str(e) else ''}")
        log.warning("tracking: %s failed while %s (%s); the run goes on without %s (%s, or drop it from "
                    "tracking.backends)", backend, what, why, backend, FIXES[backend])
        return None


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """A metrics row's numbers by name, nested dicts flattened as `outer/inner`, images seen left out."""
    out: dict[str, float] = {}
    for name, value in row.items():
        if isinstance(value, dict):
            out.update({f"{name}/{k}": v for k, v in scalars(value).items()})
        elif isinstance(value, (int, float)) and name != "nimg":
            out[name] = float(value)
    return out


def _lookup(outputs: dict[str, Any], path: str) -> Any:
    for part in path.split("."):
        outputs = outputs.get(part) if isinstance(outputs, dict) else None
    return outputs


def headline(stage: str, outputs: dict[str, Any]) -> dict[str, float]:
    """The numbers a finished stage is judged by (its declaration's `headline`), those its outputs have."""
    from stages import STAGES

    paths = next((s.headline for s in STAGES if s.name == stage), ())
    found = {path: _lookup(outputs, path) for path in paths}
    return {path: float(v) for path, v in found.items() if isinstance(v, (int, float))}


def _model_metrics(outputs: dict[str, Any]) -> dict[str, float]:
    """evaluate: every model's metrics and the images behind them, as `student/fd_probe`, `teacher 0.050/count`."""
    out = {}
    for row in outputs.get("models", []):
        model = row["model"] if row.get("sigma_rel") is None else f"{row['model']} {row['sigma_rel']:.3f}"
        out.update({f"{model}/{k}": v for k, v in scalars(row).items() if k not in ("steps", "nfe", "sigma_rel", "seconds")})
    return out


@dataclass(frozen=True)
class StageRun:
    """A stage's runs, for the driver and for its training workers in other processes (picklable)."""

    cfg: TrackingConfig
    stage: str
    key: str
    mlflow_run: str = ""  # the child run's id; "" = no MLflow
    mlflow_uri: str = ""
    wandb_id: str = ""  # "" = no W&B
    group: str = ""  # the DAG run's name
    config: dict[str, Any] = field(default_factory=dict)  # the stage's config, with its key and upstream keys

    @property
    def name(self) -> str:
        return f"{self.stage}-{self.key}"


# --- MLflow ---------------------------------------------------------------------------------------

def _mlflow(run_cfg: TrackingConfig, uri: str) -> Any:
    return _mlflow_client(uri, max(1, round(run_cfg.timeout_s)))


@lru_cache(maxsize=4)
def _mlflow_client(uri: str, timeout_s: int) -> Any:
    """A client with short timeouts and few retries (MLflow's defaults retry for minutes); the user's
    MLFLOW_HTTP_REQUEST_* settings win."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(timeout_s))
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # two lines per run: one of ours instead
    from mlflow import MlflowClient

    return MlflowClient(uri)


def _mlflow_uri(uri: str) -> str:
    """The tracking URI every process uses: $MLFLOW_TRACKING_URI or MLflow's default for "", and a
    relative sqlite path made absolute (training workers may run in another folder)."""
    if not uri:
        import mlflow

        uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    return uri


def _check_reachable(uri: str, timeout_s: float) -> None:
    """A tracking server answers its /health within the timeout (before any client retries for long)."""
    if uri.startswith(("http://", "https://")):
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as response:
            response.read()


def _mlflow_tags(run: StageRun, artifact_url: str, parent: str) -> dict[str, str]:
    tags = {"mlflow.parentRunId": parent, "onestep.stage": run.stage, "onestep.key": run.key,
            "onestep.artifact": store.redact(artifact_url)}
    return {**tags, **{f"onestep.upstream.{u}": k for u, k in run.config["upstream"].items()}}


def _params(config: dict[str, Any]) -> list[Any]:
    from mlflow.entities import Param

    return [Param(name, str(value)[:6000]) for name, value in sorted(config.items()) if name != "upstream"]


def _metrics(values: dict[str, float], step: int, wall_time: float) -> list[Any]:
    """MLflow metrics; names reduced to the characters MLflow accepts."""
    from mlflow.entities import Metric

    stamp = int(wall_time * 1000)
    return [Metric(re.sub(r"[^\w\-. /:]", "_", k), v, stamp, step) for k, v in values.items()]


# --- Weights & Biases -----------------------------------------------------------------------------

def _wandb(run: StageRun) -> Any:
    """The stage's W&B run in this process: the one open here, or opened (resumed if it exists)."""
    if run.wandb_id not in _wandb_runs:
        import wandb

        opened = wandb.init(project=run.cfg.experiment, id=run.wandb_id, name=run.name, group=run.group,
                            job_type=run.stage, tags=[run.stage], config=run.config, mode=run.cfg.wandb_mode,
                            dir=run.cfg.wandb_dir or None, resume="allow", reinit="create_new",
                            settings=wandb.Settings(silent=True, console="off", disable_git=True))
        opened.define_metric("nimg")
        opened.define_metric("*", step_metric="nimg")  # resumed workers repeat steps: W&B keeps its own
        _wandb_runs[run.wandb_id] = opened
    return _wandb_runs[run.wandb_id]


def _wandb_close(run: StageRun, exit_code: int = 0) -> None:
    opened = _wandb_runs.pop(run.wandb_id, None)
    if opened is not None:
        opened.finish(exit_code=exit_code)


# --- live logging from a training worker ----------------------------------------------------------

@dataclass
class LiveLog:
    """Rank 0 of a training stage: every metrics row and image, as it comes, to the stage's MLflow and
    W&B runs; and per checkpoint chunk one TensorBoard event file into the artifact."""

    run: StageRun
    rows: list[tuple[float, dict[str, Any]]] = field(default_factory=list)  # (wall time, row) since the last flush
    images: list[tuple[float, str, np.ndarray, int]] = field(default_factory=list)

    def add(self, row: dict[str, Any]) -> None:
        now, values = time.time(), scalars(row)
        self.rows.append((now, row))
        if self.run.mlflow_run:
            _guarded("mlflow", f"logging {self.run.stage}'s metrics", self._mlflow_batch, values, row["nimg"], now)
        if self.run.wandb_id:
            _guarded("wandb", f"logging {self.run.stage}'s metrics", lambda: _wandb(self.run).log({"nimg": row["nimg"], **values}))

    def _mlflow_batch(self, values: dict[str, float], nimg: int, now: float) -> None:
        _mlflow(self.run.cfg, self.run.mlflow_uri).log_batch(self.run.mlflow_run, metrics=_metrics(values, nimg, now))

    def image(self, tag: str, image: np.ndarray, nimg: int) -> None:
        """uint8 [H, W, 3]: a TensorBoard image (at the next flush), an MLflow image, a W&B image."""
        self.images.append((time.time(), tag, image, nimg))
        if self.run.mlflow_run:
            _guarded("mlflow", f"logging {self.run.stage}'s image {tag}", lambda: _mlflow(
                self.run.cfg, self.run.mlflow_uri).log_image(self.run.mlflow_run, image, key=tag, step=nimg))
        if self.run.wandb_id:
            _guarded("wandb", f"logging {self.run.stage}'s image {tag}", self._wandb_image, tag, image, nimg)

    def _wandb_image(self, tag: str, image: np.ndarray, nimg: int) -> None:
        import wandb

        _wandb(self.run).log({"nimg": nimg, tag: wandb.Image(image)})

    def flush(self, artifact: store.Artifact, chunk_start: int) -> None:
        """This chunk's event file, `metrics/tensorboard/events.out.tfevents.{chunk_start}.onestep`
        (a rerun of the chunk rewrites it)."""
        if "tensorboard" in self.run.cfg.backends and (self.rows or self.images):
            _guarded("tensorboard", f"writing {self.run.stage}'s event file", write_events, artifact, chunk_start,
                     self.rows, self.images)
        self.rows, self.images = [], []

    def close(self) -> None:
        if self.run.wandb_id:
            _guarded("wandb", f"closing {self.run.stage}'s run", _wandb_close, self.run)


def event_file(chunk_start: int) -> str:
    return f"{TENSORBOARD_DIR}/events.out.tfevents.{chunk_start:012d}.onestep"


def write_events(artifact: store.Artifact, chunk_start: int, rows: list[tuple[float, dict[str, Any]]],
                 images: list[tuple[float, str, np.ndarray, int]]) -> None:
    """Scalars (step = images seen) and images as one event file, written locally, then into the artifact."""
    from tensorboardX import SummaryWriter

    with tempfile.TemporaryDirectory() as tmp:
        writer = SummaryWriter(tmp, flush_secs=3600)
        for wall_time, row in rows:
            for name, value in scalars(row).items():
                writer.add_scalar(name, value, row["nimg"], walltime=wall_time)
        for wall_time, tag, image, nimg in images:
            writer.add_image(tag, image, nimg, walltime=wall_time, dataformats="HWC")
        writer.close()
        [name] = os.listdir(tmp)
        data = Path(tmp, name).read_bytes()
    with artifact.open(event_file(chunk_start), "wb") as f:
        f.write(data)


# --- the driver's runs ----------------------------------------------------------------------------

class DagRun:
    """The runs of one `dag.run`: the MLflow parent, and each stage's MLflow child and W&B run."""

    def __init__(self, cfg: Config, name: str, stages: list[str]) -> None:
        self.cfg, self.name = cfg, name
        # workers may run in another folder: W&B's folder made absolute here
        self.tracking = replace(cfg.tracking, wandb_dir=str(Path(cfg.tracking.wandb_dir or ".").resolve()))
        self.stamp = uuid.uuid4().hex[:8]  # W&B ids: a rerun of the same stage is another run
        self.mlflow_uri, self.parent, self.experiment_id = "", "", ""
        if "mlflow" in self.tracking.backends:
            where = store.redact(self.tracking.mlflow_uri) or "$MLFLOW_TRACKING_URI or MLflow's default"
            self.parent = _guarded("mlflow", f"starting the DAG's run at {where}", self._start_parent, stages) or ""

    def _start_parent(self, stages: list[str]) -> str:
        self.mlflow_uri = _mlflow_uri(self.tracking.mlflow_uri)
        _check_reachable(self.mlflow_uri, self.tracking.timeout_s)
        client = _mlflow(self.tracking, self.mlflow_uri)
        experiment = client.get_experiment_by_name(self.tracking.experiment)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(self.tracking.experiment)
        tags = {"onestep.preset": self.cfg.preset, "onestep.stages": " ".join(stages)}
        run_id = client.create_run(experiment_id, run_name=self.name, tags=tags).info.run_id
        params = {"preset": self.cfg.preset, "storage": store.redact(self.cfg.storage), "seed": self.cfg.seed,
                  "executor": self.cfg.executor}
        client.log_batch(run_id, params=_params(params))
        self.experiment_id = experiment_id
        where = store.redact(self.mlflow_uri)
        where = f"{where.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}" if where.startswith("http") else where
        log.info("tracking: MLflow run %s at %s", self.name, where)
        return run_id

    def stage(self, stage: str, key: str, upstream: dict[str, str], section: Any, artifact_url: str) -> StageRun:
        """The stage's runs: an MLflow child of the DAG's run (params: its config; tags: its keys), a W&B run id."""
        config = {**to_dict(section), "key": key, "upstream": upstream}
        wandb = "wandb" in self.tracking.backends and "wandb" not in _dropped
        run = StageRun(self.tracking, stage, key, "", self.mlflow_uri, f"{stage}-{key}-{self.stamp}" if wandb else "",
                       self.name, config)
        if self.parent:
            child = _guarded("mlflow", f"starting the {stage} run", self._start_child, run, artifact_url)
            run = replace(run, mlflow_run=child or "")
        return run

    def _start_child(self, run: StageRun, artifact_url: str) -> str:
        client = _mlflow(self.tracking, self.mlflow_uri)
        child = client.create_run(self.experiment_id, run_name=run.name, tags=_mlflow_tags(run, artifact_url, self.parent))
        client.log_batch(child.info.run_id, params=_params(run.config))
        return child.info.run_id

    def end(self, run: StageRun, artifact: store.Artifact, manifest: dict[str, Any] | None) -> None:
        """A stage's end: committed (`manifest`), its numbers and report files go to its runs; else FAILED."""
        if manifest is None:
            if run.mlflow_run:
                _guarded("mlflow", f"ending the {run.stage} run", lambda: _mlflow(
                    self.tracking, self.mlflow_uri).set_terminated(run.mlflow_run, "FAILED"))
            if run.wandb_id:
                _guarded("wandb", f"ending the {run.stage} run", _wandb_close, run, 1)
            return
        numbers = {**{k: v for k, v in headline(run.stage, manifest["outputs"]).items()
                      if not k.startswith("metrics.")},  # the last row's: already logged live
                   **_model_metrics(manifest["outputs"]), "wall_time_s": float(manifest["wall_time_s"])}
        files = sorted(rel for rel in manifest["files"] if REPORT_FILES.match(rel))
        with tempfile.TemporaryDirectory() as tmp:
            files = _copy_report_files(artifact, files, tmp)
            if run.mlflow_run:
                _guarded("mlflow", f"ending the {run.stage} run", self._mlflow_end, run, numbers, tmp)
            if run.wandb_id:
                _guarded("wandb", f"ending the {run.stage} run", _wandb_end, run, numbers, tmp, files)

    def _mlflow_end(self, run: StageRun, numbers: dict[str, float], folder: str) -> None:
        client = _mlflow(self.tracking, self.mlflow_uri)
        client.log_batch(run.mlflow_run, metrics=_metrics(numbers, 0, time.time()))
        if os.listdir(folder):
            client.log_artifacts(run.mlflow_run, folder)
        client.set_terminated(run.mlflow_run, "FINISHED")

    def close(self, status: str) -> None:
        if self.parent:
            _guarded("mlflow", "ending the DAG's run", lambda: _mlflow(
                self.tracking, self.mlflow_uri).set_terminated(self.parent, status))


def _copy_report_files(artifact: store.Artifact, files: list[str], folder: str) -> list[str]:
    """The committed stage's report files copied into `folder` for its runs; those it cannot read are
    left out with a warning (the artifact is committed: tracking must not fail the run now)."""
    copied = []
    for rel in files:
        try:
            data = artifact.read_bytes(rel)
        except Exception as e:  # a damaged or vanished file, a storage hiccup
            log.warning("tracking: %s could not be read (%s: %s); the stage's runs go without it (check it with "
                        "`onestep verify`)", store.redact(artifact.path(rel)), type(e).__name__, store.redact(str(e))[:200])
            continue
        Path(folder, rel).parent.mkdir(parents=True, exist_ok=True)
        Path(folder, rel).write_bytes(data)
        copied.append(rel)
    return copied


def _wandb_end(run: StageRun, numbers: dict[str, float], folder: str, files: list[str]) -> None:
    import wandb

    opened = _wandb(run)
    opened.summary.update(numbers)
    media: dict[str, Any] = {f"files/{rel}": wandb.Image(str(Path(folder, rel))) for rel in files if rel.endswith(".png")}
    if "report.html" in files:
        media["report"] = wandb.Html(Path(folder, "report.html").read_text())
    if media:
        opened.log(media)
    _wandb_close(run)


@contextmanager
def dag_run(cfg: Config, stages: list[str]) -> Iterator[DagRun]:
    """The DAG run's trackers, named `{preset}-{time}`; the parent ends FAILED if a stage raised."""
    runs = DagRun(cfg, f"{cfg.preset}-{datetime.now():%Y%m%d-%H%M%S}", stages)
    try:
        yield runs
    except BaseException:
        runs.close("FAILED")
        raise
    runs.close("FINISHED")
