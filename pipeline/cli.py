"""`onestep run | status | runs | show | verify | sample | sweep | import-edm2 | runtime-env`: the command line, also
behind `workflows/full.py`.

    onestep run                          # the demo preset into ./artifacts
    onestep run --config ci --storage /tmp/os --set encode.num_images=200 --dry-run
    onestep status --config ci --storage /tmp/os
    onestep runs --storage /tmp/os                      # every artifact stored: status, headline, config diff
    onestep show encode --config ci --storage /tmp/os
    onestep verify --config ci --storage /tmp/os        # re-read every stored file against its manifest
    onestep run --repair encode --config ci --storage /tmp/os
    onestep sample --model student --num 16 --out grid.png --config ci --storage /tmp/os
    onestep sweep --config ci --storage /tmp/os --grid distill.lr=1e-4,1e-3   # trials sharing the teacher
    onestep runtime-env --env AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY   # for ray job submit
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from pipeline import config as C
from pipeline import dag, store
from pipeline.outputs import EvalOutputs

log = logging.getLogger("onestep")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="demo", help="preset name or YAML file (default: demo)")
    p.add_argument("--storage", default=None, help="artifact root URL (default: the preset's, ./artifacts)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set encode.resolution=64 (repeatable)")


def add_run_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    p.add_argument("--only", nargs="+", default=[], metavar="STAGE", help="run just these stages, from cached upstream")
    p.add_argument("--force", nargs="+", default=[], metavar="STAGE", help="recompute these stages and everything downstream")
    p.add_argument("--until", default=None, metavar="STAGE", help="run this stage and what it needs, nothing after")
    p.add_argument("--wait", action=argparse.BooleanOptionalAction, default=True,
                   help="when another run is writing an artifact this one needs: wait for it and use its result "
                   "(default), or stop with an error naming it (--no-wait)")
    p.add_argument("--repair", nargs="+", default=[], metavar="STAGE",
                   help="first re-read these stages' artifacts and remake their damaged files (only the damaged pieces "
                   "of encode, pairs and phema), and whatever downstream they change")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config, the plan and what it will cost (work, storage, "
                   "GPU-hours at the preset's estimate.* rates); run nothing")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="onestep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    add_run_args(sub.add_parser("run", help="compute the missing artifacts of the DAG"))
    _add_config_args(sub.add_parser("status", help="a table of every stage's artifact"))
    runs = sub.add_parser("runs", help="a table of every artifact on a storage: stage, key, status, headline "
                          "numbers, config against the preset (from the manifests; no tracking backend needed)")
    runs.add_argument("--storage", default="./artifacts", help="artifact root URL (default: ./artifacts)")
    runs.add_argument("--stage", nargs="+", default=[], metavar="STAGE", help="only these stages (default: all)")
    runs.add_argument("--config", default=None, help="compare every config with this preset or YAML file "
                      "(default: each artifact's own preset)")
    show = sub.add_parser("show", help="print one stage's manifest")
    show.add_argument("stage")
    _add_config_args(show)
    verify = sub.add_parser("verify", help="re-read every file of the stored artifacts against their manifests' "
                            "checksums, in parallel tasks; exit 1 when one is damaged")
    verify.add_argument("stages", nargs="*", metavar="STAGE", help="the stages to check (default: all)")
    _add_config_args(verify)
    sample = sub.add_parser("sample", help="draw images from the student or a teacher variant of a run")
    _add_config_args(sample)
    sample.add_argument("--model", default="student", help="student | teacher[:SIGMA_REL] (default: the variant distilled, as the pairs stage chose it)")
    sample.add_argument("--steps", type=int, default=None, help="Heun steps for a teacher (default: eval.num_steps)")
    sample.add_argument("--num", type=int, default=16, help="how many images (seeds A, A+1, ...)")
    sample.add_argument("--seeds", default=None, metavar="A-B", help="seed range, inclusive (overrides --num)")
    sample.add_argument("--classes", type=int, nargs="+", default=None, help="class labels, cycled over the seeds")
    sample.add_argument("--out", required=True, help="a .png for one grid, or a folder for one PNG per seed")
    imp = sub.add_parser("import-edm2", help="an EDM2 release network (.pkl, path or URL) as network.json + network.safetensors")
    imp.add_argument("url", help="e.g. https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions/edm2-img64-s-1073741-0.075.pkl")
    imp.add_argument("--out", required=True, help="folder (path or fsspec URL) for network.json and network.safetensors")
    imp.add_argument("--key", default="ema", help="the network's entry in the file (EDM2: ema)")
    sweep = sub.add_parser("sweep", help="trials that differ in a few settings, in parallel, sharing every cached "
                           "upstream artifact: a comparison table and their validation curves")
    _add_config_args(sweep)
    sweep.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                       help="a setting's values (repeatable: every combination is a trial)")
    sweep.add_argument("--trial", action="append", default=[], metavar="'KEY=V [KEY=V ...]'",
                       help="one trial's settings (repeatable)")
    sweep.add_argument("--asha", action=argparse.BooleanOptionalAction, default=True,
                       help="stop trials whose validation fd_probe falls behind (ASHA, under Ray; default) or run "
                       "every trial to its end (--no-asha)")
    sweep.add_argument("--concurrency", type=int, default=0, help="trials at once (default: as many as fit)")
    renv = sub.add_parser("runtime-env", help="print a runtime_env JSON for `ray job submit --runtime-env-json`")
    renv.add_argument("--file", default="infra/runtime_env.yaml", help="the runtime_env YAML to start from")
    renv.add_argument("--env", nargs="+", default=[], metavar="VAR",
                      help="variables of this shell to pass to the job, e.g. AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY")
    return p


def cmd_runtime_env(args: argparse.Namespace) -> int:
    """The file's runtime_env plus the named variables' values from this shell: credentials reach
    the job's environment without being written into any file."""
    import yaml

    try:
        with open(args.file) as f:
            runtime_env = yaml.safe_load(f) or {}
    except OSError as e:
        raise ValueError(f"cannot read --file {args.file}: {e.strerror}; run from the repository root") from None
    missing = [name for name in args.env if name not in os.environ]
    if missing:
        raise ValueError(f"--env {' '.join(missing)}: not set in this shell; export it, or leave it out")
    runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), **{name: os.environ[name] for name in args.env}}
    print(json.dumps(runtime_env))
    return 0


def parse_seeds(text: str | None, num: int) -> list[int]:
    if text is None:
        return list(range(num))
    try:
        lo, hi = (int(v) for v in text.split("-"))
    except ValueError:
        raise ValueError(f"--seeds {text!r}: expected A-B, e.g. 0-63") from None
    if hi < lo:
        raise ValueError(f"--seeds {text!r}: the end is before the start")
    return list(range(lo, hi + 1))


def cmd_sample(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pipeline.report import grid_png
    from pipeline.sample import sample_images

    cfg = load(args)
    store.check_storage(cfg.storage)
    seeds = parse_seeds(args.seeds, args.num)
    classes = None if args.classes is None else [args.classes[i % len(args.classes)] for i in range(len(seeds))]
    images = sample_images(cfg, args.model, seeds, args.steps, classes)
    out = Path(args.out)
    if out.suffix.lower() == ".png":
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(grid_png(list(images)))
    else:
        out.mkdir(parents=True, exist_ok=True)
        for seed, image in zip(seeds, images):
            (out / f"{seed:06d}.png").write_bytes(grid_png([image]))
    print(f"wrote {len(images)} images from {args.model} to {out}")
    return 0


def load(args: argparse.Namespace) -> C.Config:
    return C.load_config(args.config, args.overrides, args.storage)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def status_table(cfg: C.Config) -> str:
    nodes = dag.graph()
    st = store.Store(cfg.storage)
    store.check_storage(st.root)
    keys = dag.cache_keys(nodes, cfg)
    lines = [f"storage: {store.redact(st.root)}",
             f"{'stage':<10} {'key':<16}  {'state':<8} {'size':>10} {'wall time':>10}"]
    for name in nodes:
        art = st.artifact(name, keys[name])
        manifest = art.manifest()
        state = "done" if manifest else art.state()
        size = _size(manifest["size_bytes"]) if manifest else "-"
        wall = f"{manifest['wall_time_s']:.1f} s" if manifest else "-"
        lines.append(f"{name:<10} {keys[name]:<16}  {state:<8} {size:>10} {wall:>10}")
    return "\n".join(lines)


def report_line(cfg: C.Config, plan: dag.Plan) -> str:
    """Where the evaluation report is and its headline, once evaluate is done ("" otherwise)."""
    report = store.Store(cfg.storage).artifact("evaluate", plan.keys["evaluate"])
    if "evaluate" not in plan.selected or report.manifest() is None:
        return ""
    out = EvalOutputs.read(report)
    steps = next((m["nfe"] for m in out.models if m["model"] == "student"), 1)
    line = (f"report: {store.redact(report.path('report.md'))} (and report.html): the {steps}-step student's "
            f"{out.metric} is {out.student_over_best_teacher:.2f}x the best teacher variant's "
            f"(sigma_rel {out.best_sigma_rel})")
    if out.student_class_accuracy is not None:
        line += (f"; class accuracy: student {out.student_class_accuracy:.1%}, "
                 f"best teacher {out.best_teacher_class_accuracy:.1%}")
    return line


def cmd_verify(args: argparse.Namespace) -> int:
    from pipeline.integrity import verify

    states, damage = verify(load(args), args.stages)
    for stage, state in states.items():
        bad = [d for d in damage if d.stage == stage]
        print(f"{stage:<10} {state:<8} {'not checked' if state != 'done' else f'{len(bad)} damaged' if bad else 'intact'}")
    for d in damage:
        print(f"damaged: {d}")
    if damage:
        stages = " ".join(dict.fromkeys(d.stage for d in damage))
        print(f"to remake them: onestep run --repair {stages} (with the same --config, --storage and --set)")
    return 1 if damage else 0


def cmd_run(args: argparse.Namespace) -> int:
    cfg = load(args)
    if args.dry_run:
        print(C.dump(cfg))
    if args.repair and not args.dry_run:
        from pipeline.integrity import repair

        repair(cfg, args.repair)  # the stale downstream artifacts it deletes are remade below
    plan = dag.run(cfg, args.only, args.force, args.until, dry_run=args.dry_run, wait=args.wait)
    print(plan.table() if args.dry_run or not plan.to_run else status_table(cfg))
    if args.dry_run:
        from pipeline.estimate import table

        print(table(cfg, plan.to_run))
    report = "" if args.dry_run else report_line(cfg, plan)
    if report:
        print(report)
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from pipeline import runs

    stages = list(dag.graph())
    dag.check_names(dag.graph(), args.stage, "--stage")
    if args.config is not None:
        C.load_config(args.config)  # an unknown preset fails here, naming the presets
    print(runs.table(args.storage, args.stage or stages, args.config))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from pipeline import sweep
    from pipeline.executor import make_executor

    trials = sweep.expand(args.config, args.overrides, args.storage, args.grid, args.trial)
    cfg = trials[0].config()
    dag.check_executor_storage(cfg.executor, cfg.storage)
    folder, table = sweep.sweep(trials, make_executor(cfg.executor, cfg.max_in_flight), args.asha, args.concurrency)
    print(sweep.table_md(table, f"{len(trials)} trials"))
    print(f"sweep: {store.redact(folder)}/table.md, table.csv, curves.png")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    cfg = load(args)
    nodes = dag.graph()
    if args.stage not in nodes:
        raise ValueError(f"unknown stage {args.stage}; stages: {', '.join(nodes)}")
    key = dag.cache_keys(nodes, cfg)[args.stage]
    store.check_storage(cfg.storage)
    manifest = store.Store(cfg.storage).artifact(args.stage, key).manifest()
    if manifest is None:
        raise ValueError(f"no {args.stage} artifact (key {key}) in {store.redact(cfg.storage)}: "
                         f"run `onestep run --until {args.stage}` with the same config first")
    print(json.dumps(manifest, indent=2, sort_keys=True))
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = parser().parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "sample":
            return cmd_sample(args)
        if args.command == "verify":
            return cmd_verify(args)
        if args.command == "import-edm2":
            from pipeline.models.edm2_import import import_network

            config = import_network(args.url, args.out, args.key)
            print(f"{args.out}: network.json + network.safetensors ({json.dumps(config)})")
            return 0
        if args.command == "runtime-env":
            return cmd_runtime_env(args)
        if args.command == "runs":
            return cmd_runs(args)
        if args.command == "sweep":
            return cmd_sweep(args)
        if args.command == "status":
            print(status_table(load(args)))
            return 0
        return cmd_show(args)
    except ValueError as e:
        print(f"onestep: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
