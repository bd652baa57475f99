"""`nn2c plot`: the loss curves of training logs (`nn2c train --log`) as a PNG.

matplotlib draws them: it writes PNG without a display (the Agg canvas, used here directly,
so no pyplot state or GUI backend is involved) and is the plotting library most Python
users already have. It belongs to nn2c's `train` extra; nn2run never imports it.
"""

from __future__ import annotations

import io
import os

from nn2c.train.progress import LogError, read_log

INSTALL = "pip install matplotlib (or pip install 'nn2[train]')"


class PlotError(Exception):
    """A plot that cannot be drawn or written; one line says why."""


def _canvas():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotError(f"nn2c plot needs matplotlib, which is not installed: {INSTALL}") from None
    return Figure, FigureCanvasAgg


def _label(path: str, paths: list[str]) -> str:
    """A run's name in the legend: the file name, or the whole path when two names clash."""
    names = [os.path.basename(p) for p in paths]
    name = os.path.basename(path)
    return name if names.count(name) == 1 else path


def _series(records: list[dict], key: str, x_axis: str) -> tuple[list, list, list]:
    """x, the value of `key` and the step, for each record that has both."""
    points = [(r["step"] if x_axis == "step" else r.get("elapsed_s"), r.get(key), r["step"]) for r in records]
    points = [p for p in points if p[0] is not None and p[1] is not None]
    return [p[0] for p in points], [p[1] for p in points], [p[2] for p in points]


def draw(runs: dict[str, list[dict]], x_axis: str = "step") -> bytes:
    """PNG bytes: each run's validation loss (solid, its best point marked) and training
    loss (dashed, same colour)."""
    Figure, Canvas = _canvas()
    fig = Figure(figsize=(8, 5), dpi=100)
    Canvas(fig)
    ax = fig.add_subplot()
    paths = list(runs)
    for i, (path, records) in enumerate(runs.items()):
        colour = f"C{i % 10}"
        name = _label(path, paths)
        xs, ys, _ = _series(records, "train_loss", x_axis)
        ax.plot(xs, ys, linestyle="--", linewidth=1, color=colour, alpha=0.8, label=f"{name} train")
        xs, ys, steps = _series(records, "val_loss", x_axis)
        if ys:
            best = min(range(len(ys)), key=ys.__getitem__)
            ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.6, color=colour,
                    label=f"{name} val (best {ys[best]:.4f}, step {steps[best]})")
            ax.plot([xs[best]], [ys[best]], marker="*", markersize=12, color=colour, linestyle="none")
    ax.set_xlabel("step" if x_axis == "step" else "training time (s)")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title("training and validation loss")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def plot_logs(paths: list[str], output: str, x_axis: str = "step") -> None:
    """Read every log (each checked, one line for the first bad one), draw, write atomically."""
    _canvas()                      # say what to install before reading anything
    try:
        runs = {path: read_log(path) for path in paths}
    except LogError as e:
        raise PlotError(str(e)) from None
    if x_axis == "time" and not any(r.get("elapsed_s") is not None for rs in runs.values() for r in rs):
        raise PlotError("--x time: the logs record no elapsed_s")
    png = draw(runs, x_axis)
    from nn2run.atomic import write_atomic
    try:
        write_atomic(output, [png])
    except OSError as e:
        raise PlotError(f"cannot write {output}: {e.strerror or e}") from None
