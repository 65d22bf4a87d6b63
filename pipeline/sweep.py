"""`onestep sweep`: runs that differ in a few settings, as parallel trials that share every cached artifact.

    onestep sweep --config demo --grid distill.lr=1e-3,2e-3 --grid distill.fake_lr=1e-3,2e-3
    onestep sweep --config ci --storage /tmp/os --trial distill.lr=1e-4 --trial "distill.lr=1e-3 distill.keep=last"

A trial is the base config (preset and --set) with its own overrides: one value of every --grid key
(their product), or one --trial. The upstream artifacts of distill are made first, once per distinct
key (trials that share the teacher share it); then the executor runs the trials in parallel, each a
distill and an evaluate of its own key (pipeline/executor.py `trials`: Ray Tune, with ASHA on the
validation fd_probe that distill reports, or one after another inline). The result, in
`{storage}/sweeps/{id}/`: `table.md` and `table.csv` (a row a trial: its overrides, keys, how it ended,
the student kept and its validation, evaluate's figures) and `curves.png` (each trial's validation curve).
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
from dataclasses import dataclass
from typing import Any

import yaml

from pipeline import config as C
from pipeline import dag, store
from pipeline.executor import Executor, TrialOutcome, TrialSchedule
from pipeline.outputs import DistillOutputs, EvalOutputs

TRAINED = ("distill", "evaluate")  # what each trial makes; everything upstream is shared


@dataclass(frozen=True)
class Trial:
    """One run of the sweep: the base config (preset, --set, storage) with `overrides` on top."""

    preset: str
    base: tuple[str, ...]
    storage: str | None
    overrides: tuple[str, ...]

    @property
    def name(self) -> str:
        return " ".join(self.overrides) or "(base)"

    def config(self) -> C.Config:
        return C.load_config(self.preset, [*self.base, *self.overrides], self.storage)


def _number(value: Any) -> Any:
    """YAML 1.1 reads 1e-3 (no dot) as a string: a number, as --set takes it."""
    try:
        return float(value) if isinstance(value, str) else value
    except ValueError:
        return value


def _values(text: str) -> list[Any]:
    """'distill.lr=1e-3,2e-3' -> the values as YAML reads them, split at top-level commas ([1, 2] stays one)."""
    _, raw = text.split("=", 1)
    values = yaml.safe_load(f"[{raw}]")
    if not values:
        raise ValueError(f"--grid {text!r}: no values after '=': expected KEY=V1,V2,...")
    return [_number(v) for v in values]


def _yaml(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...").strip()


def expand(preset: str, base: list[str], storage: str | None, grid: list[str], trials: list[str]) -> list[Trial]:
    """The trials of a sweep: the product of the --grid values, then every --trial ("K=V K2=V2")."""
    for text in grid:
        C.parse_override(text)  # KEY=VALUE, or a clear error
    keys = [g.split("=", 1)[0].strip() for g in grid]
    combos = itertools.product(*(_values(g) for g in grid)) if grid else []
    overrides = [tuple(f"{k}={_yaml(v)}" for k, v in zip(keys, combo)) for combo in combos]
    overrides += [tuple(t.split()) for t in trials]
    if not overrides:
        raise ValueError("a sweep needs trials: --grid KEY=V1,V2 (repeatable: their product) or --trial 'KEY=V ...'")
    found = [Trial(preset, tuple(base), storage, o) for o in overrides]
    for trial in found:
        trial.config()  # every trial's config is valid before anything runs
    return found


def sweep_id(trials: list[Trial]) -> str:
    payload = json.dumps([(t.preset, t.base, t.overrides) for t in trials], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def make_upstream(trials: list[Trial], executor: Executor) -> None:
    """The upstream artifacts of every trial's distill and evaluate, each distinct one once (later trials find
    it cached)."""
    nodes = dag.graph()
    shared = [n for n in nodes if n in dag.closure(nodes, set(TRAINED), downstream=False) and n not in TRAINED]
    for trial in trials:
        dag.run(trial.config(), only=shared, executor=executor)


def run_trial(trial: Trial, executor: Executor) -> dict[str, Any]:
    """In a trial's worker: its distill and evaluate; what the table shows of it."""
    cfg = trial.config()
    plan = dag.run(cfg, only=list(TRAINED), executor=executor)
    return summary(cfg, plan.keys)


def summary(cfg: C.Config, keys: dict[str, str]) -> dict[str, Any]:
    """A finished trial's row: the student kept and its validation, and evaluate's headline figures."""
    st = store.Store(cfg.storage)
    distill = DistillOutputs.read(st.artifact("distill", keys["distill"]))
    evaluate = EvalOutputs.read(st.artifact("evaluate", keys["evaluate"]))
    student = next(m for m in evaluate.models if m["model"] == "student")
    kept = distill.validation["kept"] or {}
    return {"keys": {k: keys[k] for k in ("teacher", "distill", "evaluate")},
            "kept_nimg": distill.student.nimg, "stopped": distill.validation["stopped"],
            "val_fd_probe": kept.get("fd_probe"), "val_class_accuracy": kept.get("class_accuracy"),
            "curve": [[p["nimg"], p["fd_probe"]] for p in distill.validation["curve"]],
            "metric": evaluate.metric, "student_metric": student[evaluate.metric],
            "student_over_best_teacher": evaluate.student_over_best_teacher,
            "class_accuracy": evaluate.student_class_accuracy,
            "teacher_class_accuracy": evaluate.best_teacher_class_accuracy}


def schedule(cfg: C.Config, asha: bool, concurrency: int) -> TrialSchedule:
    """ASHA's rungs start after two validations; a trial is `distill.duration_nimg` long."""
    d = cfg.distill
    if asha and not d.val_every_nimg:
        raise ValueError("ASHA stops trials on their validation fd_probe, but distill.val_every_nimg = 0: set it, or "
                         "pass --no-asha")
    return TrialSchedule(max_t=d.duration_nimg, grace_t=2 * d.val_every_nimg if asha else 0, workers=d.num_workers,
                         use_gpu=d.use_gpu, concurrency=concurrency)


def rows(trials: list[Trial], outcomes: list[TrialOutcome]) -> list[dict[str, Any]]:
    """The table: one row per trial, the finished ones by evaluate's metric, then the stopped and failed."""
    out = []
    for trial, outcome in zip(trials, outcomes):
        row: dict[str, Any] = {"trial": trial.name, "status": outcome.status,
                               "reported": [[r["nimg"], r["val_fd_probe"]] for r in outcome.reports]}
        if outcome.status == "done":
            row.update(outcome.result)
            if row["stopped"]:
                row["status"] = "done, stopped early"
        else:
            last = outcome.reports[-1] if outcome.reports else {}
            row.update({"curve": row["reported"], "val_fd_probe": last.get("val_fd_probe"), "error": outcome.error})
            if outcome.status == "stopped":
                row["status"] = f"stopped by ASHA at {int(last.get('nimg', 0))} images"
        out.append(row)
    return sorted(out, key=lambda r: (r.get("student_metric") is None, r.get("student_metric") or 0,
                                      r.get("val_fd_probe") or 0))


COLUMNS = [("trial", "trial", "{}"), ("status", "status", "{}"), ("kept_nimg", "student of (images)", "{}"),
           ("val_fd_probe", "validation fd_probe", "{:.3f}"), ("val_class_accuracy", "validation class acc.", "{:.1%}"),
           ("student_metric", "evaluate: student", "{:.3f}"), ("student_over_best_teacher", "/ best teacher", "{:.2f}x"),
           ("class_accuracy", "class accuracy", "{:.1%}"), ("teacher_class_accuracy", "teacher's", "{:.1%}")]


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    return "-" if value is None or value == "" else fmt.format(value)


def table_md(table: list[dict[str, Any]], title: str, base: str = "") -> str:
    lines = [f"# {title}", "", *([f"Every trial: {base}", ""] if base else []),
             "| " + " | ".join(h for _, h, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(r, k, f) for k, _, f in COLUMNS) + " |" for r in table]
    errors = [f"- {r['trial']}: {r['error']}" for r in table if r.get("error")]
    return "\n".join(lines + ([""] + errors if errors else [])) + "\n"


def table_csv(table: list[dict[str, Any]]) -> str:
    keys = [k for k, _, _ in COLUMNS] + ["stopped", "error", "keys"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    writer.writerows({**r, "keys": json.dumps(r.get("keys", {}))} for r in table)
    return buf.getvalue()


def curves_png(table: list[dict[str, Any]]) -> bytes:
    """Each trial's validation fd_probe against the generator images it had seen (log scale)."""
    from pipeline.report import figure_png, pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    drawn = [r for r in table if r.get("curve")]
    for r in drawn:
        ax.plot(*zip(*r["curve"]), "o-", ms=3, label=f"{r['trial']} ({r['status']})")
    ax.set(xlabel="generator images", ylabel="validation fd_probe", yscale="log", title="sweep: validation curves")
    if drawn:
        ax.legend(fontsize=7)
    return figure_png(fig)


def write(storage: str, ident: str, title: str, base: str, table: list[dict[str, Any]]) -> str:
    """table.md, table.csv, curves.png and sweep.json in {storage}/sweeps/{ident}; returns the folder."""
    folder = store.join(store.Store(storage).root, "sweeps", ident)
    store.write_bytes(store.join(folder, "table.md"), table_md(table, title, base).encode())
    store.write_bytes(store.join(folder, "table.csv"), table_csv(table).encode())
    store.write_bytes(store.join(folder, "curves.png"), curves_png(table))
    store.write_bytes(store.join(folder, "sweep.json"), json.dumps(table, indent=1).encode())
    return folder


def sweep(trials: list[Trial], executor: Executor, asha: bool = True, concurrency: int = 0) -> tuple[str, list[dict[str, Any]]]:
    """Run every trial; (the folder of the result, its table)."""
    base = trials[0].config()
    store.check_storage(base.storage)
    make_upstream(trials, executor)
    outcomes = executor.trials(run_trial, trials, schedule(base, asha, concurrency))
    table = rows(trials, outcomes)
    title = f"sweep of {len(trials)} trials on {base.preset}"
    settings = " ".join(f"--set {s}" for s in trials[0].base)
    return write(base.storage, sweep_id(trials), title, settings, table), table
