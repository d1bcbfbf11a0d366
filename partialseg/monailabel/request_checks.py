"""Checks of what a MONAI Label client sends: train settings, config overrides, datastore names.

A train request reaches ``python -m monai.bundle run``, whose config parser evaluates strings that
start with ``$`` as Python and follows ``@`` / ``%`` references: a value is passed only when it is
plain data. :func:`check_override` accepts a JSON number, boolean or string (or a list of them where
``train.json``'s default is a list) of the default's type, never a config expression; keys must
name a plain value of ``train.json`` (not an expression, not a component's ``_target_``, not a key
the task sets itself). :data:`LIMITS` bounds the settings that decide how long a run takes.

:class:`RequestError` is a ``ValueError`` that FastAPI also answers as an HTTP error: raised while
MONAI Label handles a request, the client gets a 4xx JSON body ``{"detail": "..."}`` that names
the field; elsewhere (tests, a training subprocess) it is a plain ``ValueError``.

Example:
    >>> check_override("learning_rate", 1e-3, "$1e-2 if @stage == 1 else 1e-4")
    0.001
    >>> check_override("missing", "any", "error")
    'any'
    >>> check_override("missing", "$__import__('os').getcwd()", "error")
    Traceback (most recent call last):
    ...
    partialseg.monailabel.request_checks.RequestError: overrides['missing']: "$__import__('os'..." is a config expression...
    >>> safe_name("../../x", "tag")
    Traceback (most recent call last):
    ...
    partialseg.monailabel.request_checks.RequestError: tag '../../x' is not a safe name...
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

from fastapi import HTTPException

__all__ = ["LIMITS", "RequestError", "check_override", "check_setting", "config_default", "inside", "safe_name"]

#: (type, minimum, maximum) of the train settings a request may set, directly or through
#: ``overrides`` (also as the last part of a nested id, ``validate#dataloader#batch_size``); an int
#: is at least its minimum, a float above it (``learning_rate`` > 0, finite). ``epochs_stage1`` /
#: ``epochs_stage2`` are set from ``max_epochs``.
LIMITS: dict[str, tuple[type, float, float]] = {
    "max_epochs": (int, 1, 1000),
    "iterations_per_epoch": (int, 1, 10000),
    "val_interval": (int, 1, 1000),
    "batch_size": (int, 1, 512),
    "sw_batch_size": (int, 1, 512),
    "num_samples": (int, 1, 64),
    "num_workers": (int, 0, 64),
    "checkpoint_interval": (int, 1, 100000),
    "learning_rate": (float, 0.0, 1.0),
}
#: other numbers in ``overrides`` must be finite and at most this in absolute value
MAX_ABS = 1e9
#: longest string an override may hold
MAX_STRING = 256

_SAFE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\- ]{0,199}")
_SEP = re.compile(r"#|::")


class RequestError(ValueError, HTTPException):
    """A request the server refuses: a ``ValueError`` that FastAPI answers with ``status_code``
    (default 400) and the JSON body ``{"detail": message}``."""

    def __init__(self, message: str, status_code: int = 400) -> None:
        ValueError.__init__(self, message)
        HTTPException.__init__(self, status_code=status_code, detail=message)

    def __str__(self) -> str:
        return str(self.detail)


def safe_name(value: Any, field: str) -> str:
    """``value`` if it is a safe datastore name (image id, label tag, label id): 1-200 characters,
    letters, digits, ``_``, ``-``, ``.`` and spaces, starting with a letter, digit or ``_`` (so
    never ``..``, a path separator or an absolute path); ``RequestError`` naming ``field`` otherwise.

    Example:
        >>> safe_name("full_000", "image")
        'full_000'
    """
    if not isinstance(value, str) or not _SAFE.fullmatch(value) or ".." in value:
        raise RequestError(
            f"{field} {value!r} is not a safe name: use 1-200 letters, digits, '_', '-', '.' or spaces,"
            " starting with a letter, digit or '_' (no '..', '/' or '\\')"
        )
    return value


def inside(path: str | os.PathLike, root: str | os.PathLike, field: str) -> str:
    """``path`` resolved (symbolic links followed) if it lies inside ``root``; ``RequestError``
    naming ``field`` otherwise (a name that would write outside the datastore).

    Example:
        >>> inside("/data/studies/labels/final/a.nii.gz", "/data/studies", "label")
        '/data/studies/labels/final/a.nii.gz'
    """
    real, base = os.path.realpath(path), os.path.realpath(root)
    if os.path.commonpath([real, base]) != base:
        raise RequestError(f"{field}: {path} resolves to {real}, outside the datastore {base}")
    return real


def check_setting(key: str, raw: Any, field: str | None = None) -> int | float:
    """A bounded train setting (:data:`LIMITS`) as its type: a JSON number or a numeric string (as
    form fields give), never a bool; positive, finite, at most its maximum.

    Example:
        >>> check_setting("max_epochs", "3")
        3
        >>> check_setting("max_epochs", 1e300)
        Traceback (most recent call last):
        ...
        partialseg.monailabel.request_checks.RequestError: max_epochs must be at most 1000, got 1e+300
    """
    kind, minimum, maximum = LIMITS[key]
    field = field or key
    what = "an integer" if kind is int else "a number"
    value: float | None = None
    if not isinstance(raw, bool):
        try:
            value = float(raw.strip()) if isinstance(raw, str) else float(raw)
        except (TypeError, ValueError, OverflowError):
            value = None
    if value is None or math.isnan(value) or (kind is int and math.isfinite(value) and not value.is_integer()):
        raise RequestError(f"{field} must be {what}, got {raw!r}")
    if value < minimum or (kind is float and value == minimum):
        bound = "positive" if (kind is float and minimum == 0) or (kind is int and minimum == 1) else f">= {minimum:g}"
        raise RequestError(f"{field} must be {bound}, got {raw!r}")
    if not value <= maximum:  # inf too
        raise RequestError(f"{field} must be at most {maximum:g}, got {raw!r}")
    return int(value) if kind is int else value


def config_default(config: dict[str, Any], key: str) -> tuple[bool, Any]:
    """``(found, value)`` of a config id (``a#b#0``, or MONAI's ``a::b::0``) in a raw config."""
    node: Any = config
    for part in _SEP.split(key):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False, None
    return True, node


def _expression(value: str) -> bool:
    return value.startswith(("$", "@", "%")) or "#" in value or "::" in value


def check_override(key: str, value: Any, default: Any) -> Any:
    """``value`` if a request may set config ``key`` (whose ``train.json`` value is ``default``) to it.

    Accepted: a JSON number, boolean or string of the default's type (an int for an int default,
    a number for a float one, a bool for a bool, a plain string for a string), or a list of those,
    element by element, where the default is a list of plain values of the same length. Keys in
    :data:`LIMITS` (by the id's last part) take their type and bounds from there (their defaults may
    be expressions).

    Raises:
        RequestError: naming ``overrides[key]``: the value is a config expression (a string that
            starts with ``$``, ``@``, ``%`` or holds a ``#`` / ``::`` reference), an object, of
            another type than the default, not finite, or out of bounds; or the default is not a
            plain value (an expression, an object, null), which a request cannot replace.
    """
    field = f"overrides[{key!r}]"
    name = _SEP.split(key)[-1]
    if name in LIMITS:
        if isinstance(value, str) and _expression(value):
            raise RequestError(f"{field}: {value[:16] + '...' if len(value) > 16 else value!r} is a config expression; send a plain number")
        return check_setting(name, value, field)
    if isinstance(value, str) and _expression(value):
        shown = repr(value[:16] + "..." if len(value) > 16 else value)
        raise RequestError(f"{field}: {shown} is a config expression (a string starting with '$', '@' or '%', or holding '#' or '::'); send plain JSON values only")
    if isinstance(default, str) and _expression(default) or default is None or isinstance(default, dict):
        raise RequestError(f"{field}: train.json's value {default!r} is not a plain value, so a request cannot replace it")
    if isinstance(default, list):
        if not isinstance(value, list) or len(value) != len(default) or any(isinstance(d, (list, dict)) for d in default):
            raise RequestError(f"{field} must be a list of {len(default)} plain values like train.json's {default!r}, got {value!r}")
        return [check_override(f"{key}#{i}", v, d) for i, (v, d) in enumerate(zip(value, default))]
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise RequestError(f"{field} must be a boolean (train.json has {default!r}), got {value!r}")
        return value
    if isinstance(default, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(default, int) and not isinstance(value, int)):
            raise RequestError(f"{field} must be {'an integer' if isinstance(default, int) else 'a number'} (train.json has {default!r}), got {value!r}")
        if not math.isfinite(value) or abs(value) > MAX_ABS:
            raise RequestError(f"{field} must be finite and at most {MAX_ABS:g} in absolute value, got {value!r}")
        return value
    if isinstance(default, str):
        if not isinstance(value, str) or len(value) > MAX_STRING:
            raise RequestError(f"{field} must be a string of at most {MAX_STRING} characters (train.json has {default!r}), got {value!r}")
        return value
    raise RequestError(f"{field}: train.json's value {default!r} is not a plain value, so a request cannot replace it")
