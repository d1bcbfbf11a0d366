"""MONAI Label's local datastore with names checked: nothing written outside the studies folder.

MONAI Label 0.8.5's ``LocalDatastore`` joins the client's image id and label tag into file paths
as given: ``PUT /datastore/label?image=ID&tag=../../X`` wrote outside the studies folder (an
absolute tag too), and ``PUT /datastore/image?image=../x`` likewise. :class:`SafeDatastore` (what
:class:`~partialseg.monailabel.app.PartialSegApp` returns from ``init_datastore``) refuses ids and
tags that are not safe names (:func:`~partialseg.monailabel.request_checks.safe_name`), checks that
every path it writes resolves inside the datastore, and checks a label's ``annotated`` info when it
is saved; refusals are :class:`~partialseg.monailabel.request_checks.RequestError` (a 400 JSON
answer in the server).

Example:
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as studies:
    ...     SafeDatastore(studies).save_label("case", "/tmp/x.nii.gz", "../../escape", {})
    Traceback (most recent call last):
    ...
    partialseg.monailabel.request_checks.RequestError: tag '../../escape' is not a safe name...
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from monailabel.datastore.local import LocalDatastore

from partialseg.monailabel.request_checks import RequestError, inside, safe_name

__all__ = ["SafeDatastore"]


class SafeDatastore(LocalDatastore):
    """``LocalDatastore`` that refuses unsafe image ids and label tags and writes only inside its folder.

    Args:
        datastore_path: the studies folder.
        check_label_info: called with ``(image_id, label_info)`` before a label is saved; raises
            ``ValueError`` for info the app cannot use (the app checks ``annotated``).
        kwargs: ``LocalDatastore``'s other arguments.
    """

    def __init__(self, datastore_path: str, check_label_info: Callable[[str, dict[str, Any]], None] | None = None, **kwargs: Any) -> None:
        super().__init__(datastore_path, **kwargs)
        self._root = os.path.realpath(datastore_path)
        self._check_label_info = check_label_info

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        image_id = image_id or self._to_id(os.path.basename(image_filename))[0]
        safe_name(image_id, "image")
        _, ext = self._to_id(os.path.basename(image_filename))
        inside(os.path.join(self._datastore.image_path(), self._filename(image_id, ext)), self._root, "image")
        return super().add_image(image_id, image_filename, image_info)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        safe_name(image_id, "image")
        safe_name(label_tag, "tag")
        _, ext = self._to_id(os.path.basename(label_filename))
        inside(os.path.join(self._datastore.label_path(label_tag), self._filename(image_id, ext)), self._root, "label")
        if self._check_label_info is not None:
            try:
                self._check_label_info(image_id, label_info or {})
            except RequestError:
                raise
            except ValueError as e:
                raise RequestError(str(e)) from None
        return super().save_label(image_id, label_filename, label_tag, label_info)

    def remove_image(self, image_id: str) -> None:
        return super().remove_image(safe_name(image_id, "id"))

    def remove_label(self, label_id: str, label_tag: str) -> None:
        return super().remove_label(safe_name(label_id, "id"), safe_name(label_tag, "tag"))

    def update_image_info(self, image_id: str, info: dict[str, Any]) -> None:
        return super().update_image_info(safe_name(image_id, "image"), info)

    def update_label_info(self, label_id: str, label_tag: str, info: dict[str, Any]) -> None:
        return super().update_label_info(safe_name(label_id, "label"), safe_name(label_tag, "tag"), info)
