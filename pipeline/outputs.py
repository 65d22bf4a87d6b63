"""Each stage's outputs, typed: what its manifest's `outputs` holds and the files its artifact has.

A stage's run returns its `Outputs`; the DAG writes `to_dict()` into the manifest. A downstream stage
reads an upstream artifact with `Type.read(artifact)` and gets fields, never string paths into
another stage's manifest. Nested records (a variant, a chosen teacher, a student) stay plain dicts
where no stage reads inside them, and get a class where one does. Torch-free, like pipeline/stage.py.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

T = TypeVar("T", bound="Outputs")


def optional(default: Any = None) -> Any:
    """A field some runs of the stage do not have: left out of the manifest while it is None."""
    return field(default=default, metadata={"optional": True})


def _from(cls: type, value: Any) -> Any:
    """`value` as `cls` when cls is a record class (a dataclass of this module), else as it is."""
    if dataclasses.is_dataclass(cls) and isinstance(value, dict):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in value.items() if k in names})
    return value


class Record:
    """A dataclass read from JSON: unknown keys are ignored, record-typed fields are built."""

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        hints = {f.name: f.type for f in dataclasses.fields(cls)}
        known = {k: v for k, v in data.items() if k in hints}
        for name, value in known.items():
            kind = RECORDS.get(str(hints[name]))
            if kind is not None:
                known[name] = _from(kind, value) if not isinstance(value, list) else [_from(kind, v) for v in value]
        return cls(**known)

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None and f.metadata.get("optional"):
                continue
            out[f.name] = _plain(value)
        return out


def _plain(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


class Outputs(Record):
    """A stage's outputs. `FILES` names the files of its artifact that other stages read."""

    FILES: ClassVar[dict[str, str]] = {}

    @classmethod
    def read(cls: type[T], artifact: Any) -> T:
        """The outputs of a committed artifact (a pipeline.store.Artifact)."""
        manifest = artifact.manifest()
        if manifest is None:
            raise ValueError(f"{artifact.url} has no manifest: its stage has not finished; run it first")
        return cls.from_dict(manifest["outputs"])

    @classmethod
    def file(cls, what: str) -> str:
        return cls.FILES[what]


@dataclass(frozen=True)
class EncodeOutputs(Outputs):
    FILES: ClassVar[dict[str, str]] = {"index": "index.parquet"}
    num_samples: int
    num_shards: int
    shards: list[str]
    shards_made_this_run: int
    num_classes: int
    class_names: list[str]
    class_counts: dict[str, int]  # class index (a string, as JSON keys are) -> images
    shape: list[int]  # stored [C, H, W]
    encoder: dict[str, Any]  # pipeline.data.encoders.encoder_from_info's argument
    skipped: dict[str, Any]

    def shard_urls(self, artifact: Any) -> list[str]:
        return [artifact.path(name) for name in self.shards]


@dataclass(frozen=True)
class ProbeOutputs(Outputs):
    enabled: bool
    num_classes: int | None = optional()
    resolution: int | None = optional()
    train_images: int | None = optional()
    holdout_images: int | None = optional()
    feature_dim: int | None = optional()
    chance_accuracy: float | None = optional()
    train_accuracy: float | None = optional()
    holdout_accuracy: float | None = optional()
    epoch_losses: list[float] | None = optional()


@dataclass(frozen=True)
class RefstatsOutputs(Outputs):
    networks: dict[str, dict[str, Any]]  # network -> {weights, file, dim, count, source, metric_name, random}
    skipped: dict[str, str]  # network -> why it has no statistics


@dataclass(frozen=True)
class TeacherOutputs(Outputs):
    FILES: ClassVar[dict[str, str]] = {"network": "network.safetensors", "config": "network.json",
                                       "metrics": "metrics.jsonl", "snapshots": "snapshots/index.json"}
    num_parameters: int
    network: dict[str, Any]  # the config that rebuilds the network (pipeline.models.edm2.build_denoiser)
    snapshots: list[dict[str, Any]]  # {file or url, nimg, sigma_rel}
    final_ema: dict[str, str]
    metrics: dict[str, Any]  # the last metrics row
    train_wall_time_s: float | None = optional()
    source: str | None = optional()  # a release: edm2-release | edm2-snapshots
    release: dict[str, Any] | None = optional()  # {url, nimg, sigma_rel} of a release


@dataclass(frozen=True)
class Variant(Record):
    sigma_rel: float
    file: str
    nimg: int | None = optional()


@dataclass(frozen=True)
class PhemaOutputs(Outputs):
    FILES: ClassVar[dict[str, str]] = {"config": "network.json"}
    variants: list[Variant]
    nimg: int
    network: dict[str, Any]
    snapshots_used: list[dict[str, Any]]
    made_this_run: list[float]

    @staticmethod
    def variant_file(sigma_rel: float) -> str:
        """The weights of the variant of this EMA length."""
        return f"phema-{sigma_rel:.4f}.safetensors"

    def variant(self, sigma_rel: float) -> Variant | None:
        return next((v for v in self.variants if math.isclose(v.sigma_rel, sigma_rel, rel_tol=1e-6)), None)


@dataclass(frozen=True)
class ChosenTeacher(Record):
    sigma_rel: float
    file: str  # its weights in the phema artifact
    chosen_by: str | None = optional()


@dataclass(frozen=True)
class PairsOutputs(Outputs):
    num_pairs: int
    num_shards: int
    shards: list[str]
    pairs_made_this_run: int
    teacher: ChosenTeacher
    selection: list[dict[str, Any]]  # select: best: every variant's validation figures
    nfe_per_pair: int

    def shard_urls(self, artifact: Any) -> list[str]:
        return [artifact.path(name) for name in self.shards]


@dataclass(frozen=True)
class Student(Record):
    file: str
    config: str
    nfe: int  # its steps: network evaluations per sample
    sigmas: list[float] = field(default_factory=list)  # its noise levels (empty in artifacts of before multi-step)
    nimg: int | None = optional()  # the images it had seen when kept
    keep: str = "last"


@dataclass(frozen=True)
class DistillOutputs(Outputs):
    FILES: ClassVar[dict[str, str]] = {"weights": "student.safetensors", "config": "student.json",
                                       "metrics": "metrics.jsonl"}
    student: Student
    teacher: ChosenTeacher
    validation: dict[str, Any]
    metrics: dict[str, Any]
    train_wall_time_s: float


@dataclass(frozen=True)
class EvalOutputs(Outputs):
    FILES: ClassVar[dict[str, str]] = {"results": "results.json"}
    metric: str
    models: list[dict[str, Any]]
    best_sigma_rel: float
    num_images: int
    student_over_best_teacher: float
    student_class_accuracy: float | None
    best_teacher_class_accuracy: float | None


def made_with(artifact: Any, section: type) -> Any:
    """The config section (a pipeline.config dataclass) a committed artifact was made with."""
    from pipeline.config import section_from_dict

    return section_from_dict(section, artifact.manifest()["config"])


RECORDS: dict[str, type] = {"Variant": Variant, "list[Variant]": Variant, "ChosenTeacher": ChosenTeacher,
                            "Student": Student}


def canonical(outputs: Outputs | dict[str, Any]) -> dict[str, Any]:
    """What the manifest holds: the outputs as plain values."""
    return outputs.to_dict() if isinstance(outputs, Outputs) else outputs
