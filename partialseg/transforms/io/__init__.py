"""Loading with errors that name the file; outputs named after the case."""

from partialseg.transforms.io.dictionary import CaseNameToMetad, LoadImageNamedd, case_name_formatter, squeeze_trailing_singletons

__all__ = ["CaseNameToMetad", "LoadImageNamedd", "case_name_formatter", "squeeze_trailing_singletons"]
