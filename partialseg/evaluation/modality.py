"""Intramodal vs cross-modal evaluation (the atlas paper's Tables 1-2) and paired comparisons.

An organ is **intramodal** for a test image when some training case of that image's modality
labels it, and **cross-modal** when no training case of that modality does (it was learnt only
from the other modality, or from nowhere). :func:`labelled_by_modality` reads which organs each
modality labels from a training split, :func:`case_modality` reads a test case's modality (and
refuses a case whose modality no training case has, naming it), :func:`modality_group` tags a
(case, organ) pair, and :func:`summarize_modality` adds the two groups to a summary.
:func:`compare_runs` is the Wilcoxon signed-rank test between two runs' per case Dice (SciPy),
the paper's significance test.

Only the standard library is imported at module level (``partialseg --help`` stays fast).

Example:
    >>> training = [{"case": "a", "modality": "CT", "annotated": [1, 6]},
    ...             {"case": "b", "modality": "MR", "annotated": [2]}]
    >>> labelled = labelled_by_modality(training)
    >>> labelled
    {'CT': [1, 6], 'MR': [2]}
    >>> modality_group(case_modality({"case": "t1", "modality": "MR"}, labelled), 1, labelled)
    'cross_modal'
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from partialseg.evaluation.report import GROUPS, format_modality_table

__all__ = [
    "GROUPS", "labelled_by_modality", "case_modality", "modality_group", "summarize_modality",
    "format_modality_table", "read_metrics", "compare_runs", "format_comparison",
]

def labelled_by_modality(training: Sequence[Mapping], background: int | None = 0) -> dict[str, list[int]]:
    """The classes that the labelled training cases of each modality annotate.

    Args:
        training: datalist entries (:meth:`PartialDataset.datalist`): ``annotated`` (class
            indices) and ``modality``. Cases without an annotated class (unlabelled) count for
            nothing; a case without a ``modality`` is an error.
        background: the background index, left out of the lists (``None`` keeps it).

    Returns:
        ``{modality: sorted class indices}``, modalities sorted.

    Raises:
        ValueError: a labelled training case without a modality (naming the case), or no
            labelled training case at all.

    Example:
        >>> labelled_by_modality([{"case": "a", "modality": "CT", "annotated": [0, 1]},
        ...                       {"case": "b", "modality": "CT", "annotated": [3]}])
        {'CT': [1, 3]}
    """
    out: dict[str, set[int]] = {}
    for entry in training:
        annotated = [int(i) for i in entry.get("annotated") or [] if background is None or int(i) != background]
        if not entry.get("annotated"):
            continue
        modality = entry.get("modality")
        if modality is None or modality == "":
            raise ValueError(f"training case {entry.get('case')!r} has no modality: give it a \"modality\" key "
                             "(or a top-level one) in dataset.json to tell intramodal from cross-modal organs.")
        out.setdefault(str(modality), set()).update(annotated)
    if not out:
        raise ValueError("no labelled training case: cannot tell which organs each modality labels.")
    return {m: sorted(out[m]) for m in sorted(out)}


def case_modality(entry: Mapping, labelled: Mapping[str, Sequence[int]]) -> str:
    """A test case's modality, which must be one that some labelled training case has.

    Raises:
        ValueError: naming the case, when it has no modality or one that no training case has
            (every organ would be cross-modal by default, which is rarely what is meant: a
            misspelt ``"MRI"`` for ``"MR"``, or a top-level ``"CT+MR"`` inherited by a case
            without its own key).

    Example:
        >>> case_modality({"case": "t", "modality": "MRI"}, {"CT": [1], "MR": [2]})
        Traceback (most recent call last):
        ...
        ValueError: case 't': modality 'MRI' is not among the training modalities ['CT', 'MR'] (dataset.json's "modality" of the training cases); give the case one of them.
    """
    modality = entry.get("modality")
    if modality is None or modality == "":
        raise ValueError(f"case {entry.get('case')!r} has no modality; give it a \"modality\" key (one of "
                         f"{sorted(labelled)}) to evaluate it intramodal vs cross-modal.")
    if str(modality) not in labelled:
        raise ValueError(f"case {entry.get('case')!r}: modality {str(modality)!r} is not among the training "
                         f"modalities {sorted(labelled)} (dataset.json's \"modality\" of the training cases); "
                         "give the case one of them.")
    return str(modality)


def modality_group(modality: str, class_index: int, labelled: Mapping[str, Sequence[int]]) -> str:
    """``"intramodal"`` when a training case of ``modality`` labels the class, else ``"cross_modal"``.

    Example:
        >>> modality_group("CT", 1, {"CT": [1], "MR": [2]}), modality_group("CT", 2, {"CT": [1], "MR": [2]})
        ('intramodal', 'cross_modal')
    """
    return "intramodal" if int(class_index) in set(labelled.get(modality, ())) else "cross_modal"


def summarize_modality(rows: Sequence[Mapping], class_names: Sequence[str]) -> dict:
    """Per group (intramodal, cross-modal) and per test modality: the statistics of ``summarize``.

    Args:
        rows: per case and class rows (as :func:`~partialseg.evaluation.evaluate_case` returns
            them, with ``case``), each carrying ``modality`` and ``group`` (:data:`GROUPS`).
        class_names: the evaluated classes.

    Returns:
        ``{"intramodal": S, "cross_modal": S, "by_modality": {modality: {"intramodal": S,
        "cross_modal": S}}}`` where each ``S`` is ``{"n_rows", "n_cases", "dice" (mean over the
        group's rows of Dice, every (case, organ) pair once), "per_class", "overall" (mean over
        classes of the class means)}`` of :func:`~partialseg.evaluation.summarize` on the
        group's rows. A group without rows has ``n_rows = 0`` and no statistics.

    Example:
        >>> rows = [{"case": "c", "class": "liver", "dice": 0.9, "status": "ok", "modality": "CT", "group": "intramodal"},
        ...         {"case": "m", "class": "liver", "dice": 0.3, "status": "ok", "modality": "MR", "group": "cross_modal"},
        ...         {"case": "m", "class": "spleen", "dice": 0.8, "status": "ok", "modality": "MR", "group": "intramodal"}]
        >>> s = summarize_modality(rows, ["liver", "spleen"])
        >>> round(s["intramodal"]["dice"], 4), s["cross_modal"]["dice"], s["by_modality"]["MR"]["intramodal"]["n_rows"]
        (0.85, 0.3, 1)
    """
    from partialseg.evaluation.report import summarize

    def block(sel: Sequence[Mapping]) -> dict:
        out: dict[str, Any] = {"n_rows": len(sel), "n_cases": len({r["case"] for r in sel})}
        if sel:
            out["dice"] = sum(float(r["dice"]) for r in sel) / len(sel)
            part = summarize(sel, class_names)
            out["per_class"] = {k: v for k, v in part["per_class"].items() if v["n"]}
            out["overall"] = part["overall"]
        return out

    summary: dict[str, Any] = {g: block([r for r in rows if r["group"] == g]) for g in GROUPS}
    modalities = sorted({str(r["modality"]) for r in rows})
    summary["by_modality"] = {m: {g: block([r for r in rows if r["group"] == g and str(r["modality"]) == m])
                                  for g in GROUPS} for m in modalities}
    return summary


def read_metrics(run: str | os.PathLike) -> list[dict]:
    """The rows of a run's ``metrics.csv``: a CSV file, an evaluation folder holding one, or a
    prediction folder holding ``evaluation/metrics.csv``.

    Returns:
        dicts with ``case``, ``class``, ``dice`` (float) and, when the CSV has them, ``modality``
        and ``group``.

    Raises:
        ValueError: naming the path, when no ``metrics.csv`` is found or it lacks the columns.
    """
    path = Path(run)
    candidates = [path] if path.suffix == ".csv" else [path / "metrics.csv", path / "evaluation" / "metrics.csv"]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise ValueError(f"no metrics.csv for run {run}: looked for {', '.join(str(p) for p in candidates)} "
                         "(run partialseg evaluate on it first).")
    with open(found, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"case", "class", "dice"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{found} lacks the column(s) {sorted(missing)}; is it a partialseg metrics.csv?")
        rows = []
        for r in reader:
            row = {"case": r["case"], "class": r["class"], "dice": float(r["dice"])}
            for key in ("modality", "group"):
                if r.get(key):
                    row[key] = r[key]
            rows.append(row)
    return rows


def _per_case(rows: Sequence[Mapping], group: str | None, name: str | None) -> dict[str, float]:
    """Per case: the mean Dice over the case's rows of the group (all with None) and class (all with None)."""
    sums: dict[str, list[float]] = {}
    for r in rows:
        if (group is None or r.get("group") == group) and (name is None or r["class"] == name):
            sums.setdefault(r["case"], []).append(float(r["dice"]))
    return {case: sum(v) / len(v) for case, v in sums.items()}


def compare_runs(rows_a: Sequence[Mapping], rows_b: Sequence[Mapping], alternative: str = "two-sided") -> dict:
    """Wilcoxon signed-rank test between two runs' paired per case Dice (``scipy.stats.wilcoxon``).

    For each comparison, a case's Dice is the mean over its scored classes of that comparison
    (all classes; the intramodal or cross-modal ones, when the rows carry ``group``; one class),
    and the two runs are paired by case. Differences ``B - A`` of zero are dropped (SciPy's
    ``zero_method="wilcox"``); when every difference is zero the test is not run (``p = 1``).

    Args:
        rows_a: run A's rows (:func:`read_metrics`).
        rows_b: run B's rows, the same cases.
        alternative: as SciPy (``"two-sided"``, ``"less"``, ``"greater"``: B greater than A).

    Returns:
        ``{"all": R, "intramodal": R, "cross_modal": R (with groups), "per_class": {name: R}}``
        with ``R = {"n", "mean_a", "mean_b", "mean_diff", "statistic", "p_value"}``.

    Raises:
        ValueError: when the runs do not score the same cases, naming a case one of them lacks.

    Example:
        >>> a = [{"case": f"c{i}", "class": "liver", "dice": d} for i, d in enumerate([0.5, 0.6, 0.7, 0.8, 0.9, 0.4])]
        >>> b = [{"case": f"c{i}", "class": "liver", "dice": d + 0.05 * (i + 1)} for i, d in enumerate([0.5, 0.6, 0.7, 0.8, 0.9, 0.4])]
        >>> r = compare_runs(a, b)["all"]
        >>> r["n"], r["statistic"], round(r["p_value"], 5)  # every B better: the exact two-sided p = 2 / 2**6
        (6, 0.0, 0.03125)
    """
    from scipy.stats import wilcoxon

    def test(per_a: dict[str, float], per_b: dict[str, float]) -> dict:
        only = sorted(set(per_a) ^ set(per_b))
        if only:
            which = "A" if only[0] in per_a else "B"
            raise ValueError(f"case {only[0]!r} is scored in run {which} only: the two runs must score the same "
                             f"cases (evaluate both against the same dataset split and classes).")
        cases = sorted(per_a)
        a = [per_a[c] for c in cases]
        b = [per_b[c] for c in cases]
        out: dict[str, Any] = {"n": len(cases)}
        if not cases:
            return out
        diff = [y - x for x, y in zip(a, b)]
        out.update(mean_a=sum(a) / len(a), mean_b=sum(b) / len(b), mean_diff=sum(diff) / len(diff))
        if all(d == 0 for d in diff):
            out.update(statistic=0.0, p_value=1.0)
        else:
            res = wilcoxon(b, a, zero_method="wilcox", alternative=alternative)
            out.update(statistic=float(res.statistic), p_value=float(res.pvalue))
        return out

    result: dict[str, Any] = {"all": test(_per_case(rows_a, None, None), _per_case(rows_b, None, None))}
    if any("group" in r for r in rows_a) and any("group" in r for r in rows_b):
        for g in GROUPS:
            result[g] = test(_per_case(rows_a, g, None), _per_case(rows_b, g, None))
    names = list(dict.fromkeys(r["class"] for r in rows_a))
    result["per_class"] = {n: test(_per_case(rows_a, None, n), _per_case(rows_b, None, n)) for n in names}
    return result


def format_comparison(result: Mapping, name_a: str = "A", name_b: str = "B") -> str:
    """Text table of :func:`compare_runs`: per comparison n, both means, the difference and p."""
    header = f"{'Wilcoxon signed-rank':<22} {'n':>4}  {'mean ' + name_a[:10]:>15}  {'mean ' + name_b[:10]:>15}  {'B - A':>8}  {'p':>8}"
    lines = [header, "-" * len(header)]
    rows = [(k, result[k]) for k in ("all", *GROUPS) if k in result]
    rows += [(k, v) for k, v in result.get("per_class", {}).items()]
    for key, r in rows:
        if not r.get("n"):
            continue
        lines.append(f"{key:<22} {r['n']:>4}  {r['mean_a']:>15.4f}  {r['mean_b']:>15.4f}  {r['mean_diff']:>+8.4f}  "
                     f"{r['p_value']:>8.4g}")
    return "\n".join(lines)
