"""Scoring a folder of predictions against a dataset split: :func:`evaluate_folder`.

It pairs every labelled case with its prediction (:mod:`partialseg.evaluation.discovery`),
refuses predictions of several inference runs, scores each case
(:mod:`partialseg.evaluation.metrics`) and writes the outputs (:mod:`partialseg.evaluation.report`).
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from partialseg._checks import check_int
from partialseg.data.spec import case_name
from partialseg.evaluation.discovery import check_one_run, check_same_grid, find_prediction, load_cases, load_label
from partialseg.evaluation.metrics import UNITS, as_label_array, evaluate_case
from partialseg.evaluation.modality import case_modality, labelled_by_modality, modality_group, summarize_modality
from partialseg.evaluation.report import check_outputs, phase_of, subject_of, summarize, write_outputs

__all__ = ["evaluate_folder", "select_classes"]


def select_classes(names: Sequence[str], classes: Sequence[str | int] | None, include_background: bool) -> list[int]:
    """The sorted class indices to score: ``classes`` given by name or index, or all.

    Args:
        names: the dataset's class names, index 0 the background.
        classes: names or indices (an all-digit string that is not a class name is an index);
            ``None`` for every class but the background (which ``include_background`` adds).
        include_background: allow (and by default add) class 0.

    Raises:
        ValueError: for an unknown name, an index out of range, the background without
            ``include_background``, or nothing to score.

    Example:
        >>> select_classes(["background", "liver", "spleen"], ["spleen", "1"], False)
        [1, 2]
        >>> select_classes(["background", "liver", "spleen"], None, True)
        [0, 1, 2]
    """
    if classes is None:
        selected = list(range(0 if include_background else 1, len(names)))
    else:
        selected = []
        for c in classes:
            if isinstance(c, numbers.Integral) or (isinstance(c, str) and c.isdigit() and c not in names):
                i = check_int(int(c) if isinstance(c, str) else c, f"class index (classes: {names})", 0, len(names) - 1)
            elif c in names:
                i = names.index(c)
            else:
                raise ValueError(f"unknown class {c!r}; the dataset's classes are {names}.")
            if i == 0 and not include_background:
                raise ValueError(f"class {names[0]!r} is the background; add include_background to evaluate it.")
            if i not in selected:
                selected.append(i)
        selected.sort()
    if not selected:
        raise ValueError(f"no class to evaluate (classes: {names}, include_background={include_background}).")
    return selected


def evaluate_folder(
    pred_dir: str | os.PathLike,
    dataset_dir: str | os.PathLike,
    split: str = "test",
    out_dir: str | os.PathLike | None = None,
    classes: Sequence[str | int] | None = None,
    include_background: bool = False,
    allow_missing: bool = False,
    progress: bool = True,
    arguments: Mapping[str, Any] | None = None,
    modality_dataset: str | os.PathLike | None = None,
    by_modality: bool | None = None,
) -> dict:
    """Evaluates a folder of predictions against the references of a dataset split.

    Every case of ``split`` that has a ``label`` is paired with its prediction (see
    :func:`find_prediction` for the accepted names); cases without a label are skipped and
    listed in the summary. The prediction must lie on the reference's grid (same spatial shape,
    affine within ``AFFINE_ATOL``). HD95 and ASSD use the reference's voxel spacing (mm), 95HD
    and ASD (one-directional) the voxel grid. The
    dataset is read with :func:`partialseg.data.load_dataset`; a reference whose source has a
    ``label_maps`` entry is remapped to global class indices first (``RemapLabels``), and a
    case that annotates only some classes is evaluated on those classes only.

    Args:
        pred_dir: folder of predicted label maps (class indices, one channel).
        dataset_dir: dataset folder holding ``dataset.json`` (``docs/data_format.md``).
        split: dataset split whose references are used.
        out_dir: where ``metrics.csv``, ``summary.json`` and ``boxplot.png`` go; default
            ``<pred_dir>/evaluation``.
        classes: evaluate only these classes (names or indices); default all classes but the
            background (which ``include_background`` adds).
        include_background: evaluate class 0 too.
        allow_missing: count a missing prediction as an empty one instead of raising.
        progress: show a tqdm progress bar over cases (on a terminal).
        arguments: recorded as ``summary["arguments"]`` (the CLI passes its arguments).
        modality_dataset: the dataset whose ``training`` split says which organs each modality
            labels (default ``dataset_dir``'s own training split).
        by_modality: report intramodal vs cross-modal Dice (``summary["modality"]``, see
            :mod:`partialseg.evaluation.modality`); None (default): when the labelled training
            cases have two modalities or more, or ``modality_dataset`` is given.

    Returns:
        The summary written to ``summary.json``: ``per_class``, ``overall``, ``status_counts``
        and, when a scored case's dataset entry has a ``phase``, ``per_phase`` (see
        :func:`summarize`), plus ``num_cases``, ``cases``, ``missing_predictions``,
        ``skipped_unlabelled``, ``classes``, ``units``, ``outputs``, ``arguments``,
        ``prediction_run`` (the predictions' run record, ``None`` for files written by other
        tools), then the aggregates ``pooled`` and, when an entry has a ``subject``,
        ``per_subject``; with modality grouping, ``modality`` (:func:`summarize_modality` plus
        ``labelled_by_modality``: class names per training modality) and the rows' ``modality``
        and ``group`` (``intramodal`` / ``cross_modal``) in the CSV. The phase also fills the CSV's ``phase`` column and splits the box
        plot; the subject fills its ``subject`` column.

    Raises:
        ValueError: naming the case, for a missing prediction (unless ``allow_missing``),
            several matching predictions, a prediction not on the reference grid, or values that
            are not class indices; naming two files, for predictions written by different
            inference runs (:func:`check_one_run`); also for a dataset without the split,
            labelled cases, or an unknown class in ``classes``; with modality grouping, naming
            the case whose modality is missing or is no training case's.
    """
    import numpy as np
    from monai.transforms import LoadImage
    from tqdm import tqdm

    pred_dir, dataset_dir = Path(pred_dir), Path(dataset_dir)
    if not pred_dir.is_dir():
        raise ValueError(f"the prediction folder {pred_dir} does not exist.")
    out_dir = pred_dir / "evaluation" if out_dir is None else Path(out_dir)
    outputs = {"csv": out_dir / "metrics.csv", "summary": out_dir / "summary.json", "boxplot": out_dir / "boxplot.png"}
    check_outputs(out_dir, outputs.values())  # before any work: a bad --out fails at once
    names, cases = load_cases(dataset_dir, split)

    selected = select_classes(names, classes, include_background)

    labelled = [c for c in cases if c.get("label")]
    skipped = [str(c["case"]) for c in cases if not c.get("label")]
    if not labelled:
        raise ValueError(f"split {split!r} of {dataset_dir} has no case with a reference label.")

    labelled_modalities = None  # modality -> class indices its training cases label
    if by_modality is not False:
        _, training = load_cases(Path(modality_dataset) if modality_dataset is not None else dataset_dir, "training")
        with_labels = [e for e in training if e.get("annotated")]
        if by_modality or modality_dataset is not None or len({e.get("modality") for e in with_labels}) >= 2:
            labelled_modalities = labelled_by_modality(training)
            for entry in labelled:  # before any work: a case whose modality is unknown is refused, named
                case_modality(entry, labelled_modalities)

    # pair every case with its prediction first, so a missing file fails before any work
    pairs = []
    missing: list[str] = []
    for entry in labelled:
        case = str(entry["case"])
        pred_path = find_prediction(pred_dir, entry["image"], case)
        if pred_path is None:
            if not allow_missing:
                raise ValueError(
                    f"case {case!r}: no prediction in {pred_dir} (looked for {Path(entry['image']).name}, "
                    f"{case_name(Path(entry['image']).name)}[_seg|_trans].<ext> and <name>/<name>_seg.<ext>); "
                    "use --allow-missing to count it as empty."
                )
            missing.append(case)
        pairs.append((entry, case, pred_path))
    # predictions of one inference run only (a rerun stopped part way leaves older files beside new ones)
    run = check_one_run(pred_dir, {case: p for _, case, p in pairs if p is not None})

    loader = LoadImage(image_only=True, ensure_channel_first=True)
    rows: list[dict] = []
    for entry, case, pred_path in tqdm(pairs, desc="evaluate", unit="case", disable=None if progress else True):
        ref, ref_affine, spacing = load_label(loader, entry["label"], "reference", case, entry.get("label_map"))
        if pred_path is None:
            pred = np.zeros(ref.shape, dtype=np.int64)
        else:
            pred, pred_affine, _ = load_label(loader, pred_path, "prediction", case)
            check_same_grid(case, pred_path, pred.shape, pred_affine, entry["label"], ref.shape, ref_affine)
        # load_dataset gives the annotated classes as sorted indices ("all" expanded)
        annotated = entry.get("annotated")
        phase = phase_of(entry)  # ACDC's "ED" / "ES"; None for datasets without phases
        subject = subject_of(entry)  # the volume a 2D slice comes from (cardiac builders); None for 3D cases
        case_classes = selected if annotated is None else [i for i in selected if i in set(annotated)]
        if not case_classes:
            continue
        # checked here too, not only in evaluate_case, so that a value that is no class index names its file
        if pred_path is not None:
            pred = as_label_array(pred, f"the prediction {pred_path}", case, len(names))
        ref = as_label_array(ref, f"the reference {entry['label']}", case, len(names))
        for row in evaluate_case(pred, ref, names, spacing=spacing, include_background=include_background,
                                 class_indices=case_classes, case=case):
            rows.append({"case": case, **row})
            if phase is not None:
                rows[-1]["phase"] = phase
            if subject is not None:
                rows[-1]["subject"] = subject
            if labelled_modalities is not None:
                modality = case_modality(entry, labelled_modalities)
                rows[-1]["modality"] = modality
                rows[-1]["group"] = modality_group(modality, row["class_index"], labelled_modalities)

    class_names = [names[i] for i in selected]
    summary = summarize(rows, class_names)
    summary.update(
        num_cases=len(pairs),
        cases=[case for _, case, _ in pairs],
        missing_predictions=missing,
        skipped_unlabelled=skipped,
        classes=class_names,
        units=dict(UNITS),
        outputs={k: str(v) for k, v in outputs.items()},
        arguments=dict(arguments) if arguments is not None else {
            "pred": str(pred_dir), "dataset": str(dataset_dir), "split": split, "out": str(out_dir),
            "classes": list(classes) if classes is not None else None,
            "include_background": include_background, "allow_missing": allow_missing,
        },
        prediction_run=run,  # the keys before it keep their order
    )
    for key in ("pooled", "per_subject"):  # later additions after it, so that the earlier keys keep their order
        if key in summary:
            summary[key] = summary.pop(key)
    if labelled_modalities is not None:
        summary["modality"] = {
            "labelled_by_modality": {m: [names[i] for i in v] for m, v in labelled_modalities.items()},
            **summarize_modality(rows, class_names),
        }
    write_outputs(outputs, rows, class_names, summary)
    return summary
