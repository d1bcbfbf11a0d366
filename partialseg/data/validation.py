"""Checks of a partial-label dataset that need its files, run before any training starts.

:func:`validate_dataset` opens every image and label (one case per task, in worker processes
with ``workers > 1``), and can keep each case's findings in a cache file keyed by the files'
resolved paths, sizes and modification times, so a second ``partialseg check`` of a large
dataset only reads what changed. Across cases it compares files by resolved real path (a
``..`` or a symlink does not hide a duplicate or a training/validation/test leak) and, with
``content_hash``, by content.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from partialseg._checks import check_int, check_option
from partialseg.data.spec import SPLITS, DatasetError, PartialDataset, load_dataset, real_path, supervision_of

__all__ = ["ValidationReport", "dataset_warnings", "read_image", "read_gzip_verified", "supervision_line", "validate_dataset"]

AFFINE_TOL = 1e-3
_NIFTI = (".nii", ".nii.gz")
_CHUNK = 1 << 20
#: cache file written beside ``dataset.json`` (or under ``~/.cache/partialseg/check/``)
CACHE_NAME = ".partialseg_check_cache.json"
_CACHE_VERSION = 1


def read_gzip_verified(path: str) -> bytes:
    """The decompressed content of a gzip file, every member checked against its trailer.

    nibabel stops reading a ``.nii.gz`` once it has the voxels it needs and never reads the
    8-byte trailer (CRC32 and length of the data), so a corrupted stream (a flipped byte in a
    stored block, a truncated file) loads silently. This streams the file in 1 MiB chunks through
    ``zlib``'s gzip decoder, which compares each member's CRC32 and length with its trailer, and
    requires every member to reach its end.

    Raises:
        ValueError: not gzip, truncated, a CRC or length that does not match; the message names the file.

    Example:
        >>> import gzip, tempfile
        >>> path = tempfile.mkdtemp() + "/x.gz"
        >>> with open(path, "wb") as f:
        ...     _ = f.write(gzip.compress(b"voxels"))
        >>> read_gzip_verified(path)
        b'voxels'
    """
    out: list[bytes] = []
    member = 0
    with open(path, "rb") as f:
        pending = f.read(_CHUNK)
        while pending:
            if pending[:2] != b"\x1f\x8b":
                if member and not pending.strip(b"\x00") and not f.read(1):
                    break  # zero padding after the last member (as the gzip module accepts)
                raise ValueError(f"{path}: is not a gzip stream (member {member} starts with {pending[:2]!r})")
            d = zlib.decompressobj(wbits=31)  # one gzip member; zlib checks its CRC32 and length trailer
            try:
                while True:
                    out.append(d.decompress(pending))
                    if d.eof:
                        break
                    pending = f.read(_CHUNK)
                    if not pending:
                        raise ValueError(f"{path}: truncated gzip stream (member {member} has no end or no CRC/length trailer)")
            except zlib.error as e:
                raise ValueError(f"{path}: corrupted gzip stream in member {member} ({e})") from None
            pending = d.unused_data + f.read(_CHUNK)
            member += 1
    if not member:
        raise ValueError(f"{path}: is an empty file, not a gzip stream")
    return b"".join(out)


def _nifti_from_bytes(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """A decompressed NIfTI-1 or -2 file as ``(array, affine)`` (the header's best affine, voxel
    scaling applied), read with the header class alone: a whole nibabel image costs ~1 ms more."""
    import io

    import nibabel as nib

    sizeof_hdr = {int.from_bytes(data[:4], order) for order in ("little", "big")} if len(data) >= 4 else set()
    header_class = nib.Nifti2Header if 540 in sizeof_hdr else nib.Nifti1Header
    stream = io.BytesIO(data)
    header = header_class.from_fileobj(stream, check=False)
    return np.asanyarray(header.data_from_fileobj(stream)), np.asarray(header.get_best_affine(), dtype=np.float64)


def read_image(path: str, verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Read an image as ``(array, affine)``; spatial axes first, channels (if any) last.

    NIfTI goes through nibabel directly (fast; ``dataobj`` keeps the stored dtype); a ``.nii.gz``
    is decompressed once with its gzip trailer verified (:func:`read_gzip_verified`, unless
    ``verify=False``); every other format goes through MONAI's ``LoadImage``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file cannot be read or its gzip stream is corrupted; the message names it.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: file not found")
    lower = path.lower()
    try:
        if lower.endswith(".nii.gz") and verify:
            return _nifti_from_bytes(read_gzip_verified(path))
        if lower.endswith(_NIFTI):
            import nibabel as nib

            img = nib.load(path)
            return np.asanyarray(img.dataobj), np.asarray(img.affine, dtype=np.float64)
        from monai.transforms import LoadImage

        img = LoadImage(image_only=True)(path)
        return np.asarray(img), np.asarray(img.affine, dtype=np.float64)
    except ValueError as e:  # the gzip check names the file already
        reason = str(e)[len(path) + 2 :] if str(e).startswith(f"{path}: ") else f"ValueError: {e}"
        raise ValueError(f"{path}: cannot be read ({reason})") from None
    except Exception as e:  # noqa: BLE001 - any reader failure becomes one clear message
        raise ValueError(f"{path}: cannot be read ({type(e).__name__}: {e})") from None
def _spacing(affine: np.ndarray) -> tuple[float, ...]:
    return tuple(float(round(s, 4)) for s in np.sqrt((affine[:-1, :-1] ** 2).sum(axis=0)))


@dataclass
class _SourceSummary:
    cases: int = 0
    labelled: int = 0
    annotated: Counter = field(default_factory=Counter)
    values: set = field(default_factory=set)
    spacings: set = field(default_factory=set)
    shapes: set = field(default_factory=set)
    modalities: set = field(default_factory=set)
    supervision: Counter = field(default_factory=Counter)
    weak_types: Counter = field(default_factory=Counter)


@dataclass
class ValidationReport:
    """What :func:`validate_dataset` found.

    Attributes:
        dataset: the dataset checked.
        problems: one line per problem, each naming its case and file.
        summary: split -> source -> counts, annotated classes, label values, spacings, shapes.
        warnings: one line per likely mistake that does not stop training (see
            :func:`dataset_warnings`); they never make the report invalid.
    """

    dataset: PartialDataset
    problems: list[str]
    summary: dict[str, dict[str, dict[str, Any]]]
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def raise_if_invalid(self) -> None:
        """Raise :class:`DatasetError` listing every problem, if there is any."""
        if self.problems:
            raise DatasetError(self.problems, header=f"dataset {self.dataset.name!r} failed validation")

    def format(self) -> str:
        """A human-readable per-split, per-source summary followed by the problems."""
        classes = self.dataset.classes
        lines = [f"dataset {self.dataset.name!r}: {len(classes)} classes {classes}"]
        for split, sources in self.summary.items():
            lines.append(f"\n[{split}]")
            lines.append(f"  {'source':<14}{'cases':>6}{'labelled':>9}  {'modality':<11}{'values':<15}{'spacing (mm)':<18}{'shape':<14}annotated classes (cases)")
            for src, s in sources.items():
                counts = s["annotated"]
                if s["labelled"] and len(counts) == len(classes) and all(n == s["labelled"] for n in counts.values()):
                    ann = f"all ({s['labelled']})"
                else:
                    ann = ", ".join(f"{classes[i]} ({n})" for i, n in sorted(counts.items())) or "-"
                vals = ",".join(str(v) for v in s["label_values"]) or "-"
                sp = "x".join(f"{v:g}" for v in s["spacings"][0]) + (" ..." if len(s["spacings"]) > 1 else "") if s["spacings"] else "-"
                sh = "x".join(str(v) for v in s["shapes"][0]) + (" ..." if len(s["shapes"]) > 1 else "") if s["shapes"] else "-"
                modality = ",".join(s["modalities"]) or "-"
                lines.append(f"  {src:<14}{s['cases']:>6}{s['labelled']:>9}  {modality:<11}{vals:<15}{sp:<18}{sh:<14}{ann}")
            line = supervision_line(sources)
            if line:
                lines.append(f"  {line}")
        if self.warnings:
            lines.append(f"\n{len(self.warnings)} warning(s):")
            lines += [f"  - {w}" for w in self.warnings]
        if self.problems:
            lines.append(f"\n{len(self.problems)} problem(s):")
            lines += [f"  - {p}" for p in self.problems]
        else:
            lines.append("\nno problems found")
        return "\n".join(lines)


def supervision_line(sources: dict[str, dict[str, Any]]) -> str:
    """``"supervision: 20 strong, 400 weak (ellipse 300, missing 60)"`` for a split's summary, or
    ``""`` when no case of it declares ``supervision`` (a plain dataset).

    Example:
        >>> supervision_line({"a": {"supervision": {"strong": 2, "weak": 3}, "weak_types": {"ellipse": 3}, "declared": 5}})
        'supervision: 2 strong, 3 weak (ellipse 3)'
    """
    if not any(s.get("declared") for s in sources.values()):
        return ""
    total: Counter = Counter()
    types: Counter = Counter()
    for s in sources.values():
        total.update(s.get("supervision", {}))
        types.update(s.get("weak_types", {}))
    detail = f" ({', '.join(f'{k} {n}' for k, n in types.most_common())})" if types else ""
    return f"supervision: {total.get('strong', 0)} strong, {total.get('weak', 0)} weak{detail}"


def comparable_affines(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two affines of one grid on the same footing: a 2D image's 3 x 3 affine (NRRD, PNG) against
    a 4 x 4 one (NIfTI keeps 2D slices in 3D space) compares with the latter's in-plane block."""
    if a.shape == b.shape:
        return a, b
    small, large = (a, b) if a.shape[0] < b.shape[0] else (b, a)
    n = small.shape[0] - 1
    keep = [*range(n), large.shape[0] - 1]
    reduced = large[np.ix_(keep, keep)]
    return (small, reduced) if small is a else (reduced, small)


def spatial_shape(shape: Sequence[int], path: str, label_ndim: int | None = None) -> tuple[int, ...]:
    """The spatial shape of an image or label, trailing size-1 dimensions beyond the second dropped.

    NIfTI keeps space in its first three dimensions (channels, time and vectors come after), so a
    2D label against a 3D NIfTI volume is a mismatch, while an ``(H, W, 1)`` slice and an
    ``(H, W)`` one are the same grid. Other formats (PNG: ``(H, W, 3)``) hold channels after the
    label's dimensions (``label_ndim``; None: every dimension counts).
    """
    dims = list(shape[:3] if path.lower().endswith(_NIFTI) else shape[:label_ndim])
    while len(dims) > 2 and dims[-1] == 1:
        dims.pop()
    return tuple(int(d) for d in dims)


def _channels(shape: Sequence[int], path: str, spatial_ndim: int | None) -> int:
    """Channels of an image: NIfTI holds them after its three spatial dimensions; other formats
    after the label's dimensions (``spatial_ndim``; None: unknown, 1)."""
    extra = shape[3:] if path.lower().endswith(_NIFTI) else (shape[spatial_ndim:] if spatial_ndim is not None else ())
    return int(np.prod(extra)) if len(extra) else 1


def _file_hash(path: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def inspect_case(image: str, label: str | None, channels: int | None = 1, content_hash: bool = False) -> dict[str, Any]:
    """What one case's files say, independent of the dataset description (cacheable).

    Returns:
        a JSON-able dict: ``problems`` (lines naming the file, without the case), ``spacing`` of
        the image, ``shape`` and ``values`` (sorted unique integer values) of the label, and the
        files' content hashes when ``content_hash``.
    """
    out: dict[str, Any] = {"problems": [], "spacing": None, "shape": None, "values": None, "hashes": {}}
    problems = out["problems"]
    try:
        img, img_affine = read_image(image)
    except (FileNotFoundError, ValueError) as e:
        problems.append(f"image {e}")
        img = None
    if img is not None:
        out["spacing"] = list(_spacing(img_affine))
        if img.dtype.names is not None or not np.issubdtype(img.dtype, np.number):
            problems.append(f"image {image} has non-numeric dtype {img.dtype} (a scalar image is needed)")
            img = None
        elif not np.isfinite(img).all():
            n = int((~np.isfinite(img)).sum())
            problems.append(f"image {image} has {n} NaN or infinite value(s)")
    if content_hash:
        out["hashes"] = {p: _file_hash(p) for p in (image, label) if p is not None and os.path.isfile(p)}
    if label is None:
        if img is not None and channels is not None and _channels(img.shape, image, None) != channels:
            problems.append(f"image {image} has shape {tuple(img.shape)}: {_channels(img.shape, image, None)} channels, expected {channels}")
        return out
    try:
        lab, lab_affine = read_image(label)
    except (FileNotFoundError, ValueError) as e:
        problems.append(f"label {e}")
        return out
    if lab.dtype.names is not None or not np.issubdtype(lab.dtype, np.number):
        problems.append(f"label {label} has non-scalar dtype {lab.dtype} (e.g. RGB): a label holds one class value per voxel")
        return out
    out["shape"] = [int(v) for v in lab.shape]
    lab_ndim = lab.ndim
    if label.lower().endswith(_NIFTI) and lab.ndim > 3 and int(np.prod(lab.shape[3:])) > 1:
        problems.append(f"label {label} is {lab.ndim}D with shape {tuple(lab.shape)}: a label has one channel")
        return out
    if img is not None:
        if channels is not None and _channels(img.shape, image, lab_ndim) != channels:
            problems.append(
                f"image {image} has shape {tuple(img.shape)}: {_channels(img.shape, image, lab_ndim)} channels, expected {channels}"
                " (the network's in_channels)"
            )
        spatial, lab_spatial = spatial_shape(img.shape, image, lab_ndim), spatial_shape(lab.shape, label, lab_ndim)
        if spatial != lab_spatial:
            problems.append(f"label {label} has shape {tuple(lab.shape)} but image {image} has spatial shape {spatial}")
        else:
            a, b = comparable_affines(img_affine, lab_affine)
            if not np.allclose(a, b, atol=AFFINE_TOL):
                problems.append(f"label {label} and image {image} have different affines (max difference {np.abs(a - b).max():.4g})")
    values = np.unique(np.asarray(lab))
    bad = values[~np.isfinite(values) | (values != np.round(values))] if values.dtype.kind == "f" else values[:0]
    if bad.size:
        problems.append(f"label {label} holds non-integer values {bad[:5].tolist()}")
        return out
    out["values"] = [int(v) for v in values]
    return out


def _inspect_chunk(jobs: Sequence[tuple[str, str | None]], channels: int | None, content_hash: bool) -> list[dict[str, Any]]:
    return [inspect_case(image, label, channels, content_hash) for image, label in jobs]


def _stat_key(path: str | None) -> list | None:
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return [path, None, None]
    return [path, st.st_size, st.st_mtime_ns, st.st_ino]


class _Cache:
    """Per-case findings keyed by the files' real paths, sizes and modification times (and the
    options that change the findings), in one JSON file."""

    def __init__(self, path: Path | None, options: dict[str, Any]) -> None:
        self.path, self.options, self.entries, self.dirty = path, options, {}, False
        if path is not None and path.is_file():
            try:
                stored = json.loads(path.read_text(encoding="utf-8"))
                if stored.get("version") == _CACHE_VERSION and stored.get("options") == options:
                    self.entries = stored.get("cases", {})
            except (OSError, ValueError, AttributeError):
                self.entries = {}  # an unreadable cache is rebuilt

    @staticmethod
    def key(image: str, label: str | None) -> str:
        return json.dumps([_stat_key(image), _stat_key(label)])

    def get(self, key: str) -> dict[str, Any] | None:
        return self.entries.get(key)

    def put(self, key: str, value: dict[str, Any]) -> None:
        self.entries[key], self.dirty = value, True

    def save(self, keep: Iterable[str]) -> None:
        if self.path is None or not self.dirty:
            return
        from partialseg._fileio import atomic_write_text

        keep = set(keep)  # forget cases no longer in the dataset
        cases = {k: v for k, v in self.entries.items() if k in keep}
        try:
            atomic_write_text(self.path, json.dumps({"version": _CACHE_VERSION, "options": self.options, "cases": cases}))
        except OSError:
            pass  # a read-only dataset folder: the check still ran, only the cache is lost


def cache_path(ds: PartialDataset, cache: bool | str | os.PathLike | None) -> Path | None:
    """Where :func:`validate_dataset` keeps its cache: ``cache`` if a path, else beside the
    dataset's ``dataset.json`` when that folder is writable, else under ``~/.cache/partialseg/check/``."""
    if cache is None or cache is False:
        return None
    if cache is not True:
        return Path(cache)
    root = ds.root.resolve() if ds.root is not None else None
    if root is not None and os.access(root, os.W_OK):
        return root / CACHE_NAME
    tag = hashlib.blake2b(str(root).encode(), digest_size=8).hexdigest()
    return Path(os.path.expanduser("~")) / ".cache" / "partialseg" / "check" / f"{tag}.json"


def _label_values(ds: PartialDataset, case: dict[str, Any], values: list[int], where: str, problems: list[str]) -> set:
    label_map = ds.label_maps.get(case["source"])
    if label_map is None:
        unexplained = [v for v in values if not 0 <= v < ds.num_classes]
        if unexplained:
            problems.append(
                f"{where}: label {case['label']} holds value(s) {unexplained} that no class explains "
                f"(classes are 0..{ds.num_classes - 1}: {ds.classes})"
            )
        return set(values)
    unexplained = [v for v in values if v != 0 and v not in label_map]
    if unexplained:
        problems.append(
            f"{where}: label {case['label']} holds value(s) {unexplained} that the label map of source "
            f"{case['source']!r} does not list ({sorted(label_map)})"
        )
    mapped = set()
    for v in values:
        t = label_map.get(v, 0 if v == 0 else None)
        if isinstance(t, tuple):
            mapped.update(t)
        elif t is not None:
            mapped.add(t)
    return mapped


#: a source's annotated class draws a warning when fewer than this share of the cases annotating it hold it
HELD_SHARE = 0.5


def _class_name(ds: PartialDataset, c: int) -> str:
    return f"{ds.classes[c]} (class {c})"


def dataset_warnings(ds: PartialDataset, splits: Sequence[str], found: dict[tuple[str, int], dict[str, Any]]) -> list[str]:
    """Likely mistakes that do not stop training, from the cached per-case label values.

    1. **An annotated class its labels do not hold** (a forgotten ``label_maps`` entry): per
       source, over its labelled cases in ``splits``, a foreground class that fewer than
       :data:`HELD_SHARE` (half) of the cases annotating it hold, after the source's label map.
       One case lacking a class is normal (an apical slice without RV); most or all lacking it
       means the source's values likely mean other classes.
    2. **A class no training case annotates** (background included): no loss learns a
       foreground class nobody annotates; DCL's conditional images need a case annotating each
       class (the ``dcl_cardiac`` bundle refuses the dataset unless ``--missing any``).

    Args:
        ds: the dataset.
        splits: the splits checked.
        found: ``(split, index) -> inspect_case result`` (``values`` are the label's raw values).

    Returns:
        one line per warning, naming the source and classes by name.

    Example:
        >>> ds = load_dataset({"classes": ["background", "liver", "spleen"], "training": [
        ...     {"image": "/a.nii.gz", "label": "/a_l.nii.gz", "annotated": ["spleen"], "source": "spl"}]})
        >>> for w in dataset_warnings(ds, ["training"], {("training", 0): {"values": [0, 1]}}):
        ...     print(w[:97].rstrip())
        source 'spl': 1 case(s) annotate spleen (class 2) but none of their labels holds it; those labels
        no training case annotates background (class 0): the DCL bundle (dcl_cardiac) draws each class's
        no training case annotates liver (class 1): no loss ever sees it as annotated, so the model never
    """
    warnings: list[str] = []
    annotating: dict[str, Counter] = defaultdict(Counter)
    holding: dict[str, Counter] = defaultdict(Counter)
    lacking_values: dict[tuple[str, int], set] = defaultdict(set)
    for split in splits:
        for i, case in enumerate(ds.splits.get(split, [])):
            values = found.get((split, i), {}).get("values")
            if case.get("label") is None or values is None:
                continue
            src = case["source"]
            held = _label_values(ds, case, values, "", [])  # its problems are reported already
            for c in case["annotated"]:
                if c == 0:
                    continue
                annotating[src][c] += 1
                if c in held:
                    holding[src][c] += 1
                else:
                    lacking_values[(src, c)].update(values)
    for src, counts in annotating.items():
        label_map = ds.label_maps.get(src)
        for c, n in sorted(counts.items()):
            k = holding[src][c]
            if k >= HELD_SHARE * n:
                continue
            name = ds.classes[c]
            raw = sorted(lacking_values[(src, c)])
            held_text = "none of their labels holds it" if k == 0 else f"only {k} of their labels hold it"
            line = f"source {src!r}: {n} case(s) annotate {_class_name(ds, c)} but {held_text}; those labels hold values {{{', '.join(map(str, raw))}}}"
            spare = [v for v in raw if v != 0 and (label_map is None or v not in label_map)]
            if label_map is None:
                read_as = [f"{v} is read as {ds.classes[v]}" for v in spare if v < ds.num_classes]
                if read_as:
                    line += f" (without a label map, value {'; '.join(read_as)})"
            if spare or label_map is None:
                value = str(spare[0]) if len(spare) == 1 else "<value>"
                line += f": a label_maps entry such as {json.dumps({src: {value: name}})} is likely missing"
            else:
                line += f": the label map of source {src!r} ({ {v: ds.classes[t] if isinstance(t, int) else [ds.classes[x] for x in t] for v, t in sorted(label_map.items())} }) likely maps the wrong value to {name}"
            if not [v for v in raw if v != 0]:
                line += f" (or these labels are empty: check them, or drop {name!r} from their 'annotated')"
            warnings.append(line)
    if "training" in splits:
        labelled = [case for case in ds.splits.get("training", []) if case.get("label") is not None]
        counted = Counter(c for case in labelled for c in case["annotated"])
        unannotated = [c for c in range(ds.num_classes) if not counted[c]] if labelled else []
        for c in unannotated:
            if c == 0:
                consequence = (
                    "with background the only such class this costs nothing (measured on cardiac2d, dcl_cardiac README: "
                    "it is learned as what the annotated classes are not)" if len(unannotated) == 1 else
                    f"but {len(unannotated)} classes are annotated by no case and the model cannot tell them apart (measured "
                    "on cardiac2d with background and RV unannotated: RV Dice 0.11, a third of the background predicted "
                    "as RV; dcl_cardiac README)"
                )
                warnings.append(
                    f"no training case annotates {_class_name(ds, c)}: the DCL bundle (dcl_cardiac) draws each class's "
                    "conditional image from a case annotating it, so it refuses this dataset unless run with --missing any "
                    f"(then the background's conditional pair carries no label); {consequence}. To annotate background, add "
                    "fully labelled cases (\"annotated\": \"all\") or whole-structure labels. Marginal and exclusion losses "
                    "do not need it."
                )
            else:
                warnings.append(
                    f"no training case annotates {_class_name(ds, c)}: no loss ever sees it as annotated, so the model never "
                    "learns it, and the DCL bundle (dcl_cardiac) refuses the dataset unless run with --missing any (then its "
                    f"conditional image comes from any case and may teach a wrong structure); add cases annotating {ds.classes[c]}, "
                    "or drop it from 'classes'."
                )
    return warnings


def _leaks(ds: PartialDataset, splits: Sequence[str], found: dict[tuple[str, int], dict[str, Any]], content_hash: bool) -> list[str]:
    """Images listed twice or shared between splits, by resolved real path and (optionally) content."""
    problems: list[str] = []
    by_path: dict[str, tuple[str, str, str]] = {}
    by_hash: dict[str, tuple[str, str, str]] = {}
    folders: dict[str, str] = {}  # folder as written -> its real path: one lstat per file, not per component

    def declared(first_split: str, split: str) -> bool:  # validation_reuses_training: on purpose
        return ds.validation_reuses_training and {first_split, split} == {"training", "validation"}

    for split in splits:
        for i, case in enumerate(ds.splits.get(split, [])):
            real = real_path(case["image"], folders)
            first = by_path.setdefault(real, (split, case["case"], case["image"]))
            if (first[1:] != (case["case"], case["image"]) or first[0] != split) and not declared(first[0], split):
                kind = "listed twice" if first[0] == split else f"a {first[0]}/{split} leak"
                problems.append(
                    f"case {case['case']!r} ({split}): image {case['image']} is the file of case {first[1]!r} ({first[0]}: "
                    f"{first[2]}), resolved to {real}: {kind}"
                )
                continue
            digest = found.get((split, i), {}).get("hashes", {}).get(case["image"]) if content_hash else None
            if digest is not None:
                first = by_hash.setdefault(digest, (split, case["case"], case["image"]))
                if first[1:] != (case["case"], case["image"]) and not declared(first[0], split):
                    kind = "a duplicate" if first[0] == split else f"a {first[0]}/{split} leak"
                    problems.append(
                        f"case {case['case']!r} ({split}): image {case['image']} has the same content as case {first[1]!r} "
                        f"({first[0]}: {first[2]}): {kind}"
                    )
    return problems


def _hybrid_problems(ds: PartialDataset, splits: Sequence[str]) -> list[str]:
    """A training split with weak masks needs a strong one: the indicators follow the strong gradient."""
    if "training" not in splits:
        return []
    train = [c for c in ds.splits.get("training", []) if c.get("label") is not None]
    weak = [c["case"] for c in train if supervision_of(c) == "weak"]
    if not weak or len(weak) < len(train):
        return []
    where = ds.root / "dataset.json" if ds.root is not None else repr(ds.name)
    return [
        f"dataset {where}: all {len(weak)} labelled training cases are weak ({weak[:3]}{' ...' if len(weak) > 3 else ''}) "
        "and none strong; hybrid supervision needs at least one strong mask (mark the carefully drawn ones "
        "\"supervision\": \"strong\", or drop the key: a case without it is strong)"
    ]


def validate_dataset(
    dataset: PartialDataset | str | os.PathLike,
    splits: Sequence[str] | None = None,
    progress: bool = False,
    channels: int | None = 1,
    content_hash: bool = False,
    workers: int = 1,
    cache: bool | str | os.PathLike | None = None,
) -> ValidationReport:
    """Check every case of a dataset against its files.

    Finds: missing, unreadable or corrupted images and labels (a ``.nii.gz`` is checked to its
    gzip trailer), non-finite or non-scalar images, non-scalar (RGB) and multi-channel labels,
    images whose channel count is not ``channels``, label and image grids that differ (spatial
    shape, or affine beyond 1e-3), label values that no class or label map explains, an image
    listed twice or in two splits (compared by resolved real path, so ``a/../a/x.nii.gz`` and
    symlinks count; by content too with ``content_hash``), and an empty training list or requested
    split. Description-level problems (an ``annotated`` class that is not in ``classes``) are
    already caught by :func:`partialseg.data.load_dataset`.

    Args:
        dataset: a loaded dataset, or a folder / ``dataset.json`` path.
        splits: which splits to check (None: training, and validation / test where present); a
            split named here must hold cases.
        progress: show a progress bar (on stderr).
        channels: the channels every image must have (the network's ``in_channels``; None: any).
        content_hash: also compare the images' contents (BLAKE2 of the files) across cases.
        workers: processes reading the files (1: in this process).
        cache: a cache file of per-case findings (True: beside ``dataset.json`` or under
            ``~/.cache/partialseg/check/``; None / False: no cache).

    Returns:
        a :class:`ValidationReport`; call ``raise_if_invalid()`` to turn problems into an error.
        Its ``warnings`` (:func:`dataset_warnings`: an annotated class a source's labels do not
        hold, a class no training case annotates) never make it invalid.

    Example:
        >>> report = validate_dataset({"classes": ["background", "a"], "training": []})
        >>> report.problems
        ["split 'training' has no cases"]
    """
    ds = dataset if isinstance(dataset, PartialDataset) else load_dataset(dataset)
    if splits is None:
        splits = ["training"] + [s for s in SPLITS[1:] if ds.splits.get(s)]
    splits = [check_option(s, SPLITS, "split") for s in splits]
    channels = None if channels is None else check_int(channels, "channels", minimum=1)
    workers = check_int(workers, "workers", minimum=1)
    problems: list[str] = [f"split {s!r} has no cases" for s in splits if not ds.splits.get(s)]
    todo = [(split, i, case) for split in splits for i, case in enumerate(ds.splits.get(split, []))]
    store = _Cache(cache_path(ds, cache), {"channels": channels, "content_hash": bool(content_hash), "verify_gzip": True})
    keys = [store.key(case["image"], case.get("label")) for _, _, case in todo]
    found: dict[tuple[str, int], dict[str, Any]] = {}
    missing = []
    for (split, i, case), key in zip(todo, keys):
        hit = store.get(key)
        if hit is not None:
            found[(split, i)] = hit
        else:
            missing.append((split, i, case, key))
    bar = None
    if progress and missing:
        from tqdm import tqdm

        bar = tqdm(total=len(missing), desc="checking cases", unit="case")
    jobs = [(case["image"], case.get("label")) for _, _, case, _ in missing]
    results: list[dict[str, Any]] = []
    if workers == 1 or len(jobs) < 2 * workers:
        for job in jobs:
            results.append(inspect_case(*job, channels, content_hash))
            if bar is not None:
                bar.update(1)
    else:
        from concurrent.futures import ProcessPoolExecutor

        size = max(1, min(256, len(jobs) // (workers * 8)))
        chunks = [jobs[k : k + size] for k in range(0, len(jobs), size)]
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for part in pool.map(_inspect_chunk, chunks, [channels] * len(chunks), [content_hash] * len(chunks)):
                results.extend(part)
                if bar is not None:
                    bar.update(len(part))
    if bar is not None:
        bar.close()
    for (split, i, _, key), result in zip(missing, results):
        found[(split, i)] = result
        store.put(key, result)
    store.save(keys)

    summary: dict[str, dict[str, dict[str, Any]]] = {}
    declared: dict[str, int] = {}
    for split in splits:
        cases = ds.splits.get(split, [])
        if not cases:
            continue
        per_source: dict[str, _SourceSummary] = defaultdict(_SourceSummary)
        for i, case in enumerate(cases):
            s, result = per_source[case["source"]], found[(split, i)]
            weak = supervision_of(case) == "weak"
            where = f"case {case['case']!r} ({split}, source {case['source']!r}{', weak mask' if weak else ''})"
            s.cases += 1
            if case.get("label") is not None:
                s.supervision[supervision_of(case)] += 1
                if weak:
                    s.weak_types[str(case.get("weak_type") or "unspecified")] += 1
            if "supervision" in case:
                declared[split] = declared.get(split, 0) + 1
            if case.get("label_true") is not None and not os.path.isfile(case["label_true"]):
                problems.append(f"{where}: label_true {case['label_true']}: file not found")
            if case.get("modality"):
                s.modalities.add(case["modality"])
            if result["spacing"] is not None:
                s.spacings.add(tuple(result["spacing"]))
            problems.extend(f"{where}: {p}" for p in result["problems"])
            if case.get("label") is None:
                continue
            s.labelled += 1
            s.annotated.update(case["annotated"])
            if result["shape"] is not None:
                s.shapes.add(tuple(result["shape"]))
            if result["values"] is not None:
                s.values.update(_label_values(ds, case, result["values"], where, problems))
        summary[split] = {
            src: {
                "cases": s.cases,
                "labelled": s.labelled,
                "annotated": dict(s.annotated),
                "label_values": sorted(s.values),
                "spacings": sorted(s.spacings),
                "shapes": sorted(s.shapes),
                "modalities": sorted(s.modalities),
                "supervision": dict(s.supervision),
                "weak_types": dict(s.weak_types),
                "declared": declared.get(split, 0),
            }
            for src, s in per_source.items()
        }
    problems.extend(_hybrid_problems(ds, splits))
    problems.extend(_leaks(ds, splits, found, content_hash))
    return ValidationReport(dataset=ds, problems=problems, summary=summary, warnings=dataset_warnings(ds, splits, found))
