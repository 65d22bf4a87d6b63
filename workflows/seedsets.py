"""How far one evaluation can be trusted: a finished run's models scored on several seed sets.

    .venv/bin/python workflows/seedsets.py --config dmd2 --storage ./artifacts --sets 8 [--set k=v ...]

Every phema variant (eval.num_steps Heun steps) and the student of the run that the config names are
scored with the probe on `--sets` disjoint sets of eval.num_images of evaluate's seeds, the first set
being evaluate's own (its figures equal the report's). Prints each set's fd_probe and class accuracy,
their means, and the student's mean fd_probe over the best teacher's (the variant of lowest mean).
Needs the run's probe, phema and distill artifacts; nothing is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # pipeline/, stages/ from a checkout

from pipeline import config as C  # noqa: E402
from pipeline import dag, store  # noqa: E402
from pipeline.evaluation import (EvalJob, evaluate_range, references, score, student_model,  # noqa: E402
                                 teacher_models)
from pipeline.outputs import EncodeOutputs  # noqa: E402
from pipeline.seeds import counts_per_class  # noqa: E402


def _artifacts(cfg: C.Config) -> dict[str, store.Artifact]:
    if not cfg.probe.enabled:
        raise SystemExit("seed sets are scored with the probe, and this config has probe.enabled=false")
    keys, st = dag.cache_keys(dag.graph(), cfg), store.Store(cfg.storage)
    found = {}
    for stage in ("encode", "probe", "refstats", "phema", "distill"):
        artifact = st.artifact(stage, keys[stage])
        if artifact.state() != "done":
            raise SystemExit(f"{stage} {keys[stage]} is not in {store.redact(cfg.storage)}: run the config's DAG first "
                             f"(workflows/full.py with the same --config and --set)")
        found[stage] = artifact
    return found


def measure(cfg: C.Config, sets: int, device: str = "cpu") -> list[dict[str, Any]]:
    """One row per model (the teachers by sigma_rel, then the student): its label and, per set, the
    evaluate row of fd_probe, class accuracy, precision and recall on that set's seeds."""
    arts = _artifacts(cfg)
    models = [*teacher_models(arts["phema"], cfg.eval.num_steps), student_model(arts["distill"])]
    encode = EncodeOutputs.read(arts["encode"])
    job = EvalJob(models, encode.encoder, {}, arts["probe"], {}, [], [], 0, cfg.eval.batch, cfg.seed, device,
                  counts_per_class(encode.class_counts, encode.num_classes))
    refs = references(arts["probe"], arts["refstats"], {})
    n, per_task = cfg.eval.num_images, cfg.eval.images_per_task
    rows = []
    for index, model in enumerate(models):
        per_set = []
        for s in range(sets):  # set s: evaluate's images [s n, (s + 1) n), in evaluate's task ranges
            results = [evaluate_range(job, (index, s * n + lo, s * n + min(lo + per_task, n)))
                       for lo in range(0, n, per_task)]
            per_set.append(score(model, results, refs))
        rows.append({"label": model.label, "model": model.name, "sets": per_set})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """A markdown table: fd_probe (class accuracy) per set, the means, and the student over the best teacher."""
    sets = len(rows[0]["sets"])
    lines = ["| model | " + " | ".join(f"set {s}" for s in range(sets)) + " | fd_probe mean ± sd | class acc. mean |",
             "|---|" + "---|" * (sets + 2)]
    means = {}
    for row in rows:
        fd = np.array([r["fd_probe"] for r in row["sets"]])
        acc = [r["class_accuracy"] for r in row["sets"]]
        means[row["label"]] = fd.mean()
        cells = [f"{r['fd_probe']:.2f} ({r['class_accuracy']:.1%})" if r["class_accuracy"] is not None
                 else f"{r['fd_probe']:.2f}" for r in row["sets"]]
        sd = f" ± {fd.std(ddof=1):.2f}" if sets > 1 else ""
        mean_acc = f"{np.mean(acc):.1%}" if None not in acc else "-"
        lines.append(f"| {row['label']} | " + " | ".join(cells) + f" | {fd.mean():.2f}{sd} | {mean_acc} |")
    teachers = [r for r in rows if r["model"] == "teacher"]
    best = min(teachers, key=lambda r: means[r["label"]])
    student = next(r for r in rows if r["model"] == "student")
    ratio = means[student["label"]] / means[best["label"]]
    lines.append(f"\nstudent / best teacher ({best['label']}), mean fd_probe: {ratio:.2f}x")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="demo")
    p.add_argument("--storage", required=True)
    p.add_argument("--set", dest="sets_", action="append", default=[], metavar="KEY=VALUE",
                   help="the run's config overrides, as given to workflows/full.py")
    p.add_argument("--sets", type=int, default=8, help="disjoint seed sets of eval.num_images (default 8)")
    args = p.parse_args()
    if args.sets < 1:
        raise SystemExit(f"--sets {args.sets}: need at least 1")
    cfg = C.load_config(args.config, args.sets_, storage=args.storage)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(table(measure(cfg, args.sets, device)))


if __name__ == "__main__":
    main()
