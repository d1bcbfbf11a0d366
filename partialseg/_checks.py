"""Argument checks shared by every layer: one wording, one place (no torch import).

``check_int`` / ``check_float`` replace the hand-written ``isinstance(v, bool) or not
isinstance(v, int) or v < k`` tests; ``check_option`` is MONAI's ``look_up_option`` for string
options (a "did you mean" in the error) without importing MONAI; ``unwrap_network`` is the one
place that strips ``DataParallel`` / ``DistributedDataParallel``.

Example:
    >>> check_int(3, "num_classes", minimum=2)
    3
    >>> check_option("maps", ("sum", "maps"), "reading")
    'maps'
    >>> check_float(0.2, "lambda_dual", minimum=0.0, maximum=1.0, include_maximum=False)
    0.2
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Iterable
from typing import Any

__all__ = ["ArgumentTypeError", "check_float", "check_int", "check_option", "unwrap_network"]


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type: a ``TypeError`` that is also a ``ValueError``.

    partialseg's checks raised ``ValueError`` for every bad argument before they were shared;
    like NumPy's ``AxisError`` (a ``ValueError`` and an ``IndexError``), this keeps both kinds
    of caller working.
    """


def check_int(value: Any, name: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as a Python ``int`` if it is an integer (NumPy integers too, never a bool) in range.

    Raises:
        ArgumentTypeError: ``value`` is a bool, a float or anything not integral (a ``TypeError``
            and a ``ValueError``).
        ValueError: ``value`` is below ``minimum`` or above ``maximum``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ArgumentTypeError(f"{name} must be an int, got {type(value).__name__} {value!r}.")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}.")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}.")
    return value


def check_float(
    value: Any,
    name: str,
    minimum: float | None = None,
    maximum: float | None = None,
    include_minimum: bool = True,
    include_maximum: bool = True,
) -> float:
    """``value`` as a finite Python ``float`` (ints accepted, bools not) in the given range.

    Raises:
        ArgumentTypeError: ``value`` is a bool or not a real number (a ``TypeError`` and a
            ``ValueError``).
        ValueError: ``value`` is NaN or infinite, or outside the range.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(f"{name} must be a number, got {type(value).__name__} {value!r}.")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}.")
    if minimum is not None and (value < minimum or (not include_minimum and value == minimum)):
        raise ValueError(f"{name} must be {'>=' if include_minimum else '>'} {minimum}, got {value}.")
    if maximum is not None and (value > maximum or (not include_maximum and value == maximum)):
        raise ValueError(f"{name} must be {'<=' if include_maximum else '<'} {maximum}, got {value}.")
    return value


def check_option(value: Any, supported: Iterable[str], name: str) -> str:
    """``value`` if it is one of ``supported`` (spelled exactly so).

    The same contract as ``monai.utils.look_up_option`` (an error listing the options, with a
    close match suggested), kept here so that modules that must not import MONAI or torch (the
    data model, the CLI) share it.

    Raises:
        ValueError: ``value`` is not a string or not one of ``supported``.
    """
    options = tuple(supported)
    if isinstance(value, str) and value in options:
        return value
    lowered = {str(o).lower(): str(o) for o in options}
    close = [lowered[str(value).lower()]] if str(value).lower() in lowered else difflib.get_close_matches(
        str(value), [str(o) for o in options], n=1
    )
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}; got {value!r}.{hint}")


def unwrap_network(network: Any) -> Any:
    """The module inside ``DataParallel`` / ``DistributedDataParallel``, or ``network`` itself."""
    module = getattr(network, "module", None)
    if module is not None and type(network).__name__ in ("DataParallel", "DistributedDataParallel"):
        return module
    return network
