"""Evaluation of segmentation predictions against a dataset's reference labels.

``partialseg evaluate --pred DIR --dataset DIR`` pairs every labelled case of a dataset split
with a prediction file, computes per case and class Dice, Jaccard, HD95 and ASSD (mm, from the
reference's voxel spacing), and the DTML paper's 95HD and one-directional ASD in voxels, with
MONAI's metrics; summarises them per case, per subject (the slices of one volume pooled) and
pooled over all voxels; and writes ``metrics.csv``, ``summary.json`` and ``boxplot.png``. When the split's entries carry a ``phase`` (ACDC's
``"ED"`` / ``"ES"``), the statistics are also given per phase (``summary["per_phase"]``).
A folder whose predictions were written by several inference runs (their NIfTI run records
differ) is refused. See ``docs/evaluation.md``.

One module per concern:

- ``metrics``: one case: :func:`evaluate_case` (the :data:`METRICS`, the empty-mask conventions);
- ``discovery``: files: :func:`find_prediction`, reading labels, the grid check and
  :func:`check_one_run` (one inference run per folder);
- ``report``: :func:`summarize` (the aggregates), :func:`format_table` and the output files;
- ``folder``: :func:`evaluate_folder`, a folder against a dataset split;
- ``modality``: intramodal vs cross-modal Dice (:func:`labelled_by_modality`,
  :func:`summarize_modality`; the atlas paper's Tables 1-2) and the Wilcoxon signed-rank test
  between two runs (:func:`compare_runs`, ``partialseg evaluate --compare A B``);
- ``cli``: the ``partialseg evaluate`` command (``add_arguments``, ``run``).

Only the standard library and ``partialseg.data.spec`` are imported here and by the modules at
their top, so that ``partialseg --help`` stays fast; numpy, torch and MONAI are imported inside
the functions.

Example:
    >>> import numpy as np
    >>> ref = np.zeros((8, 8), dtype=int); ref[2:6, 2:6] = 1
    >>> evaluate_case(ref, ref, ["background", "square"])[0]["dice"]
    1.0
"""

from partialseg.evaluation.cli import add_arguments, run
from partialseg.evaluation.discovery import AFFINE_ATOL, SAVE_POSTFIXES, check_one_run, find_prediction
from partialseg.evaluation.folder import evaluate_folder, select_classes
from partialseg.evaluation.modality import (
    GROUPS,
    case_modality,
    compare_runs,
    format_comparison,
    format_modality_table,
    labelled_by_modality,
    modality_group,
    read_metrics,
    summarize_modality,
)
from partialseg.evaluation.metrics import METRICS, STATUSES, UNITS, VOXEL_METRICS, evaluate_case, image_diagonal
from partialseg.evaluation.report import NO_PHASE, format_table, phase_of, pooled_overlap, subject_of, summarize

__all__ = [
    "METRICS",
    "STATUSES",
    "UNITS",
    "VOXEL_METRICS",
    "NO_PHASE",
    "AFFINE_ATOL",
    "SAVE_POSTFIXES",
    "image_diagonal",
    "evaluate_case",
    "find_prediction",
    "check_one_run",
    "select_classes",
    "evaluate_folder",
    "GROUPS",
    "labelled_by_modality",
    "case_modality",
    "modality_group",
    "summarize_modality",
    "format_modality_table",
    "read_metrics",
    "compare_runs",
    "format_comparison",
    "summarize",
    "phase_of",
    "subject_of",
    "pooled_overlap",
    "format_table",
    "add_arguments",
    "run",
]
