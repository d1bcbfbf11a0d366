"""Aggregating per case rows into a summary, the printed table, and the output files.

``summarize`` (per class statistics, overall means, per phase blocks), ``format_table`` (the
printed table) and ``write_outputs`` (``metrics.csv``, ``boxplot.png``, ``summary.json``, all
or nothing). numpy and matplotlib are imported inside the functions.
"""

from __future__ import annotations

import csv
import json
import os
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from partialseg.evaluation.metrics import METRICS, STATUSES, UNITS

__all__ = ["NO_PHASE", "phase_of", "summarize", "format_table", "check_outputs", "write_outputs"]

#: ``summary["per_phase"]`` key of the cases without a ``phase`` when other cases have one
NO_PHASE = "(none)"


def phase_of(row: Mapping) -> str | None:
    """The phase of a row or dataset entry: its ``phase`` value as a string, ``None`` without one.

    A missing key, ``None`` and ``""`` all mean "no phase".

    Example:
        >>> phase_of({"phase": "ED"}), phase_of({"phase": ""}), phase_of({})
        ('ED', None, None)
    """
    phase = row.get("phase")
    return None if phase is None or phase == "" else str(phase)


def summarize(rows: Sequence[Mapping], class_names: Sequence[str]) -> dict:
    """Aggregates per case and class rows into per class statistics and an overall mean.

    Args:
        rows: dicts as returned by :func:`evaluate_case`, each with a ``case`` key added, and
            optionally a ``phase`` key (see :func:`phase_of`).
        class_names: the evaluated classes, in the order of the summary.

    Returns:
        ``{"per_class": {name: {"n", "status": {status: count}, metric: {"mean", "std",
        "median"}}}, "overall": {metric: mean over classes of the class means},
        "status_counts": {status: count}}``. ``std`` is the population standard deviation
        (``ddof=0``). A class with no rows has ``n = 0`` and no statistics, and is left out of
        ``overall``. When at least one row has a phase, also ``"per_phase": {phase: the same
        three keys over that phase's rows}``, phases in sorted order, the rows without a phase
        last under ``NO_PHASE`` (``"(none)"``); without any phase there is no ``per_phase`` key.

    Example:
        >>> rows = [{"class": "a", "dice": 1.0, "hd95": 0.0, "assd": 0.0, "status": "ok"},
        ...         {"class": "a", "dice": 0.5, "hd95": 2.0, "assd": 1.0, "status": "ok"}]
        >>> s = summarize(rows, ["a"])
        >>> s["per_class"]["a"]["dice"], s["overall"]["hd95"], "per_phase" in s
        ({'mean': 0.75, 'std': 0.25, 'median': 0.75}, 1.0, False)
        >>> rows[0]["phase"], rows[1]["phase"] = "ES", "ED"
        >>> s = summarize(rows, ["a"])
        >>> {p: e["per_class"]["a"]["dice"]["mean"] for p, e in s["per_phase"].items()}
        {'ED': 0.5, 'ES': 1.0}
    """
    summary = _summarize(rows, class_names)
    phases = {phase_of(r) for r in rows}
    if phases - {None}:
        groups = sorted(phases - {None}) + ([None] if None in phases else [])
        summary["per_phase"] = {
            NO_PHASE if p is None else p: _summarize([r for r in rows if phase_of(r) == p], class_names)
            for p in groups
        }
    return summary


def _summarize(rows: Sequence[Mapping], class_names: Sequence[str]) -> dict:
    import numpy as np

    per_class: dict[str, dict] = {}
    for name in class_names:
        sel = [r for r in rows if r["class"] == name]
        entry: dict[str, Any] = {"n": len(sel), "status": {s: sum(r["status"] == s for r in sel) for s in STATUSES}}
        if sel:
            for m in METRICS:
                v = np.asarray([r[m] for r in sel], dtype=np.float64)
                entry[m] = {"mean": float(v.mean()), "std": float(v.std()), "median": float(np.median(v))}
        per_class[name] = entry
    measured = [e for e in per_class.values() if e["n"]]
    overall = {m: float(np.mean([e[m]["mean"] for e in measured])) for m in METRICS} if measured else {}
    status_counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    return {"per_class": per_class, "overall": overall, "status_counts": status_counts}


def _write_csv(path: Path, rows: Sequence[Mapping]) -> None:
    # "phase" last, so that readers by column position keep working; empty without a phase
    fields = ["case", "class", "class_index", *METRICS, "pred_voxels", "ref_voxels", "status", "phase"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            r = {**r, "phase": phase_of(r) or ""}
            # MONAI computes in float32: 7 significant digits carry all of it
            writer.writerow({k: (format(r[k], ".7g") if isinstance(r[k], float) else r[k]) for k in fields})


def _write_boxplot(path: Path, rows: Sequence[Mapping], class_names: Sequence[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # one box per class; with phases, one per phase and class ("ED LV", ..., "ES LV", ...)
    present = {phase_of(r) for r in rows}
    by_phase = bool(present - {None})
    phases = sorted(present - {None}) + ([None] if None in present else []) if by_phase else [None]
    groups = []  # (tick label, rows)
    for p in phases:
        for n in class_names:
            sel = [r for r in rows if r["class"] == n and phase_of(r) == p]
            if sel:
                groups.append((f"{NO_PHASE if p is None else p} {n}" if by_phase else n, sel))
    names = [g[0] for g in groups]
    width = max(4.5, 0.45 * len(names) + 1.5) if by_phase else 4.5
    fig, axes = plt.subplots(1, len(METRICS), figsize=(width * len(METRICS), 4.0), squeeze=False)
    for ax, m in zip(axes[0], METRICS):
        data = [[r[m] for r in sel] for _, sel in groups]
        if data:
            ax.boxplot(data)
            ax.set_xticks(range(1, len(names) + 1), names, rotation=30, ha="right")
        ax.set_title(m.upper() if m != "dice" else "Dice")
        ax.set_ylabel(f"{m} ({UNITS[m]})" if UNITS[m] else m)
        ax.grid(axis="y", alpha=0.3)
    try:
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)


def check_outputs(out_dir: Path, paths: Any) -> None:
    """Fails, naming the path, when the outputs cannot be written in ``out_dir``.

    ``out_dir`` must be a folder or not exist yet (below an existing folder, not a file), and
    no output name in it may be taken by anything but a file, which is replaced.

    Raises:
        ValueError: the message names the path and says what to do.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"the output folder {out_dir} is a file; give --out a folder (new or existing).")
    existing = out_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"cannot create the output folder {out_dir}: {existing} is a file; choose another --out.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write in {existing} (no write permission); choose another --out.")
    for path in paths:
        if (path.exists() or path.is_symlink()) and not path.is_file():
            raise ValueError(f"{path} exists and is not a file; remove it or choose another --out.")


def write_outputs(outputs: Mapping[str, Path], rows: Sequence[Mapping], class_names: Sequence[str],
                   summary: Mapping) -> None:
    """Writes ``metrics.csv``, ``boxplot.png`` and ``summary.json``, all or (nearly) nothing.

    Each file is written under a temporary name in the output folder (``.NAME-<pid>-<random>.partial.EXT``);
    only when all three are complete are they renamed over the final names (``os.replace``,
    atomic per file). A failure before that leaves the folder as it was.

    Raises:
        OSError: naming the output path that could not be written.
    """
    out_dir = outputs["csv"].parent
    out_dir.mkdir(parents=True, exist_ok=True)
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    temps = {k: p.with_name(f".{p.stem}-{token}.partial{p.suffix}") for k, p in outputs.items()}
    writers = {
        "csv": lambda path: _write_csv(path, rows),
        "boxplot": lambda path: _write_boxplot(path, rows, class_names),
        "summary": lambda path: _write_json(path, summary),
    }
    try:
        for key, write in writers.items():
            try:
                write(temps[key])
            except OSError as e:
                raise _os_error_at(e, outputs[key]) from e
        for key in writers:
            try:
                os.replace(temps[key], outputs[key])
            except OSError as e:
                raise _os_error_at(e, outputs[key]) from e
    finally:
        for path in temps.values():
            try:
                path.unlink()
            except OSError:
                pass


def _write_json(path: Path, obj: Mapping) -> None:
    with open(path, "x") as f:  # "x": a fresh file, created with the umask's mode
        json.dump(obj, f, indent=2, allow_nan=False)


def _os_error_at(e: OSError, path: Path) -> OSError:
    """The same error, naming the final output ``path`` instead of a temporary file."""
    if e.errno is None:
        return OSError(f"cannot write {path}: {e}")
    return OSError(e.errno, e.strerror or str(e), str(path))


def format_table(summary: Mapping) -> str:
    """Text table of a summary: class, n, Dice mean±std, HD95 and ASSD mean±std (mm).

    With ``summary["per_phase"]`` (see :func:`summarize`), the overall table is followed by one
    block per phase, its rows named ``"<phase> <class>"`` (``ED LV``) and ending with
    ``"<phase> mean over classes"``. Without it the output is the overall table alone.

    Example:
        >>> rows = [{"class": "a", "dice": 1.0, "hd95": 0.0, "assd": 0.0, "status": "ok", "phase": "ES"},
        ...         {"class": "a", "dice": 0.5, "hd95": 2.0, "assd": 1.0, "status": "ok", "phase": "ED"}]
        >>> print(format_table(summarize(rows, ["a"])))
        class                   n             Dice          HD95 (mm)          ASSD (mm)
        --------------------------------------------------------------------------------
        a                       2  0.7500 ± 0.2500        1.00 ± 1.00        0.50 ± 0.50
        --------------------------------------------------------------------------------
        mean over classes                   0.7500               1.00               0.50
        ================================================================================
        ED a                    1  0.5000 ± 0.0000        2.00 ± 0.00        1.00 ± 0.00
        ED mean over classes                0.5000               2.00               1.00
        --------------------------------------------------------------------------------
        ES a                    1  1.0000 ± 0.0000        0.00 ± 0.00        0.00 ± 0.00
        ES mean over classes                1.0000               0.00               0.00
    """
    per_phase = summary.get("per_phase") or {}
    width = 20  # the name column; wider only when a per phase name needs it
    if per_phase:
        names = [*summary["per_class"], "mean over classes"]
        width = max([width] + [len(f"{p} {n}") for p in per_phase for n in names])
    header = f"{'class':<{width}} {'n':>4}  {'Dice':>15}  {'HD95 (mm)':>17}  {'ASSD (mm)':>17}"
    rule = "-" * len(header)
    lines = [header, rule]

    def cell(e, m, digits):
        return f"{e[m]['mean']:.{digits}f} ± {e[m]['std']:.{digits}f}" if e["n"] else "-"

    def block(part, prefix=""):
        out = []
        for name, e in part["per_class"].items():
            out.append(f"{prefix + name:<{width}} {e['n']:>4}  {cell(e, 'dice', 4):>15}  "
                       f"{cell(e, 'hd95', 2):>17}  {cell(e, 'assd', 2):>17}")
        return out

    def mean_row(part, prefix=""):
        o = part["overall"]
        return (f"{prefix + 'mean over classes':<{width}} {'':>4}  {o['dice']:>15.4f}  {o['hd95']:>17.2f}  "
                f"{o['assd']:>17.2f}")

    lines += block(summary)
    if summary["overall"]:
        lines += [rule, mean_row(summary)]
    for k, (phase, part) in enumerate(per_phase.items()):
        lines.append("=" * len(header) if k == 0 else rule)
        lines += block(part, f"{phase} ")
        if part["overall"]:
            lines.append(mean_row(part, f"{phase} "))
    return "\n".join(lines)
