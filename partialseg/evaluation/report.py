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

__all__ = [
    "NO_PHASE", "COUNT_KEYS", "POOLED_METRICS", "CSV_FIELDS", "phase_of", "subject_of", "pooled_overlap",
    "summarize", "format_table", "check_outputs", "write_outputs", "GROUPS", "format_modality_table",
]

#: the two groups of a (case, organ) pair by modality (:mod:`partialseg.evaluation.modality`), in report order
GROUPS = ("intramodal", "cross_modal")
#: ``summary["per_phase"]`` key of the cases without a ``phase`` when other cases have one
NO_PHASE = "(none)"
#: the voxel counts of a row that the pooled and per subject aggregates sum
COUNT_KEYS = ("pred_voxels", "ref_voxels", "overlap_voxels")
#: the metrics of the pooled and per subject aggregates (region metrics: sums of voxel counts)
POOLED_METRICS = ("dice", "jaccard")
#: each metric's name in the table and the box plot (the DTML paper's "ASD", "95HD" in voxels)
TITLES = {"dice": "Dice", "jaccard": "Jaccard", "hd95": "HD95 (mm)", "assd": "ASSD (mm)",
          "hd95_vox": "95HD (voxel)", "asd_vox": "ASD (voxel)"}
#: ``metrics.csv`` columns: those of the first release in their order (readers by position keep
#: working), then each later addition appended
CSV_FIELDS = (
    "case", "class", "class_index", "dice", "hd95", "assd", "pred_voxels", "ref_voxels", "status", "phase",
    "jaccard", "hd95_vox", "asd_vox", "overlap_voxels", "subject",
)
#: columns appended to ``metrics.csv`` when the evaluation groups by modality (intramodal /
#: cross-modal, :mod:`partialseg.evaluation.modality`); absent otherwise
MODALITY_FIELDS = ("modality", "group")


def phase_of(row: Mapping) -> str | None:
    """The phase of a row or dataset entry: its ``phase`` value as a string, ``None`` without one.

    A missing key, ``None`` and ``""`` all mean "no phase".

    Example:
        >>> phase_of({"phase": "ED"}), phase_of({"phase": ""}), phase_of({})
        ('ED', None, None)
    """
    phase = row.get("phase")
    return None if phase is None or phase == "" else str(phase)


def subject_of(row: Mapping) -> str | None:
    """The subject of a row or dataset entry: its ``subject`` value as a string, ``None`` without one.

    Example:
        >>> subject_of({"subject": "patient001"}), subject_of({"subject": ""}), subject_of({})
        ('patient001', None, None)
    """
    subject = row.get("subject")
    return None if subject is None or subject == "" else str(subject)


def summarize(rows: Sequence[Mapping], class_names: Sequence[str]) -> dict:
    """Aggregates per case and class rows: per case statistics, pooled and per subject figures.

    Three aggregates (``docs/evaluation.md``, "Aggregates"):

    - **per case** (``per_class``, ``overall``): each row (a case, or a 2D slice) scores on its
      own; the statistics are over rows. Every metric of :data:`METRICS` the rows carry.
    - **pooled** (``pooled``): per class, the voxel counts of all rows summed, then Dice and
      Jaccard of the sums (:func:`pooled_overlap`): one figure per class, as if every row were
      one image.
    - **per subject** (``per_subject``, only when a row has a ``subject``): the rows of one
      subject pooled (the slices of one volume -> its 3D Dice and Jaccard), then statistics over
      subjects. A row without a subject is its own subject (named by its ``case``).

    Args:
        rows: dicts as returned by :func:`evaluate_case`, each with a ``case`` key added, and
            optionally ``phase`` and ``subject`` keys (see :func:`phase_of`, :func:`subject_of`).
        class_names: the evaluated classes, in the order of the summary.

    Returns:
        ``{"per_class": {name: {"n", "status": {status: count}, metric: {"mean", "std",
        "median"}}}, "overall": {metric: mean over classes of the class means},
        "status_counts": {status: count}}``. ``std`` is the population standard deviation
        (``ddof=0``). A class with no rows has ``n = 0`` and no statistics, and is left out of
        ``overall``. When the rows carry the voxel counts (:data:`COUNT_KEYS`), also
        ``"pooled": {"per_class": {name: {"n", "pred_voxels", "ref_voxels", "overlap_voxels",
        "dice", "jaccard"}}, "overall": {"dice", "jaccard"}}`` and, with subjects,
        ``"per_subject": {"per_class": {name: {"n" (subjects), "dice": {"mean", "std",
        "median"}, "jaccard": {...}}}, "overall": {...}}``. When at least one row has a phase,
        also ``"per_phase": {phase: all of the above over that phase's rows}``, phases in sorted
        order, the rows without a phase last under ``NO_PHASE`` (``"(none)"``); without any
        phase there is no ``per_phase`` key.

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

        Two slices of one subject: an empty pair scores 1 per case, but adds nothing pooled:

        >>> rows = [{"class": "a", "dice": 0.5, "status": "ok", "subject": "s1",
        ...          "pred_voxels": 2, "ref_voxels": 2, "overlap_voxels": 1},
        ...         {"class": "a", "dice": 1.0, "status": "both_empty", "subject": "s1",
        ...          "pred_voxels": 0, "ref_voxels": 0, "overlap_voxels": 0}]
        >>> s = summarize(rows, ["a"])
        >>> s["per_class"]["a"]["dice"]["mean"], s["pooled"]["per_class"]["a"]["dice"]
        (0.75, 0.5)
        >>> s["per_subject"]["per_class"]["a"]["n"], s["per_subject"]["per_class"]["a"]["dice"]["mean"]
        (1, 0.5)
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

    metrics = [m for m in METRICS if all(m in r for r in rows)]  # rows of older CSVs lack the newer ones
    per_class: dict[str, dict] = {}
    for name in class_names:
        sel = [r for r in rows if r["class"] == name]
        entry: dict[str, Any] = {"n": len(sel), "status": {s: sum(r["status"] == s for r in sel) for s in STATUSES}}
        if sel:
            for m in metrics:
                entry[m] = _stats([r[m] for r in sel])
        per_class[name] = entry
    measured = [e for e in per_class.values() if e["n"]]
    overall = {m: float(np.mean([e[m]["mean"] for e in measured])) for m in metrics} if measured else {}
    status_counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    summary: dict[str, Any] = {"per_class": per_class, "overall": overall, "status_counts": status_counts}
    if rows and all(k in r for r in rows for k in COUNT_KEYS):
        summary["pooled"] = _pooled(rows, class_names)
        if any(subject_of(r) is not None for r in rows):
            summary["per_subject"] = _per_subject(rows, class_names)
    return summary


def _stats(values: Sequence[float]) -> dict[str, float]:
    import numpy as np

    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std()), "median": float(np.median(v))}


def pooled_overlap(pred_voxels: int, ref_voxels: int, overlap_voxels: int) -> dict[str, float]:
    """Dice and Jaccard from voxel counts summed over several rows (slices, cases).

    ``Dice = 2 |P n R| / (|P| + |R|)``, ``Jaccard = |P n R| / (|P| + |R| - |P n R|)``; both 1.0
    when the pooled prediction and reference are empty (the ``both_empty`` convention).

    Example:
        >>> pooled_overlap(16, 16, 12)
        {'dice': 0.75, 'jaccard': 0.6}
        >>> pooled_overlap(0, 0, 0)
        {'dice': 1.0, 'jaccard': 1.0}
    """
    total = pred_voxels + ref_voxels
    if total == 0:
        return {"dice": 1.0, "jaccard": 1.0}
    return {"dice": 2.0 * overlap_voxels / total, "jaccard": overlap_voxels / (total - overlap_voxels)}


def _sums(rows: Sequence[Mapping]) -> dict[str, int]:
    return {k: int(sum(r[k] for r in rows)) for k in COUNT_KEYS}


def _pooled(rows: Sequence[Mapping], class_names: Sequence[str]) -> dict:
    per_class: dict[str, dict] = {}
    for name in class_names:
        sel = [r for r in rows if r["class"] == name]
        sums = _sums(sel)
        per_class[name] = {"n": len(sel), **sums, **(pooled_overlap(*sums.values()) if sel else {})}
    measured = [e for e in per_class.values() if e["n"]]
    overall = {m: sum(e[m] for e in measured) / len(measured) for m in POOLED_METRICS} if measured else {}
    return {"per_class": per_class, "overall": overall}


def _per_subject(rows: Sequence[Mapping], class_names: Sequence[str]) -> dict:
    import numpy as np

    per_class: dict[str, dict] = {}
    for name in class_names:
        groups: dict[str, list[Mapping]] = {}
        for r in rows:
            if r["class"] == name:
                groups.setdefault(subject_of(r) or str(r.get("case")), []).append(r)
        scores = [pooled_overlap(*_sums(g).values()) for g in groups.values()]
        entry: dict[str, Any] = {"n": len(groups)}
        if scores:
            for m in POOLED_METRICS:
                entry[m] = _stats([sc[m] for sc in scores])
        per_class[name] = entry
    measured = [e for e in per_class.values() if e["n"]]
    overall = {m: float(np.mean([e[m]["mean"] for e in measured])) for m in POOLED_METRICS} if measured else {}
    return {"per_class": per_class, "overall": overall}


def _write_csv(path: Path, rows: Sequence[Mapping]) -> None:
    fields = CSV_FIELDS + (MODALITY_FIELDS if any("group" in r for r in rows) else ())
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            r = {**r, "phase": phase_of(r) or "", "subject": subject_of(r) or ""}
            # MONAI computes in float32: 7 significant digits carry all of it
            writer.writerow({k: (format(r[k], ".7g") if isinstance(r.get(k), float) else r.get(k, ""))
                             for k in fields})


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
    metrics = [m for m in METRICS if all(m in r for r in rows)]
    ncols = 3  # Dice, Jaccard, HD95 (mm) / ASSD (mm), HD95 (voxel), ASD (voxel)
    nrows = max(1, -(-len(metrics) // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, 4.0 * nrows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        if k >= len(metrics):
            ax.set_visible(False)
            continue
        m = metrics[k]
        data = [[r[m] for r in sel] for _, sel in groups]
        if data:
            ax.boxplot(data)
            ax.set_xticks(range(1, len(names) + 1), names, rotation=30, ha="right")
        ax.set_title(TITLES[m])
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
    """Text table of a summary: per class n and each metric's mean ± std, the aggregates, the empty counts.

    The first table holds, per class, the number of rows (cases or slices) and the mean ± std
    over them of Dice, Jaccard, HD95 and ASSD (mm), 95HD and ASD (voxels), then the mean over
    classes; a metric the rows lack shows ``-``. With ``summary["per_phase"]`` (see
    :func:`summarize`), one block per phase follows, its rows named ``"<phase> <class>"``
    (``ED LV``) and ending with ``"<phase> mean over classes"``. With ``summary["pooled"]``, a
    second table gives the Dice of each aggregate side by side: per case (mean over rows), per
    subject (mean over subjects, when rows have subjects) and pooled, with their ``n``, overall
    and per phase. A summary of :func:`~partialseg.evaluation.evaluate_folder` (which has
    ``num_cases``) ends with the line of empty statuses and missing predictions.

    Example:
        >>> keys = ("dice", "jaccard", "hd95", "assd", "hd95_vox", "asd_vox")
        >>> rows = [{"class": "a", "status": "ok", "phase": "ES", **dict(zip(keys, (1.0, 1.0, 0.0, 0.0, 0.0, 0.0)))},
        ...         {"class": "a", "status": "ok", "phase": "ED", **dict(zip(keys, (0.5, 1 / 3, 2.0, 1.0, 1.0, 0.5)))}]
        >>> print(format_table(summarize(rows, ["a"])))
        class                   n             Dice          Jaccard       HD95 (mm)       ASSD (mm)    95HD (voxel)     ASD (voxel)
        ---------------------------------------------------------------------------------------------------------------------------
        a                       2  0.7500 ± 0.2500  0.6667 ± 0.3333     1.00 ± 1.00     0.50 ± 0.50     0.50 ± 0.50     0.25 ± 0.25
        ---------------------------------------------------------------------------------------------------------------------------
        mean over classes                   0.7500           0.6667            1.00            0.50            0.50            0.25
        ===========================================================================================================================
        ED a                    1  0.5000 ± 0.0000  0.3333 ± 0.0000     2.00 ± 0.00     1.00 ± 0.00     1.00 ± 0.00     0.50 ± 0.00
        ED mean over classes                0.5000           0.3333            2.00            1.00            1.00            0.50
        ---------------------------------------------------------------------------------------------------------------------------
        ES a                    1  1.0000 ± 0.0000  1.0000 ± 0.0000     0.00 ± 0.00     0.00 ± 0.00     0.00 ± 0.00     0.00 ± 0.00
        ES mean over classes                1.0000           1.0000            0.00            0.00            0.00            0.00
    """
    per_phase = summary.get("per_phase") or {}
    width = 20  # the name column; wider only when a per phase name needs it
    if per_phase:
        names = [*summary["per_class"], "mean over classes"]
        width = max([width] + [len(f"{p} {n}") for p in per_phase for n in names])
    digits = {m: 4 if m in POOLED_METRICS else 2 for m in METRICS}
    col = {m: 15 if m in POOLED_METRICS else 14 for m in METRICS}  # "0.7500 ± 0.2500", "123.45 ± 67.89"
    header = f"{'class':<{width}} {'n':>4}" + "".join(f"  {TITLES[m]:>{col[m]}}" for m in METRICS)
    rule = "-" * len(header)
    lines = [header, rule]

    def cell(e, m):
        if not e["n"] or m not in e:
            return "-"
        return f"{e[m]['mean']:.{digits[m]}f} ± {e[m]['std']:.{digits[m]}f}"

    def block(part, prefix=""):
        return [f"{prefix + name:<{width}} {e['n']:>4}" + "".join(f"  {cell(e, m):>{col[m]}}" for m in METRICS)
                for name, e in part["per_class"].items()]

    def mean_row(part, prefix=""):
        o = part["overall"]
        return f"{prefix + 'mean over classes':<{width}} {'':>4}" + "".join(
            f"  {o[m]:>{col[m]}.{digits[m]}f}" if m in o else f"  {'-':>{col[m]}}" for m in METRICS
        )

    lines += block(summary)
    if summary["overall"]:
        lines += [rule, mean_row(summary)]
    for k, (phase, part) in enumerate(per_phase.items()):
        lines.append("=" * len(header) if k == 0 else rule)
        lines += block(part, f"{phase} ")
        if part["overall"]:
            lines.append(mean_row(part, f"{phase} "))
    if "pooled" in summary:
        lines += ["", *_aggregate_table(summary, width)]
    if "modality" in summary:
        lines += ["", format_modality_table(summary["modality"])]
    if "num_cases" in summary:
        counts = summary["status_counts"]
        lines += ["", f"{summary['num_cases']} cases; empty: {counts['both_empty']} both, {counts['pred_empty']} "
                  f"prediction only, {counts['ref_empty']} reference only; missing predictions: "
                  f"{len(summary.get('missing_predictions', []))}"]
    return "\n".join(lines)


def _aggregate_table(summary: Mapping, width: int) -> list[str]:
    """Dice per class by aggregate: per case, per subject (with subjects), pooled; then per phase."""
    with_subjects = "per_subject" in summary
    header = f"{'Dice by aggregate':<{width}} {'n':>4}  {'per case':>9}"
    if with_subjects:
        header += f"  {'subjects':>8}  {'per subject':>11}"
    header += f"  {'pooled':>9}"
    rule = "-" * len(header)

    def part_lines(part, prefix=""):
        out = []
        subj = part.get("per_subject", {}).get("per_class", {})
        for name, e in part["per_class"].items():
            if not e["n"]:
                continue
            line = f"{prefix + name:<{width}} {e['n']:>4}  {e['dice']['mean']:>9.4f}"
            if with_subjects:
                s = subj.get(name, {"n": 0})
                line += f"  {s['n']:>8}  {s['dice']['mean']:>11.4f}" if s["n"] else f"  {0:>8}  {'-':>11}"
            out.append(line + f"  {part['pooled']['per_class'][name]['dice']:>9.4f}")
        if part["overall"]:
            line = f"{prefix + 'mean over classes':<{width}} {'':>4}  {part['overall']['dice']:>9.4f}"
            if with_subjects:
                o = part.get("per_subject", {}).get("overall", {})
                line += f"  {'':>8}  {o['dice']:>11.4f}" if o else f"  {'':>8}  {'-':>11}"
            out.append(line + f"  {part['pooled']['overall']['dice']:>9.4f}")
        return out

    lines = [header, rule, *part_lines(summary)]
    for phase, part in (summary.get("per_phase") or {}).items():
        if "pooled" in part:
            lines += [rule, *part_lines(part, f"{phase} ")]
    return lines


def format_modality_table(summary: Mapping) -> str:
    """Text table of :func:`summarize_modality`'s output: Dice per group, test modality and class.

    Example:
        >>> from partialseg.evaluation.modality import summarize_modality
        >>> rows = [{"case": "c", "class": "liver", "dice": 0.9, "status": "ok", "modality": "CT", "group": "intramodal"},
        ...         {"case": "m", "class": "liver", "dice": 0.3, "status": "ok", "modality": "MR", "group": "cross_modal"}]
        >>> print(format_modality_table(summarize_modality(rows, ["liver"])))
        Dice by modality group    test     class             n    mean ± std
        --------------------------------------------------------------------
        intramodal                CT       liver             1  0.9000 ± 0.0000
        cross_modal               MR       liver             1  0.3000 ± 0.0000
        --------------------------------------------------------------------
        intramodal (all rows)                                1  0.9000
        cross_modal (all rows)                               1  0.3000
    """
    header = f"{'Dice by modality group':<25} {'test':<8} {'class':<14} {'n':>4}    mean ± std"
    rule = "-" * len(header)
    lines = [header, rule]
    for g in GROUPS:
        for m, part in summary["by_modality"].items():
            for name, e in part[g].get("per_class", {}).items():
                d = e["dice"]
                lines.append(f"{g:<25} {m:<8} {name:<14} {e['n']:>4}  {d['mean']:.4f} ± {d['std']:.4f}")
    lines.append(rule)
    for g in GROUPS:
        e = summary[g]
        value = f"{e['dice']:.4f}" if e["n_rows"] else "-"
        lines.append(f"{g + ' (all rows)':<25} {'':<8} {'':<14} {e['n_rows']:>4}  {value}")
    return "\n".join(lines)
