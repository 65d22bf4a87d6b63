"""The evaluation report: the metrics table, plots of the metrics and of training, sample grids.

Pure rendering: rows of results in, markdown / HTML text and PNG bytes out (`render`, `class_grid_png`), and
the report's sentences (`summarize`, `measurement_notes`, `student_note`); the evaluate stage writes them.
A row is one model (results.json): model, label, sigma_rel, steps, nfe, the metrics (None where not
computed), count (the images behind them), seconds and grid (the PNG's path in the artifact). Every plot
is a PNG of its own, laid out by the page.
"""

from __future__ import annotations

import html
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from pipeline.outputs import DistillOutputs, ProbeOutputs, RefstatsOutputs

# metric key -> (column title, format, lower is better)
METRICS: dict[str, tuple[str, str, bool]] = {
    "fd_probe": ("FD probe", "{:.3f}", True),
    "class_accuracy": ("class accuracy", "{:.1%}", False),
    "precision": ("precision", "{:.3f}", False),
    "recall": ("recall", "{:.3f}", False),
    "fd_inception": ("FID", "{:.2f}", True),
    "fd_dinov2": ("FD_DINOv2", "{:.2f}", True),
}
CELL_GAP = 4  # white pixels between a report grid's cells (touching 16-px digits read as vertical strips)
BLOCK_GAP = 16  # white pixels between a model's samples and the real images beside them
MIN_CELL = 48  # report grids upscale small images (nearest neighbour) to at least this many pixels
PANEL_INCHES, PANEL_DPI = (3.6, 2.7), 100  # one plot per metric or term: 360 x 270 px, wrapped by the page
TIMING = ("img_per_s", "val_seconds")  # logged, not plotted here: wall-clock numbers differ from run to run
SHARED_PANELS = {"d_acc_real": "head accuracy", "d_acc_fake": "head accuracy"}  # terms plotted together


def _canvas(cells: Sequence[Sequence[np.ndarray | None]], gap: int = 0) -> np.ndarray:
    """uint8 with cells[r][c] (equal-sized images, None = white) in place, `gap` white pixels between cells."""
    h, w, _ = next(img for row in cells for img in row if img is not None).shape
    cols = max(len(row) for row in cells)
    canvas = np.full((len(cells) * (h + gap) - gap, cols * (w + gap) - gap, 3), 255, np.uint8)
    for r, row in enumerate(cells):
        for c, img in enumerate(row):
            if img is not None:
                canvas[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = img
    return canvas


def _png(canvas: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="PNG")
    return buf.getvalue()


def grid_png(images: Sequence[np.ndarray]) -> bytes:
    """A square-ish grid of equally sized uint8 images [H, W, 3] as PNG bytes, cells touching."""
    cols = int(np.ceil(np.sqrt(len(images))))
    return _png(_canvas([list(images[i:i + cols]) for i in range(0, len(images), cols)]))


def grid(rows: Sequence[Sequence[np.ndarray]]) -> np.ndarray:
    """uint8 [H, W, 3]: rows of equally sized images, CELL_GAP white pixels apart (a tracker's picture)."""
    return _canvas(rows, CELL_GAP)


def _enlarged(rows: Sequence[Sequence[np.ndarray | None]], scale: int) -> list[list[np.ndarray | None]]:
    return [[None if img is None else img.repeat(scale, axis=0).repeat(scale, axis=1) for img in row] for row in rows]


def class_grid_png(rows: Sequence[Sequence[np.ndarray]], beside: Sequence[Sequence[np.ndarray]] = ()) -> bytes:
    """One class per row: a model's samples, then (after a wider gap) real images of the same class. Images
    smaller than MIN_CELL pixels are enlarged by an integer factor, pixels kept sharp; CELL_GAP white pixels
    separate the cells."""
    height = next(img for row in rows for img in row).shape[0]
    scale = max(1, -(-MIN_CELL // height))  # ceil(MIN_CELL / cell height)
    canvas = _canvas(_enlarged(rows, scale), CELL_GAP)
    if any(len(r) for r in beside):
        padded = [list(r) for r in beside][:len(rows)] + [[None]] * (len(rows) - len(beside))
        right = _canvas(_enlarged(padded, scale), CELL_GAP)
        gap = np.full((canvas.shape[0], BLOCK_GAP, 3), 255, np.uint8)
        canvas = np.concatenate([canvas, gap, right], axis=1)
    return _png(canvas)


def _fmt(value: Any, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    """The metrics computed for at least one model, in METRICS order."""
    return [k for k in METRICS if any(r.get(k) is not None for r in rows)]


def _cell(row: dict[str, Any], key: str, html_out: bool) -> str:
    """A metric's cell; a Fréchet distance with the number of images behind it (fewer images bias it upward)."""
    text = _fmt(row.get(key), METRICS[key][1])
    if not key.startswith("fd_") or row.get(key) is None or row.get("count") is None:
        return html.escape(text) if html_out else text
    return f"{text} <small>n={row['count']}</small>" if html_out else f"{text} (n={row['count']})"


def _cells(row: dict[str, Any], columns: list[str], html_out: bool) -> list[str]:
    sigma = "-" if row["sigma_rel"] is None else f"{row['sigma_rel']:.3f}"
    first = [row["label"], sigma, str(row["nfe"])]
    return [*(html.escape(c) if html_out else c for c in first), *(_cell(row, k, html_out) for k in columns),
            f"{row['seconds']:.1f}"]


def _headers(columns: list[str]) -> list[str]:
    return ["model", "sigma_rel", "NFE", *(METRICS[k][0] for k in columns), "time (s)"]


SAMPLES_TITLE = "Samples: one class per row, the same seeds for every model, real images on the right"


def report_md(rows: list[dict[str, Any]], summary: list[str], notes: list[str], plots: dict[str, list[str]]) -> str:
    """`plots`: section title -> PNG paths (see `_plots`)."""
    columns = _columns(rows)
    headers = _headers(columns)
    lines = ["# onestep evaluation", "", *notes, "", "| " + " | ".join(headers) + " |",
             "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cells(r, columns, html_out=False)) + " |" for r in rows]
    lines += ["", *summary, ""]
    for title, paths in plots.items():
        lines += [f"## {title}", "", *(f"![{_stem(p)}]({p})" for p in paths), ""]
    lines += [f"## {SAMPLES_TITLE}", ""]
    lines += [f"### {r['label']}\n\n![{r['label']}]({r['grid']})\n" for r in rows if r["grid"]]
    return "\n".join(lines)


STYLE = ("body{font-family:sans-serif;max-width:1200px;margin:1em auto;padding:0 1em}"
         ".wide{overflow-x:auto}table{border-collapse:collapse}td,th{padding:.2em .6em;text-align:right}"
         "td:first-child,th:first-child{text-align:left}small{color:#666}"
         ".panels{display:flex;flex-wrap:wrap;gap:8px}.panels img{width:360px;max-width:100%;height:auto}"
         ".grids{display:flex;flex-wrap:wrap;gap:24px 48px;align-items:flex-start}figure{margin:0;max-width:100%}"
         ".grids img{max-width:100%;height:auto;image-rendering:pixelated}")


def report_html(rows: list[dict[str, Any]], summary: list[str], notes: list[str], plots: dict[str, list[str]]) -> str:
    """A page that fits a 1280-px browser window: each plot is its own image, wrapped by the page."""
    columns = _columns(rows)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in _headers(columns))
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in _cells(r, columns, html_out=True)) + "</tr>" for r in rows)
    sections = "".join(f"<h2>{html.escape(title)}</h2><div class='panels'>"
                       + "".join(f"<img src='{p}' alt='{html.escape(_stem(p))}'>" for p in paths) + "</div>"
                       for title, paths in plots.items())
    grids = "".join(f"<figure><img src='{r['grid']}' alt='{html.escape(r['label'])}'><figcaption>"
                    f"{html.escape(r['label'])}</figcaption></figure>" for r in rows if r["grid"])
    paragraphs = "".join(f"<p>{html.escape(p).replace('**', '')}</p>" for p in notes)
    points = "".join(f"<li>{html.escape(s).replace('**', '')}</li>" for s in summary)
    return ("<!doctype html><html><head><meta charset='utf-8'><title>onestep evaluation</title>"
            f"<meta name='viewport' content='width=device-width'><style>{STYLE}</style></head><body>"
            f"<h1>onestep evaluation</h1>{paragraphs}<div class='wide'><table><tr>{head}</tr>{body}</table></div>"
            f"<ul>{points}</ul>{sections}<h2>{html.escape(SAMPLES_TITLE)}</h2><div class='grids'>{grids}</div>"
            "</body></html>")


def _stem(path: str) -> str:
    return path.rsplit("/", 1)[-1].removesuffix(".png")


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _panel() -> tuple[Any, Any]:
    return pyplot().subplots(figsize=PANEL_INCHES, dpi=PANEL_DPI)


def figure_png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    pyplot().close(fig)
    return buf.getvalue()


def metric_pngs(rows: list[dict[str, Any]]) -> dict[str, bytes]:
    """`plots/metric-{key}.png` per computed metric: against the teacher's sigma_rel, the student and real
    rows as lines."""
    teacher = [r for r in rows if r["model"] == "teacher"]
    out = {}
    for key in _columns(rows):
        fig, ax = _panel()
        ax.plot([r["sigma_rel"] for r in teacher], [r[key] for r in teacher], "o-", label="teacher (post-hoc EMA)")
        for r in rows:
            if r["model"] != "teacher" and r.get(key) is not None:
                colour = "tab:red" if r["model"] == "student" else "tab:green"
                ax.axhline(r[key], color=colour, linestyle="--", label=r["label"])
        ax.set_xlabel("EMA length sigma_rel")
        ax.set_title(METRICS[key][0] + (" (lower is better, log)" if METRICS[key][2] else ""), fontsize=9)
        if METRICS[key][2] and all(r[key] > 0 for r in rows if r.get(key) is not None):
            ax.set_yscale("log")  # distances: a poor student and the real row several decades apart
        ax.legend(fontsize=6)
        out[f"plots/metric-{key}.png"] = figure_png(fig)
    return out


def _terms(rows: list[dict[str, Any]]) -> list[str]:
    """Every number a run logged (but images seen and wall-clock rates), in first-seen order."""
    seen: dict[str, None] = {}
    for r in rows:
        seen.update({k: None for k, v in r.items() if isinstance(v, (int, float)) and k != "nimg" and k not in TIMING})
    return list(seen)


def _teacher_loss_png(teacher: list[dict[str, Any]]) -> bytes:
    """The teacher's loss, total and per sigma bucket."""
    fig, ax = _panel()
    ax.plot([r["nimg"] for r in teacher], [r["loss"] for r in teacher], "k-", lw=2, label="all")
    buckets = sorted({b for r in teacher for b in r.get("loss_by_sigma", {})}, key=lambda b: float(b.split("-")[0]))
    for bucket in buckets:
        points = [(r["nimg"], r["loss_by_sigma"][bucket]) for r in teacher if bucket in r.get("loss_by_sigma", {})]
        ax.plot(*zip(*points), lw=1, label=f"sigma {bucket}")
    ax.set(xlabel="images seen")
    ax.set_title("teacher loss (EDM2, with u(sigma))", fontsize=9)
    ax.legend(fontsize=5, ncol=2)
    return figure_png(fig)


def _term_png(stage: str, title: str, keys: list[str], rows: list[dict[str, Any]], kept_nimg: int | None) -> bytes:
    """One panel: `keys` of `rows` against images seen (points where a key is logged only now and then)."""
    fig, ax = _panel()
    for key in keys:
        points = [(r["nimg"], r[key]) for r in rows if r.get(key) is not None]
        sparse = len(points) < len(rows)
        ax.plot(*zip(*points), "o-" if sparse else "-", ms=3, label=key)
    if kept_nimg is not None and any(k.startswith("val_") for k in keys):
        ax.axvline(kept_nimg, color="tab:green", linestyle=":", label="kept checkpoint")
    ax.set(xlabel="generator images" if stage == "distill" else "images seen")
    ax.set_title(f"{stage} {title}", fontsize=9)
    if len(keys) > 1 or kept_nimg is not None:
        ax.legend(fontsize=6)
    return figure_png(fig)


def training_pngs(teacher: list[dict[str, Any]], distill: list[dict[str, Any]],
                  validation: dict[str, Any] | None = None) -> dict[str, bytes]:
    """`plots/{stage}-{term}.png` for every term each training run logged: the teacher's loss (with its sigma
    buckets) and learning rate; each distillation term (DMD2's GAN terms, its head's accuracies on one
    panel), the validation curves when present, with the kept checkpoint marked."""
    out = {"plots/teacher-loss.png": _teacher_loss_png(teacher)} if teacher else {}
    for name in (t for t in _terms(teacher) if t != "loss"):
        out[f"plots/teacher-{name}.png"] = _term_png("teacher", name, [name], teacher, None)
    kept = ((validation or {}).get("kept") or {}).get("nimg")
    panels: dict[str, list[str]] = {}
    for name in _terms(distill):
        panels.setdefault(SHARED_PANELS.get(name, name), []).append(name)
    for title, keys in panels.items():
        out[f"plots/distill-{title.replace(' ', '_')}.png"] = _term_png("distill", title, keys, distill, kept)
    return out


def _plots(rows: list[dict[str, Any]], teacher: list[dict[str, Any]], distill: list[dict[str, Any]],
              validation: dict[str, Any] | None = None) -> tuple[dict[str, list[str]], dict[str, bytes]]:
    """(section title -> plot paths, plot path -> PNG) of the report."""
    metrics, training = metric_pngs(rows), training_pngs(teacher, distill, validation)
    sections = {"Metrics against the teacher's EMA length": list(metrics), "Training": list(training)}
    return {t: paths for t, paths in sections.items() if paths}, {**metrics, **training}


def summarize(rows: list[dict[str, Any]], metric: str) -> tuple[dict[str, Any], list[str]]:
    """(the best teacher row by `metric`, the report's summary sentences)."""
    title = METRICS[metric][0]
    best = min((r for r in rows if r["model"] == "teacher"), key=lambda r: r[metric])
    lines = [f"Best teacher EMA length by {title}: **sigma_rel = {best['sigma_rel']:.3f}** ({title} {best[metric]:.3f})."]
    for r in rows:
        if r["model"] == "student":
            lines.append(f"The {r['nfe']}-step student's {title} is **{r[metric] / best[metric]:.2f}x** the best teacher's "
                         f"({r['nfe']} vs {best['nfe']} network evaluations).")
        if r["model"] != "teacher" and r["class_accuracy"] is not None:
            lines.append(f"Class accuracy: {r['label']} {r['class_accuracy']:.1%}, best teacher "
                         f"{best['class_accuracy']:.1%}." if best["class_accuracy"] is not None else "")
    return best, [line for line in lines if line]


def measurement_notes(num_images: int, probe: ProbeOutputs, refstats: RefstatsOutputs, real_count: int) -> list[str]:
    """What the figures are measured on: the seeds, the probe and each feature network."""
    out = [f"{num_images} generated images per model (seed i is image i of every model; its class is its place "
           "in a cycle of the classes in the data's proportions)."]
    if probe.enabled:
        out.append(f"Probe metrics: the features of a classifier trained on the dataset (held-out accuracy "
                   f"{probe.holdout_accuracy:.1%}, chance {probe.chance_accuracy:.1%}) against its "
                   f"{probe.train_images} training images; the real row is {real_count} held-out images."
                   " Precision and recall: k-NN manifolds, k = 3 (Kynkäänniemi et al. 2019).")
    for name, info in refstats.networks.items():
        random = " The Inception network has fixed RANDOM weights: not FID, comparable only with itself." if info["random"] else ""
        out.append(f"{info['metric_name']} against {info['count'] or 'published'} reference statistics ({info['source']}).{random}")
    out += [f"{name}: not computed ({why})." for name, why in refstats.skipped.items()]
    return out


def student_note(distill: DistillOutputs, duration_nimg: int) -> str:
    """Which checkpoint the student is: its step (of `duration_nimg`, distill's), how it was chosen, and an
    early stop if there was one."""
    student, validation = distill.student, distill.validation or {}
    how = {"best": f"the best of its {len(validation.get('curve', []))} validations by fd_probe on validation seeds, "
                   "not these", "last": "its last step"}[student.keep]
    stopped = f" The run stopped early: {validation['stopped']}." if validation.get("stopped") else ""
    teacher = distill.teacher
    source = f" Its teacher is the phema variant sigma_rel {teacher.sigma_rel:g}" + (
        f", chosen by {teacher.chosen_by}." if teacher.chosen_by else ".")
    nimg = duration_nimg if student.nimg is None else student.nimg
    return f"The student is distill's generator after {nimg:,} of {duration_nimg:,} images ({how}).{stopped}{source}"


def render(rows: list[dict[str, Any]], summary: list[str], notes: list[str], teacher: list[dict[str, Any]],
           distill: list[dict[str, Any]], validation: dict[str, Any] | None = None) -> dict[str, bytes]:
    """Every file of the report but the grids: report.md, report.html and their plots, by path in the artifact.
    `teacher` and `distill` are the training runs' metrics rows; `validation` distill's outputs' validation."""
    sections, pngs = _plots(rows, teacher, distill, validation)
    return {**pngs, "report.md": report_md(rows, summary, notes, sections).encode(),
            "report.html": report_html(rows, summary, notes, sections).encode()}
