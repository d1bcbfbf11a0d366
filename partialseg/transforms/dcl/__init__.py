"""Conditional supervision for DCL's CompNet: ``z = g(y_t, y_c)`` and single-label views."""

from partialseg.transforms.dcl.array import (
    ConditionalSupervision,
    SingleLabelView,
    conditional_supervision,
    label_view,
)
from partialseg.transforms.dcl.dictionary import (
    ConditionalSupervisiond,
    ConditionalSupervisionD,
    ConditionalSupervisionDict,
)

__all__ = [
    "ConditionalSupervision", "ConditionalSupervisiond", "ConditionalSupervisionD", "ConditionalSupervisionDict",
    "SingleLabelView", "conditional_supervision", "label_view",
]
