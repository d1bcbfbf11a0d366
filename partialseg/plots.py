"""Figures a person would rather look at than read: training curves, prediction overlays, and the
hybrid method's indicator histogram (which weak annotations the model distrusts).

Matplotlib (Agg backend) is imported inside the functions.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot_indicator_histogram", "plot_overlays", "plot_training_curves"]


def plot_training_curves(runs: Mapping[str, str | os.PathLike], path: str | os.PathLike, title: str = "training") -> Path:
    """Plot loss per iteration and validation metrics per epoch of one or more runs.

    Args:
        runs: run name -> ``metrics.json`` written by :class:`partialseg.engines.MetricsRecorder`.
            Runs are drawn one after the other on a common iteration axis (stage 1, then stage 2).
        path: output PNG.
        title: figure title.

    Returns:
        ``Path(path)``.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import numpy as np
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.4), dpi=90)
    ax_loss, ax_val = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    offset = 0
    for name, file in runs.items():
        data = json.loads(Path(file).read_text())
        it = np.asarray(data["iteration"], dtype=float) + offset
        loss = np.asarray(data["loss"], dtype=float)
        if len(loss):
            ax_loss.plot(it, loss, lw=0.5, alpha=0.35)
            k = max(1, len(loss) // 50)
            smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
            ax_loss.plot(it[k - 1 :], smooth, lw=1.5, label=name, color=ax_loss.lines[-1].get_color())
        per_epoch = data.get("epoch_length") or 1
        for metric, values in data.get("metrics", {}).items():
            x = offset + np.asarray(data["epoch"][: len(values)], dtype=float) * per_epoch
            ax_val.plot(x, values, marker="o", ms=3, label=f"{name}: {metric}")
        offset = float(it[-1]) if len(it) else offset
    ax_loss.set_xlabel("iteration")
    ax_loss.set_ylabel("training loss")
    ax_loss.set_yscale("log")
    ax_loss.legend(fontsize=7)
    ax_val.set_xlabel("iteration")
    ax_val.set_ylabel("validation")
    ax_val.set_ylim(0, 1)
    ax_val.grid(alpha=0.3)
    if ax_val.lines:
        ax_val.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(str(path), format="png", metadata={"Software": None})
    return Path(path)


def plot_overlays(
    cases: Sequence[tuple[str, str | os.PathLike, str | os.PathLike, str | os.PathLike]],
    path: str | os.PathLike,
    num_classes: int,
    title: str = "reference vs prediction",
    window: tuple[float, float] | None = (-160.0, 240.0),
    slices: int = 1,
) -> Path:
    """Axial slices of image, reference and prediction side by side, for a few cases.

    Args:
        cases: ``(name, image, reference, prediction)`` files (NIfTI, same grid).
        path: output PNG.
        num_classes: number of classes (stable colours per class).
        title: figure title.
        window: intensity window of the image (CT soft tissue by default; None for percentiles).
        slices: slices per case (spread around the slice holding the most reference foreground).

    Returns:
        ``Path(path)``.
    """
    import nibabel as nib
    import numpy as np

    from partialseg.data.synthetic._common import write_preview

    def volume(path: Any, dtype: Any) -> Any:
        """A 2D slice (``(H, W)`` or ``(H, W, 1)``) or a 3D volume, as ``(H, W, D)``."""
        arr = np.asarray(nib.load(str(path)).dataobj).astype(dtype)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if arr.ndim != 3:
            raise ValueError(f"{path}: shape {arr.shape}; overlays take 2D slices or 3D volumes (one channel)")
        return arr

    panels = []
    for name, image, ref, pred in cases:
        img, lab, prd = volume(image, np.float32), volume(ref, np.int32), volume(pred, np.int32)
        if not (img.shape == lab.shape == prd.shape):
            raise ValueError(f"case {name!r}: image {img.shape}, reference {lab.shape} and prediction {prd.shape} differ")
        counts = (lab > 0).sum(axis=(0, 1))
        centre = int(np.argmax(counts)) if counts.max() > 0 else lab.shape[2] // 2
        offsets = np.linspace(-4, 4, slices).round().astype(int) if slices > 1 else [0]  # one slice: the centre
        picks = sorted({int(np.clip(centre + d, 0, lab.shape[2] - 1)) for d in offsets})
        for k in picks:
            view = img[:, :, k].T
            if window is not None:
                view = np.clip((view - window[0]) / (window[1] - window[0]), 0.0, 1.0)
            panels += [(view, None, f"{name} z={k}"), (view, lab[:, :, k].T, "reference"), (view, prd[:, :, k].T, "prediction")]
    write_preview(Path(path), panels, num_classes, title, ncols=3)
    return Path(path)


def plot_indicator_histogram(csv_path: str | os.PathLike, path: str | os.PathLike, title: str = "weak-mask indicators", bins: int = 20) -> Path:
    """Histogram of the weak instances' indicators ``gamma``, stacked by weak-mask type.

    Reads the CSV :meth:`partialseg.losses.hybrid.InstanceIndicators.to_csv` writes (columns
    ``case, class, weak_type, gamma, steps``; rows of ``weak_type`` ``"strong"`` are left out: they
    are 1 by definition) and draws, per weak type, how many instances ended at each gamma in
    ``[0, 1]``, with the count below 0.1 and above 0.9 in the legend: annotations near 0 are the
    ones the model distrusts (the hybrid bundle writes both files at the end of training).

    Args:
        csv_path: the indicators' CSV.
        path: output PNG.
        title: figure title.
        bins: histogram bins over ``[0, 1]``.

    Returns:
        ``Path(path)``.

    Raises:
        ValueError: the CSV lacks the ``gamma`` / ``weak_type`` columns, or holds no weak instance
            (the message names the file).

    Example:
        >>> import pathlib, tempfile
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (d / "gamma.csv").write_text("case,class,weak_type,gamma,steps\\na,all,ellipse,0.9,3\\nb,all,missing,0.05,3\\n")
        >>> plot_indicator_histogram(d / "gamma.csv", d / "gamma.png").is_file()
        True
    """
    import csv

    import matplotlib

    matplotlib.use("Agg", force=False)
    import numpy as np
    from matplotlib.figure import Figure

    with open(csv_path, newline="") as fh:
        reader = csv.DictReader(fh)
        if not {"gamma", "weak_type"} <= set(reader.fieldnames or []):
            raise ValueError(f"{csv_path}: not an indicator CSV (needs the columns gamma and weak_type, has {reader.fieldnames})")
        rows = [r for r in reader if r["weak_type"] != "strong"]
    if not rows:
        raise ValueError(f"{csv_path}: holds no weak instance to plot")
    groups: dict[str, list[float]] = {}
    for r in rows:
        groups.setdefault(r["weak_type"] or "unspecified", []).append(float(r["gamma"]))
    names = sorted(groups)
    fig = Figure(figsize=(6.4, 3.6), dpi=90)
    ax = fig.add_subplot(1, 1, 1)
    edges = np.linspace(0.0, 1.0, int(bins) + 1)
    labels = [f"{n} ({len(groups[n])}: {sum(g < 0.1 for g in groups[n])} < 0.1, {sum(g > 0.9 for g in groups[n])} > 0.9)" for n in names]
    ax.hist([np.asarray(groups[n]) for n in names], bins=edges, stacked=True, label=labels)
    ax.set_xlim(0, 1)
    ax.set_xlabel("gamma (0: annotation distrusted, 1: trusted)")
    ax.set_ylabel("weak instances")
    ax.legend(fontsize=7, title="weak-mask type", title_fontsize=7)
    ax.grid(alpha=0.3)
    fig.suptitle(f"{title}: {len(rows)} weak instances", fontsize=10)
    fig.tight_layout()
    fig.savefig(str(path), format="png", metadata={"Software": None})
    return Path(path)
