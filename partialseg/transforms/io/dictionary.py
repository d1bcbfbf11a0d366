"""Dictionary loading transforms for bundle pipelines, with errors that name the file."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
from monai.config import KeysCollection
from monai.data.folder_layout import default_name_formatter
from monai.transforms import LoadImaged, MapTransform, SaveImaged, SqueezeDim

from partialseg._checks import check_int
from partialseg.transforms.io.array import AtomicNiftiWriter, _check_nifti
from partialseg.transforms.io.record import PredictionRun

__all__ = [
    "LoadImageNamedd", "LoadImageNamedD", "LoadImageNamedDict", "CaseNameToMetad", "CaseNameToMetaD", "CaseNameToMetaDict",
    "SavePredictiond", "SavePredictionD", "SavePredictionDict", "case_name_formatter", "squeeze_trailing_singletons",
]


def squeeze_trailing_singletons(img: Any, spatial_dims: int) -> Any:
    """Drop trailing size-1 spatial dimensions of a channel-first image down to ``spatial_dims``.

    A 2D slice stored as an ``(H, W, 1)`` volume loads as ``(C, H, W, 1)``; this gives ``(C, H, W)``
    exactly as the same slice stored as ``(H, W)`` loads: NIfTI places a 2D image in 3D world
    space, so MONAI keeps its 4 x 4 affine, and so does this (only ``spatial_shape`` in the meta
    data follows the new shape). Dimensions that are not size 1 are kept: the caller decides
    whether what is left is acceptable.
    """
    squeezed = False
    while img.ndim - 1 > spatial_dims and img.shape[-1] == 1:
        img = SqueezeDim(dim=-1, update_meta=False)(img)
        squeezed = True
    meta = getattr(img, "meta", None)
    if squeezed and meta is not None and "spatial_shape" in meta:
        meta["spatial_shape"] = np.asarray(img.shape[1:])
    return img


class LoadImageNamedd(LoadImaged):
    """MONAI's ``LoadImaged`` whose errors name the file that failed.

    MONAI's own errors for a corrupt file (a truncated ``.nii.gz``: ``EOFError: Compressed file
    ended before the end-of-stream marker was reached``, wrapped in ``applying transform
    <LoadImaged ...>``) do not say which file it was; here a missing file raises
    ``FileNotFoundError`` and an unreadable one ``RuntimeError``, both starting with the path.

    Args:
        spatial_dims: when given (needs ``ensure_channel_first=True``), every loaded image must
            have this many spatial dimensions: trailing size-1 dimensions are dropped (a 2D slice
            saved as ``(H, W, 1)`` loads as ``(1, H, W)``, as if saved as ``(H, W)``), and an image of
            any other dimensionality raises ``ValueError`` naming the file and its shape, instead of
            failing later inside a network's convolution.
        Other arguments as ``LoadImaged``.
    """

    def __init__(self, keys: Any, *args: Any, spatial_dims: int | None = None, **kwargs: Any) -> None:
        super().__init__(keys, *args, **kwargs)
        if spatial_dims is not None:
            check_int(spatial_dims, "spatial_dims (1, 2 or 3)", minimum=1, maximum=3)
            if not kwargs.get("ensure_channel_first", False):
                raise ValueError("spatial_dims needs ensure_channel_first=True (the channel must be known to count spatial dimensions)")
        self.spatial_dims = spatial_dims

    def __call__(self, data: Mapping[Hashable, Any], reader: Any = None) -> dict[Hashable, Any]:
        import os

        for key in self.key_iterator(dict(data)):
            path = data[key]
            if isinstance(path, (str, os.PathLike)) and not os.path.exists(path):
                raise FileNotFoundError(f"{path}: file not found (key {key!r})")
        try:
            out = super().__call__(data, reader)
        except Exception as e:  # noqa: BLE001 - any reader failure becomes one message naming the files
            paths = [str(data[k]) for k in self.key_iterator(dict(data)) if isinstance(data[k], (str, os.PathLike))]
            raise RuntimeError(f"{', '.join(paths)}: cannot be read ({type(e).__name__}: {e})") from e
        if self.spatial_dims is not None:
            for key in self.key_iterator(out):
                out[key] = self._check_dims(squeeze_trailing_singletons(out[key], self.spatial_dims), data[key], key)
        return out

    def _check_dims(self, img: Any, path: Any, key: Hashable) -> Any:
        spatial = tuple(int(s) for s in img.shape[1:])
        if len(spatial) == self.spatial_dims:
            return img
        if len(spatial) > self.spatial_dims:
            hint = (
                "cut volumes into 2D slices first (docs/data_format.md, 'Cardiac layouts': partialseg build-datalist)"
                if self.spatial_dims == 2
                else "only trailing size-1 dimensions are dropped"
            )
        else:
            hint = f"a {len(spatial)}D image cannot go through a {self.spatial_dims}D network"
        raise ValueError(
            f"{path}: a {len(spatial)}D image of spatial shape {spatial} (key {key!r}); this pipeline takes "
            f"{self.spatial_dims}D images: {hint}."
        )


LoadImageNamedD = LoadImageNamedDict = LoadImageNamedd


class CaseNameToMetad(MapTransform):
    """Record the case's name in the meta data of its images (``meta["case"]``).

    Outputs saved by MONAI's ``SaveImaged(output_name_formatter=case_name_formatter)`` are then
    named after the case (``<case>_seg.nii.gz``, what ``partialseg evaluate`` looks for) rather
    than after the image file, whose name may repeat: KiTS stores every case as
    ``case_*/imaging.nii.gz``, and its predictions would overwrite each other.

    Args:
        keys: image keys (MetaTensors, as ``LoadImaged`` gives) whose meta data get the name.
        case_key: key of the case's name (a dataset entry's ``case``); a case without it is
            left unchanged.
        allow_missing_keys: don't raise when a key is missing.
    """

    def __init__(self, keys: KeysCollection, case_key: str = "case", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.case_key = case_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        name = d.get(self.case_key)
        if name is None:
            return d
        for key in self.key_iterator(d):
            meta = getattr(d[key], "meta", None)
            if meta is None:
                raise TypeError(f"{key!r} must be a MetaTensor (load it with LoadImaged) to carry the case name, got {type(d[key]).__name__}")
            meta["case"] = str(name)
        return d


def case_name_formatter(metadict: dict | None, saver: Any) -> dict:
    """``SaveImage`` name formatter: the case name of :class:`CaseNameToMetad`, else MONAI's default (the file name)."""
    out = default_name_formatter(metadict, saver)
    case = (metadict or {}).get("case")
    if case:
        out["subject"] = str(case)
    return out


CaseNameToMetaD = CaseNameToMetaDict = CaseNameToMetad



class SavePredictiond(SaveImaged):
    """MONAI's ``SaveImaged`` writing whole NIfTI files only, each with the run's record.

    The dictionary twin of :class:`~partialseg.transforms.SavePrediction`: each file is written
    to a temporary name in its folder and renamed into place once complete (a kill leaves the
    earlier file or none under the final name, never part of one), and its NIfTI header records
    the run id and the SHA-256 of ``model_file`` (:mod:`partialseg.transforms.io.record`), which
    ``partialseg evaluate`` reads to refuse a folder mixing several runs' predictions. One
    instance is one run: the bundles' ``inference.json`` build one per ``monai.bundle run``.

    Args:
        keys: keys of the predictions to save.
        model_file: checkpoint the predictions come from (hashed once, on the first save), or
            ``None`` to record the run id alone.
        run_id: the run id (default: a fresh one per instance).
        args, kwargs: as ``SaveImaged`` (``output_dir``, ``output_postfix``,
            ``output_name_formatter``, ...), except ``writer``; ``output_ext`` must be
            ``.nii.gz`` (default) or ``.nii``.

    Raises:
        ValueError: for another ``output_ext`` or a ``writer`` argument.

    Example:
        >>> import os, tempfile, torch
        >>> from monai.data import MetaTensor
        >>> from partialseg.transforms.io.record import read_run_record
        >>> out = tempfile.mkdtemp()
        >>> save = SavePredictiond("pred", output_dir=out, output_postfix="seg", separate_folder=False,
        ...                        output_name_formatter=case_name_formatter, resample=False, print_log=False, run_id="run-1")
        >>> pred = MetaTensor(torch.ones(1, 4, 4, 3), meta={"filename_or_obj": "imaging.nii.gz", "case": "case_7"})
        >>> _ = save({"pred": pred})
        >>> sorted(os.listdir(out)), read_run_record(os.path.join(out, "case_7_seg.nii.gz"))["partialseg_run"]
        (['case_7_seg.nii.gz'], 'run-1')
    """

    def __init__(self, keys: KeysCollection, *args: Any, model_file: Any = None, run_id: str | None = None, **kwargs: Any) -> None:
        if "writer" in kwargs:
            raise ValueError(f"{type(self).__name__} always writes with AtomicNiftiWriter; drop writer={kwargs['writer']!r}")
        super().__init__(keys, *args, writer=AtomicNiftiWriter, **kwargs)
        _check_nifti(self.saver.output_ext, type(self).__name__)
        self.run = PredictionRun(model_file, run_id)
        self.saver.set_options(init_kwargs={"run": self.run})

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        self.run.record  # noqa: B018 - hash the model now: a missing file raises as itself, not inside MONAI's writer loop
        return super().__call__(data)


SavePredictionD = SavePredictionDict = SavePredictiond
