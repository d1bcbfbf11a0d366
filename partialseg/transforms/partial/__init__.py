from partialseg.transforms.partial.array import LateralSplit, PartialLabelToVector, RemapLabels, annotated_mask
from partialseg.transforms.partial.dictionary import (
    LateralSplitd,
    LateralSplitD,
    LateralSplitDict,
    PartialLabelToVectord,
    PartialLabelToVectorD,
    PartialLabelToVectorDict,
    RemapLabelsd,
    RemapLabelsD,
    RemapLabelsDict,
)

__all__ = [
    "LateralSplit", "LateralSplitd", "LateralSplitD", "LateralSplitDict",
    "PartialLabelToVector", "PartialLabelToVectord", "PartialLabelToVectorD", "PartialLabelToVectorDict",
    "RemapLabels", "RemapLabelsd", "RemapLabelsD", "RemapLabelsDict",
    "annotated_mask",
]
