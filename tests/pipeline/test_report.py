"""The evaluation report's rendering: grids with gaps between cells, one plot per metric and per logged
training term (DMD2's GAN terms and head accuracies, validation curves), plots that a 1280-px page wraps,
and the number of images behind each FD next to it."""

import io

import numpy as np
from PIL import Image

from pipeline import report
from pipeline.outputs import DistillOutputs, ProbeOutputs, RefstatsOutputs

ROWS = [  # what evaluate's `score` makes: two teacher variants, a student, the real row
    {"model": "teacher", "label": "teacher sigma_rel=0.050", "sigma_rel": 0.05, "steps": 8, "nfe": 15, "fd_probe": 2.0,
     "class_accuracy": 0.8, "precision": 0.7, "recall": 0.6, "fd_inception": None, "fd_dinov2": None, "count": 64,
     "seconds": 3.0, "grid": "grids/00-teacher.png"},
    {"model": "teacher", "label": "teacher sigma_rel=0.100", "sigma_rel": 0.1, "steps": 8, "nfe": 15, "fd_probe": 1.5,
     "class_accuracy": 0.85, "precision": 0.75, "recall": 0.65, "fd_inception": None, "fd_dinov2": None, "count": 64,
     "seconds": 3.0, "grid": "grids/01-teacher.png"},
    {"model": "student", "label": "student (1 step)", "sigma_rel": None, "steps": 1, "nfe": 1, "fd_probe": 1.8,
     "class_accuracy": 0.9, "precision": 0.8, "recall": 0.5, "fd_inception": None, "fd_dinov2": None, "count": 64,
     "seconds": 1.0, "grid": "grids/02-student.png"},
    {"model": "real", "label": "real (held-out)", "sigma_rel": None, "steps": 0, "nfe": 0, "fd_probe": 0.1,
     "class_accuracy": 0.95, "precision": 0.9, "recall": 0.9, "fd_inception": None, "fd_dinov2": None, "count": 40,
     "seconds": 0.5, "grid": "grids/03-real.png"},
]
TEACHER = [{"nimg": n, "loss": 1.0 / n, "loss_by_sigma": {"0-0.1": 0.5, "10.0-inf": 2.0}, "lr": 0.01,
            "img_per_s": 100.0 + n, "nonfinite_steps": 0} for n in (8, 16, 24)]
DMD2 = [{"nimg": n, "loss_dm": 0.1, "loss_gan_g": 0.7, "loss_fake": 3.0, "loss_d": 1.3, "d_acc_real": 0.6,
         "d_acc_fake": 0.4, "loss_g": 0.2, "grad_norm": 1.0, "dm_normalizer": 0.05, "nonfinite_steps": 0.0,
         "img_per_s": 10.0} for n in (16, 32, 48, 64)]
for row, (fd, acc) in zip(DMD2[1::2], ((3.0, 0.5), (2.0, 0.7))):  # validation at 32 and 64 images only
    row.update(val_fd_probe=fd, val_class_accuracy=acc)
VALIDATION = {"curve": [{"nimg": 32, "fd_probe": 3.0, "class_accuracy": 0.5},
                        {"nimg": 64, "fd_probe": 2.0, "class_accuracy": 0.7}], "kept": {"nimg": 64, "fd_probe": 2.0}}


def _size(png: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(png)).size


def test_class_grids_have_white_gaps_between_cells_and_a_wider_one_before_the_real_images():
    cell = np.zeros((16, 16, 3), np.uint8)  # black 16-px images: every white pixel is a gap
    png = report.class_grid_png([[cell] * 3] * 2, [[cell] * 2] * 2)
    grid = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    scale = report.MIN_CELL // 16
    big, gap, block = 16 * scale, report.CELL_GAP, report.BLOCK_GAP
    assert grid.shape[:2] == (2 * big + gap, 3 * big + 2 * gap + block + 2 * big + gap)
    white_columns = np.flatnonzero((grid == 255).all(axis=(0, 2)))
    samples_right = 3 * big + 2 * gap
    expected = [*range(big, big + gap), *range(2 * big + gap, 2 * big + 2 * gap),
                *range(samples_right, samples_right + block), *range(samples_right + block + big,
                                                                     samples_right + block + big + gap)]
    assert white_columns.tolist() == expected
    assert np.flatnonzero((grid == 255).all(axis=(1, 2))).tolist() == list(range(big, big + gap))


def test_every_metric_and_every_logged_term_is_a_plot_of_its_own_narrower_than_the_page():
    files = report.render(ROWS, ["summary"], ["note"], TEACHER, DMD2, VALIDATION)
    plots = {name for name in files if name.startswith("plots/")}
    assert plots == {
        "plots/metric-fd_probe.png", "plots/metric-class_accuracy.png", "plots/metric-precision.png",
        "plots/metric-recall.png", "plots/teacher-loss.png", "plots/teacher-lr.png", "plots/teacher-nonfinite_steps.png",
        *(f"plots/distill-{t}.png" for t in ("loss_dm", "loss_gan_g", "loss_fake", "loss_d", "head_accuracy", "loss_g",
                                             "grad_norm", "dm_normalizer", "nonfinite_steps", "val_fd_probe",
                                             "val_class_accuracy"))}
    for name in plots:
        width, height = _size(files[name])
        assert width <= 400 and height <= 300, (name, width, height)  # three fit side by side in 1280 px
    page = files["report.html"].decode()
    assert "display:flex;flex-wrap:wrap" in page and "max-width:100%" in page
    assert all(f"src='{name}'" in page for name in plots)
    assert all(f"]({name})" in files["report.md"].decode() for name in plots)


def test_each_fd_shows_the_number_of_images_behind_it():
    files = report.render(ROWS, [], [], TEACHER, DMD2)
    md, page = files["report.md"].decode(), files["report.html"].decode()
    assert "| student (1 step) | - | 1 | 1.800 (n=64) | 90.0% |" in md
    assert "| real (held-out) | - | 0 | 0.100 (n=40) | 95.0% |" in md
    assert "<td>0.100 <small>n=40</small></td>" in page


def test_a_released_teacher_without_metrics_rows_has_no_teacher_plots():
    plots = report.training_pngs([], DMD2[:1])
    assert not any(name.startswith("plots/teacher-") for name in plots) and "plots/distill-loss_gan_g.png" in plots


def test_the_summary_names_the_best_teacher_and_compares_the_other_rows_with_it():
    best, lines = report.summarize(ROWS, "fd_probe")
    assert best is ROWS[1]
    assert lines == ["Best teacher EMA length by FD probe: **sigma_rel = 0.100** (FD probe 1.500).",
                     "The 1-step student's FD probe is **1.20x** the best teacher's (1 vs 15 network evaluations).",
                     "Class accuracy: student (1 step) 90.0%, best teacher 85.0%.",
                     "Class accuracy: real (held-out) 95.0%, best teacher 85.0%."]
    unlabelled = [{**r, "class_accuracy": None} if r["model"] == "teacher" else r for r in ROWS]
    assert [line for line in report.summarize(unlabelled, "fd_probe")[1] if "accuracy" in line] == []


def test_the_notes_say_what_each_figure_is_measured_against():
    probe = {"enabled": True, "holdout_accuracy": 0.9, "chance_accuracy": 0.1, "train_images": 480}
    refstats = {"networks": {"inception": {"metric_name": "FD (random-weight Inception)", "count": 64,
                                           "source": "encode", "random": True}},
                "skipped": {"dinov2": "no weights"}}
    notes = report.measurement_notes(32, ProbeOutputs.from_dict(probe), RefstatsOutputs.from_dict(refstats), 40)
    assert notes[0].startswith("32 generated images per model")
    assert "(held-out accuracy 90.0%, chance 10.0%) against its 480 training images; the real row is 40" in notes[1]
    assert notes[2] == ("FD (random-weight Inception) against 64 reference statistics (encode). The Inception network "
                        "has fixed RANDOM weights: not FID, comparable only with itself.")
    assert notes[3] == "dinov2: not computed (no weights)."
    assert len(report.measurement_notes(32, ProbeOutputs(enabled=False), RefstatsOutputs({}, {}), 0)) == 1


def test_the_student_note_says_which_checkpoint_and_which_teacher():
    student = {"file": "student.safetensors", "config": "student.json", "nfe": 1}
    best = DistillOutputs.from_dict({
        "student": {**student, "nimg": 512, "keep": "best"}, "metrics": {}, "train_wall_time_s": 1.0,
        "validation": {"curve": [{}, {}, {}], "stopped": "fd_probe above 2x its best"},
        "teacher": {"sigma_rel": 0.1, "file": "phema-0.1000.safetensors", "chosen_by": "pairs.sigma_rel"}})
    assert report.student_note(best, 1024) == (
        "The student is distill's generator after 512 of 1,024 images (the best of its 3 validations by fd_probe on "
        "validation seeds, not these). The run stopped early: fd_probe above 2x its best. Its teacher is the phema "
        "variant sigma_rel 0.1, chosen by pairs.sigma_rel.")
    last = DistillOutputs.from_dict({"student": student, "teacher": {"sigma_rel": 0.05, "file": "phema-0.0500.safetensors"},
                                     "validation": {}, "metrics": {}, "train_wall_time_s": 1.0})
    assert report.student_note(last, 1024) == ("The student is distill's generator after 1,024 of 1,024 images (its last "
                                         "step). Its teacher is the phema variant sigma_rel 0.05.")
