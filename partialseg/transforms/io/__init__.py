"""Loading with errors that name the file; saving whole predictions, named after the case and stamped with their run."""

from partialseg.transforms.io.array import AtomicNiftiWriter, SavePrediction
from partialseg.transforms.io.dictionary import (
    CaseNameToMetad,
    LoadImageNamedd,
    SavePredictiond,
    case_name_formatter,
    squeeze_trailing_singletons,
)
from partialseg.transforms.io.record import PredictionRun, read_run_record

__all__ = [
    "AtomicNiftiWriter", "CaseNameToMetad", "LoadImageNamedd", "PredictionRun", "SavePrediction", "SavePredictiond",
    "case_name_formatter", "read_run_record", "squeeze_trailing_singletons",
]
