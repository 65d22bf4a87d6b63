"""`onestep sample`: images of a run's student or of one of its teacher variants, by seed.

    onestep sample --model student --num 16 --out grid.png --config ci --storage /tmp/onestep
    onestep sample --model teacher:0.1 --steps 32 --seeds 0-7 --classes 3 --out samples/ --config ci

The run is the one its config names (the same cache keys as `onestep run`); seed i gives the image that
evaluate's model gives for seed i with the same class.
"""

from __future__ import annotations

import numpy as np

from pipeline import config as C
from pipeline import dag, store
from pipeline.data.encoders import encoder_from_info
from pipeline.evaluation import Model, generate, student_model
from pipeline.outputs import DistillOutputs, EncodeOutputs, PairsOutputs, PhemaOutputs


def _student(st: store.Store, keys: dict[str, str]) -> Model:
    model = Model("student", st.artifact("distill", keys["distill"]), DistillOutputs.file("weights"), None, 1)
    return student_model(model.artifact) if model.artifact.manifest() is not None else model


def _teacher(cfg: C.Config, st: store.Store, keys: dict[str, str], sigma: str, steps: int | None) -> Model:
    """The phema variant at `sigma` (default: the one the pairs were made with, else pairs.sigma_rel)."""
    pairs = st.artifact("pairs", keys["pairs"])
    made = pairs.manifest() is not None
    sigma_rel = float(sigma) if sigma else PairsOutputs.read(pairs).teacher.sigma_rel if made else cfg.pairs.sigma_rel
    return Model("teacher", st.artifact("phema", keys["phema"]), PhemaOutputs.variant_file(sigma_rel), sigma_rel,
                 steps or cfg.eval.num_steps)


def chosen_model(cfg: C.Config, st: store.Store, keys: dict[str, str], which: str, steps: int | None) -> Model:
    """`student` or `teacher[:SIGMA_REL]` of the run that `cfg` names; a ValueError says what to run first."""
    kind, _, sigma = which.partition(":")
    if kind not in ("student", "teacher"):
        raise ValueError(f"--model {which!r}: expected student or teacher[:SIGMA_REL]")
    model = _student(st, keys) if kind == "student" else _teacher(cfg, st, keys, sigma, steps)
    stage = "distill" if kind == "student" else "phema"
    if model.artifact.manifest() is None:
        raise ValueError(f"no {stage} artifact for this config in {store.redact(cfg.storage)}: "
                         f"run `onestep run --until {stage}` with the same --config/--set first")
    if not model.artifact.exists(model.weights):
        raise ValueError(f"no teacher variant at sigma_rel {model.sigma_rel}: add it to phema.sigma_rels "
                         "and rerun phema, or pick one of its variants")
    return model


def sample_images(cfg: C.Config, which: str, seeds: list[int], steps: int | None,
                  classes: list[int] | None) -> np.ndarray:
    """uint8 images [B, H, W, 3] of `seeds` (on the CPU), labelled `classes` if given."""
    keys, st = dag.cache_keys(dag.graph(), cfg), store.Store(cfg.storage)
    model = chosen_model(cfg, st, keys, which, steps)
    encoder = encoder_from_info(EncodeOutputs.read(st.artifact("encode", keys["encode"])).encoder)
    return generate(model, model.load(), seeds, encoder, "cpu", classes)[0]
