"""pipeline/evaluation.py without a DAG: each row samples its network as evaluate always has (the teacher's
Heun sampler, the student's G(z) = D(sigma z, sigma)), the grid classes, and the grids with real images beside."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import report
from pipeline.data.encoders import RgbEncoder
from pipeline.diffusion.sampler import edm_sampler, seeded_noise
from pipeline.evaluation import EvalJob, Model, generate, grid_classes, grid_pngs
from pipeline.models.edm2 import build_denoiser

SEEDS = [0, 1, 2, 3]


@pytest.fixture(scope="module")
def net() -> torch.nn.Module:
    torch.manual_seed(0)
    net = build_denoiser("ci", 16, 3, 10).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return net


def test_a_teacher_row_samples_with_its_heun_steps(net):
    model = Model("teacher", None, "", 0.1, 3)
    images, labels = generate(model, net, SEEDS, RgbEncoder(), "cpu", [2, 2, 5, 5])
    noise, drawn = seeded_noise(SEEDS, (3, 16, 16), 10, "cpu", [2, 2, 5, 5])
    assert np.array_equal(images, RgbEncoder().decode(edm_sampler(net, noise, drawn, num_steps=3)))
    assert labels.tolist() == [2, 2, 5, 5] and images.dtype == np.uint8 and images.shape == (4, 16, 16, 3)
    assert (model.nfe, model.label, model.config_name) == (5, "teacher sigma_rel=0.100", "network")


@pytest.mark.parametrize("sigmas, sigma", [((), 80.0), ((2.5,), 2.5)])
def test_a_one_step_student_row_is_the_denoiser_at_its_noise_level(net, sigmas, sigma):
    model = Model("student", None, "", None, 1, sigmas)
    images, labels = generate(model, net, SEEDS, RgbEncoder(), "cpu")
    noise, drawn = seeded_noise(SEEDS, (3, 16, 16), 10, "cpu")
    with torch.no_grad():
        x = net(sigma * noise, torch.full((4,), sigma), drawn)
    assert np.array_equal(images, RgbEncoder().decode(x)) and np.array_equal(labels, drawn.numpy())
    assert (model.nfe, model.label, model.config_name) == (1, "student (1 step)", "student")


def test_grid_classes_spread_over_the_dataset():
    assert grid_classes(10, 4) == [0, 3, 6, 9]
    assert grid_classes(3, 5) == [0, 1, 2]
    assert grid_classes(0, 3) == [None, None, None]


def _job(models: list[Model], classes: list[int | None], columns: int) -> EvalJob:
    return EvalJob(models, {}, {}, None, {}, [], classes, columns, 4, 0, "cpu")


def _cells(count: int, value: int) -> list[np.ndarray]:
    return [np.full((16, 16, 3), value + i, np.uint8) for i in range(count)]


def test_grids_put_the_real_images_of_each_class_beside_the_samples():
    models = [Model("teacher", None, "", 0.1, 3), Model("real", None, "", None, 0)]
    job = _job(models, [0, 5], 2)
    grid = [_cells(2, 10), _cells(2, 20)]
    results = [{"model": 0, "grid": grid, "real": {}}, {"model": 0, "grid": None, "real": {}},
               {"model": 1, "grid": None, "real": {5: _cells(1, 30)}},
               {"model": 1, "grid": None, "real": {0: _cells(2, 40), 5: _cells(2, 50)}}]
    real = [_cells(2, 40), [*_cells(1, 30), *_cells(1, 50)]]  # per class, in task order, `columns` at most
    assert grid_pngs(job, results) == [report.class_grid_png(grid, real), report.class_grid_png(real)]
    no_real = [r if r["model"] == 0 else {**r, "real": {}} for r in results]
    pngs = grid_pngs(job, no_real)
    assert pngs[1] is None and pngs[0] == report.class_grid_png(grid)


def test_an_unconditional_models_real_images_fill_whole_rows():
    models = [Model("teacher", None, "", 0.1, 3), Model("real", None, "", None, 0)]
    job = _job(models, [None, None], 3)
    grid = [_cells(3, 0), _cells(3, 3)]
    results = [{"model": 0, "grid": grid, "real": {}}, {"model": 1, "grid": None, "real": {None: _cells(5, 100)}}]
    model_png, real_png = grid_pngs(job, results)
    flat = _cells(5, 100)
    assert model_png == report.class_grid_png(grid, [flat[:3], flat[3:]])
    width, height = Image.open(io.BytesIO(real_png)).size
    assert height == Image.open(io.BytesIO(model_png)).size[1] and width < Image.open(io.BytesIO(model_png)).size[0]
