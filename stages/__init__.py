"""The stages of the DAG, declared, in a topological order (each after its upstream).

Each module of this package is one stage: its run function and the glue around the library.
This file declares them (pipeline/stage.py) and imports none of them: the DAG imports a stage's
module when the stage runs, and nothing else does.
"""

from pipeline import outputs as O
from pipeline.stage import DDP, MAP, Stage

STAGES: tuple[Stage, ...] = (
    # 2: synthetic classes differ by shape only (colour random per image); 3: folders sampled by class
    Stage("encode", version="3", section="encode", upstream=(), runs=MAP, run="stages.encode:run",
          outputs=O.EncodeOutputs, headline=("num_samples",), piecewise=True),
    Stage("probe", version="1", section="probe", upstream=("encode",), runs=MAP, run="stages.probe:run",
          outputs=O.ProbeOutputs, headline=("holdout_accuracy",), runs_if=("enabled", True)),
    # 2: several networks (Inception, DINOv2), each where its weights can be had
    Stage("refstats", version="2", section="refstats", upstream=("encode",), runs=MAP, run="stages.refstats:run",
          outputs=O.RefstatsOutputs),
    # 2: attention reads qkv in EDM2's channel order
    Stage("teacher", version="2", section="teacher", upstream=("encode",), runs=DDP, run="stages.teacher:run",
          outputs=O.TeacherOutputs, headline=("metrics.loss",), runs_if=("source", "train")),
    Stage("phema", version="1", section="phema", upstream=("teacher",), runs=MAP, run="stages.phema:run",
          outputs=O.PhemaOutputs, piecewise=True),
    # 2: select: best; 3: the variants' samples in the data's class proportions (seeds.scored_labels)
    Stage("pairs", version="3", section="pairs", upstream=("encode", "probe", "phema"), runs=MAP,
          run="stages.pairs:run", outputs=O.PairsOutputs, headline=("num_pairs",), piecewise=True,
          upstream_if={"encode": ("select", "best"), "probe": ("select", "best")}),  # only the teacher's choice reads them
    # 2: a seeded random LPIPS backbone; 3: the fake score learns from the DM batch of G; 4: dmd2; 5: validation;
    # 6: validation's samples in the data's class proportions (seeds.scored_labels)
    Stage("distill", version="6", section="distill", upstream=("encode", "probe", "teacher", "phema", "pairs"),
          runs=DDP, run="stages.distill:run", outputs=O.DistillOutputs,
          headline=("metrics.loss_g", "validation.kept.fd_probe", "validation.kept.class_accuracy")),
    # 2: the probe's metrics, the real row, several feature networks, per-class grids; 3: a stratified real row;
    # 4: the samples' classes in the data's proportions (seeds.scored_labels)
    Stage("evaluate", version="4", section="eval", upstream=("encode", "probe", "refstats", "teacher", "phema", "distill"),
          runs=MAP, run="stages.evaluate:run", outputs=O.EvalOutputs,
          headline=("student_over_best_teacher", "student_class_accuracy", "best_teacher_class_accuracy")),
)
