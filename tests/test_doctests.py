"""Every docstring example in partialseg runs as written (modules whose examples generate data or
train are covered too; each is small)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import partialseg

MODULES = sorted(m.name for m in pkgutil.walk_packages(partialseg.__path__, "partialseg.") if not m.name.endswith("__main__"))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{name}: {result.failed} failing example(s)"
