"""The stage declarations (stages/__init__.py, pipeline/stage.py) and the typed outputs (pipeline/outputs.py):
what the DAG, the CLI, `onestep runs` and the trackers read instead of stage modules."""

import importlib
import subprocess
import sys
from dataclasses import fields

import pytest

from pipeline import config as C
from pipeline import dag, outputs as O, tracking
from pipeline.stage import DDP, DRIVER, MAP, Stage
from stages import STAGES


def test_planning_a_run_imports_neither_torch_nor_a_stage_module():
    code = ("import sys; from pipeline import config as C, dag; dag.make_plan(dag.graph(), C.load_config('ci'), "
            "__import__('pipeline.store').store.Store('memory://plan')); "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('stages.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name)
def test_every_declaration_names_its_module_run_function_and_a_config_section(stage):
    module, _, name = stage.run.partition(":")
    assert module == f"stages.{stage.name}" and name == "run"
    assert callable(stage.function())
    assert stage.section in {f.name for f in fields(C.Config)}
    assert issubclass(stage.outputs, O.Outputs)
    mod = importlib.import_module(module)
    assert not {"VERSION", "UPSTREAM", "UPSTREAM_IF", "PIECEWISE"} & set(vars(mod)), "the declaration is the one place"


def test_declarations_are_in_topological_order_and_name_known_stages():
    seen: set[str] = set()
    for stage in STAGES:
        assert set(stage.upstream) <= seen and set(stage.upstream_if) <= set(stage.upstream), stage.name
        seen.add(stage.name)


class Recorder:
    """An executor that records the resource checks the DAG makes before a run."""

    def __init__(self) -> None:
        self.checked: list[str] = []

    def check(self, resources, what):
        self.checked.append(f"map:{what}")

    def check_ddp(self, job):
        self.checked.append(f"ddp:{job.name}")


@pytest.mark.parametrize("overrides, expected", [
    ([], ["map:encode", "map:probe", "map:refstats", "ddp:teacher", "map:phema", "map:pairs", "ddp:distill", "map:eval"]),
    (["probe.enabled=false", "distill.val_every_nimg=0", "distill.keep=last", "pairs.select=fixed"], ["map:encode", "map:refstats", "ddp:teacher", "map:phema", "map:pairs", "ddp:distill",
                               "map:eval"]),
])
def test_the_resource_checks_follow_each_declarations_way_of_running(overrides, expected):
    cfg = C.load_config("ci", overrides)
    recorder = Recorder()
    dag.check_resources(recorder, list(dag.graph().values()), cfg)
    assert recorder.checked == expected


def test_a_released_teacher_runs_in_the_driver():
    teacher = dag.graph()["teacher"]
    assert teacher.execution(C.load_config("ci").teacher) == DDP
    released = C.load_config("ci", ["teacher.source=edm2-release", "teacher.release=/nowhere/net.pkl"]).teacher
    assert teacher.execution(released) == DRIVER


def test_a_stage_declared_with_a_function_runs_it():
    stage = Stage("x", "1", "x", (), MAP, run=lambda ctx, cfg, inputs: {"ok": 1})
    assert stage.function()(None, None, {}) == {"ok": 1}
    with pytest.raises(AssertionError):
        Stage("x", "1", "x", (), "somewhere", run="m:f")


def test_the_trackers_headline_is_the_declarations():
    outputs = {"metrics": {"loss_g": 0.5, "loss_fake": 2.0}, "validation": {"kept": {"fd_probe": 3.0, "class_accuracy": 0.9}}}
    assert tracking.headline("distill", outputs) == {"metrics.loss_g": 0.5, "validation.kept.fd_probe": 3.0,
                                                      "validation.kept.class_accuracy": 0.9}
    assert tracking.headline("refstats", {"networks": {}}) == {}


DISTILL = {"student": {"file": "student.safetensors", "config": "student.json", "nfe": 2, "sigmas": [80.0, 2.5],
                       "nimg": 64, "keep": "best"},
           "teacher": {"sigma_rel": 0.1, "file": "phema-0.1000.safetensors", "chosen_by": "pairs.sigma_rel"},
           "validation": {"curve": [], "kept": None}, "metrics": {"loss_g": 1.0}, "train_wall_time_s": 3.5}


def test_typed_outputs_read_back_what_the_manifest_holds():
    read = O.DistillOutputs.from_dict(DISTILL)
    assert read.student.sigmas == [80.0, 2.5] and read.teacher.file == "phema-0.1000.safetensors"
    assert read.to_dict() == DISTILL
    older = {**DISTILL, "student": {"file": "student.safetensors", "config": "student.json", "nfe": 1}}
    student = O.DistillOutputs.from_dict(older).student  # an artifact from before multi-step students
    assert student.sigmas == [] and student.keep == "last" and student.nimg is None


def test_optional_outputs_are_left_out_while_unset():
    assert O.ProbeOutputs(enabled=False).to_dict() == {"enabled": False}
    phema = O.PhemaOutputs(variants=[O.Variant(0.1, "phema-0.1000.safetensors", 64)], nimg=64, network={},
                           snapshots_used=[], made_this_run=[0.1])
    assert phema.to_dict()["variants"] == [{"sigma_rel": 0.1, "file": "phema-0.1000.safetensors", "nimg": 64}]
    assert O.PhemaOutputs.from_dict(phema.to_dict()).variant(0.1) == phema.variants[0]
    assert O.PhemaOutputs.from_dict(phema.to_dict()).variant(0.2) is None
