"""The evaluation report: the metrics table, plots of the metrics and of training, sample grids.

Pure rendering: rows of results in, markdown / HTML text and PNG bytes out; the evaluate stage
writes them. A row is one model (results.json): model, label, sigma_rel, steps, nfe, the metrics
(None where not computed), seconds and grid (the PNG's path in the artifact).
"""

from __future__ import annotations

import html
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

# metric key -> (column title, format, lower is better)
METRICS: dict[str, tuple[str, str, bool]] = {
    "fd_probe": ("FD probe", "{:.3f}", True),
    "class_accuracy": ("class accuracy", "{:.1%}", False),
    "precision": ("precision", "{:.3f}", False),
    "recall": ("recall", "{:.3f}", False),
    "fd_inception": ("FID", "{:.2f}", True),
    "fd_dinov2": ("FD_DINOv2", "{:.2f}", True),
}
GAP = 4  # pixels (before upscaling) between a model's samples and the real images beside them
MIN_CELL = 48  # report grids upscale small images (nearest neighbour) to at least this many pixels


def _canvas(cells: Sequence[Sequence[np.ndarray | None]]) -> np.ndarray:
    """uint8 [rows*H, cols*W, 3] with cells[r][c] (equal-sized images, None = white) in place."""
    h, w, _ = next(img for row in cells for img in row if img is not None).shape
    cols = max(len(row) for row in cells)
    canvas = np.full((len(cells) * h, cols * w, 3), 255, np.uint8)
    for r, row in enumerate(cells):
        for c, img in enumerate(row):
            if img is not None:
                canvas[r * h:(r + 1) * h, c * w:(c + 1) * w] = img
    return canvas


def _png(canvas: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="PNG")
    return buf.getvalue()


def grid_png(images: Sequence[np.ndarray]) -> bytes:
    """A square-ish grid of equally sized uint8 images [H, W, 3] as PNG bytes."""
    cols = int(np.ceil(np.sqrt(len(images))))
    return _png(_canvas([list(images[i:i + cols]) for i in range(0, len(images), cols)]))


def class_grid_png(rows: Sequence[Sequence[np.ndarray]], beside: Sequence[Sequence[np.ndarray]] = ()) -> bytes:
    """One class per row: a model's samples, then (after a white gap) real images of the same class;
    images smaller than MIN_CELL pixels are enlarged by an integer factor, pixels kept sharp."""
    canvas = _canvas(rows)
    if any(len(r) for r in beside):
        right = _canvas([list(r) for r in beside] + [[None]] * (len(rows) - len(beside)))
        gap = np.full((canvas.shape[0], GAP, 3), 255, np.uint8)
        canvas = np.concatenate([canvas, gap, right[:canvas.shape[0]]], axis=1)
    scale = max(1, -(-MIN_CELL // (canvas.shape[0] // len(rows))))  # ceil(MIN_CELL / cell height)
    return _png(canvas.repeat(scale, axis=0).repeat(scale, axis=1))


def _fmt(value: Any, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    """The metrics computed for at least one model, in METRICS order."""
    return [k for k in METRICS if any(r.get(k) is not None for r in rows)]


def _cells(row: dict[str, Any], columns: list[str]) -> list[str]:
    sigma = "-" if row["sigma_rel"] is None else f"{row['sigma_rel']:.3f}"
    return [row["label"], sigma, str(row["nfe"]), *(_fmt(row.get(k), METRICS[k][1]) for k in columns),
            f"{row['seconds']:.1f}"]


def _headers(columns: list[str]) -> list[str]:
    return ["model", "sigma_rel", "NFE", *(METRICS[k][0] for k in columns), "time (s)"]


def report_md(rows: list[dict[str, Any]], summary: list[str], notes: list[str]) -> str:
    columns = _columns(rows)
    headers = _headers(columns)
    lines = ["# onestep evaluation", "", *notes, "", "| " + " | ".join(headers) + " |",
             "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cells(r, columns)) + " |" for r in rows]
    lines += ["", *summary, "", "![metrics against sigma_rel](metrics.png)", "", "## Training", "",
              "![training curves](curves.png)", "",
              "## Samples: one class per row, the same seeds for every model, real images on the right", ""]
    lines += [f"### {r['label']}\n\n![{r['label']}]({r['grid']})\n" for r in rows if r["grid"]]
    return "\n".join(lines)


def report_html(rows: list[dict[str, Any]], summary: list[str], notes: list[str]) -> str:
    columns = _columns(rows)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in _headers(columns))
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in _cells(r, columns)) + "</tr>" for r in rows)
    grids = "".join(f"<figure><img src='{r['grid']}' height='320'><figcaption>{html.escape(r['label'])}</figcaption>"
                    "</figure>" for r in rows if r["grid"])
    paragraphs = "".join(f"<p>{html.escape(p).replace('**', '')}</p>" for p in [*notes])
    points = "".join(f"<li>{html.escape(s).replace('**', '')}</li>" for s in summary)
    return ("<!doctype html><html><head><meta charset='utf-8'><title>onestep evaluation</title>"
            "<style>body{font-family:sans-serif;max-width:72em;margin:2em auto}td,th{padding:.2em .8em}"
            "figure{display:inline-block;margin:.5em}img{image-rendering:pixelated}</style></head><body>"
            f"<h1>onestep evaluation</h1>{paragraphs}<table><tr>{head}</tr>{body}</table><ul>{points}</ul>"
            "<img src='metrics.png'><h2>Training</h2><img src='curves.png'>"
            f"<h2>Samples: one class per row, the same seeds for every model, real images on the right</h2>{grids}"
            "</body></html>")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _figure_png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    _pyplot().close(fig)
    return buf.getvalue()


def metrics_png(rows: list[dict[str, Any]]) -> bytes:
    """Each computed metric against the teacher's sigma_rel; the student and real rows as lines."""
    plt = _pyplot()
    columns = _columns(rows)
    fig, axes = plt.subplots(1, len(columns), figsize=(3.2 * len(columns), 3), dpi=110, squeeze=False)
    teacher = [r for r in rows if r["model"] == "teacher"]
    for ax, key in zip(axes[0], columns):
        ax.plot([r["sigma_rel"] for r in teacher], [r[key] for r in teacher], "o-", label="teacher (post-hoc EMA)")
        for r, colour in ((r, "tab:red" if r["model"] == "student" else "tab:green") for r in rows if r["model"] != "teacher"):
            if r.get(key) is not None:
                ax.axhline(r[key], color=colour, linestyle="--", label=r["label"])
        ax.set_xlabel("EMA length sigma_rel")
        ax.set_title(METRICS[key][0] + (" (lower is better, log)" if METRICS[key][2] else ""), fontsize=9)
        if METRICS[key][2] and all(r[key] > 0 for r in rows if r.get(key) is not None):
            ax.set_yscale("log")  # distances: a poor student and the real row several decades apart
    axes[0][0].legend(fontsize=7)
    return _figure_png(fig)


DISTILL_TERMS = ("loss_dm", "loss_reg", "loss_fake")


def curves_png(teacher: list[dict[str, Any]], distill: list[dict[str, Any]]) -> bytes:
    """Teacher loss (total and per sigma bucket) and each distillation loss term against images seen."""
    plt = _pyplot()
    terms = [k for k in DISTILL_TERMS if any(k in r for r in distill)]
    fig, axes = plt.subplots(1, 1 + len(terms), figsize=(3.6 * (1 + len(terms)), 3.2), dpi=110, squeeze=False)
    ax = axes[0][0]
    ax.plot([r["nimg"] for r in teacher], [r["loss"] for r in teacher], "k-", lw=2, label="all")
    buckets = sorted({b for r in teacher for b in r.get("loss_by_sigma", {})}, key=lambda b: float(b.split("-")[0]))
    for bucket in buckets:
        points = [(r["nimg"], r["loss_by_sigma"][bucket]) for r in teacher if bucket in r.get("loss_by_sigma", {})]
        ax.plot(*zip(*points), lw=1, label=f"sigma {bucket}")
    ax.set(xlabel="images seen", title="teacher loss (EDM2, with u(sigma))")
    ax.legend(fontsize=6, ncol=2)
    for ax, key in zip(axes[0][1:], terms):
        ax.plot(*zip(*[(r["nimg"], r[key]) for r in distill if key in r]), "-", color="tab:red")
        ax.set(xlabel="generator images", title=f"distill {key}")
    return _figure_png(fig)
