"""Dictionary loading transforms for bundle pipelines, with errors that name the file."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

from monai.transforms import LoadImaged

__all__ = ["LoadImageNamedd", "LoadImageNamedD", "LoadImageNamedDict"]


class LoadImageNamedd(LoadImaged):
    """MONAI's ``LoadImaged`` whose errors name the file that failed.

    MONAI's own errors for a corrupt file (a truncated ``.nii.gz``: ``EOFError: Compressed file
    ended before the end-of-stream marker was reached``, wrapped in ``applying transform
    <LoadImaged ...>``) do not say which file it was; here a missing file raises
    ``FileNotFoundError`` and an unreadable one ``RuntimeError``, both starting with the path.
    Arguments as ``LoadImaged``.
    """

    def __call__(self, data: Mapping[Hashable, Any], reader: Any = None) -> dict[Hashable, Any]:
        import os

        for key in self.key_iterator(dict(data)):
            path = data[key]
            if isinstance(path, (str, os.PathLike)) and not os.path.exists(path):
                raise FileNotFoundError(f"{path}: file not found (key {key!r})")
        try:
            return super().__call__(data, reader)
        except Exception as e:  # noqa: BLE001 - any reader failure becomes one message naming the files
            paths = [str(data[k]) for k in self.key_iterator(dict(data)) if isinstance(data[k], (str, os.PathLike))]
            raise RuntimeError(f"{', '.join(paths)}: cannot be read ({type(e).__name__}: {e})") from e


LoadImageNamedD = LoadImageNamedDict = LoadImageNamedd
