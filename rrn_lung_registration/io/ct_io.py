"""Reading and writing lung CT volumes: DICOM series, NIfTI, MHA/MHD, NRRD and DIR-Lab raw ``.img`` files.

Every volume comes back as MONAI's ``LoadImage`` would give it with ``ITKReader``: a ``MetaTensor`` of
shape ``(I, J, K)`` in ITK index order (``I`` runs fastest in the file, i.e. x / columns, then ``J`` =
rows, then ``K`` = slices), no channel dimension, its affine mapping a voxel index ``(i, j, k)`` to
**RAS** millimetres (see :mod:`rrn_lung_registration.io.landmarks` for the package's conventions). The
metadata also holds the ITK geometry, in the ITK / DICOM **LPS** world frame:

* ``spacing``: ``(3,)`` mm per voxel along ``I, J, K``;
* ``origin``: ``(3,)`` LPS mm of voxel ``(0, 0, 0)``;
* ``direction``: ``(3, 3)`` direction cosines, column ``c`` = LPS direction of axis ``c``;
* ``filename_or_obj``: the file or folder read.

so that ``affine = diag(-1, -1, 1, 1) @ [[direction @ diag(spacing), origin], [0, 0, 0, 1]]``.

DIR-Lab files
-------------
The DIR-Lab 4D-CT (``case1`` .. ``case10``) and COPDGene (``copd1`` .. ``copd10``) volumes are headerless
``.img`` dumps of little-endian int16 voxels, x fastest, then y, then z. :class:`DirLabReader` knows their
published dimensions and spacings (:data:`DIRLAB_GEOMETRY`), finds the case in the file name and plugs into
``LoadImage`` / ``LoadImaged(keys, reader=DirLabReader(...))``; in a bundle config ``"reader":
"rrn_lung_registration.io.ct_io.DirLabReader"`` or, with options, ``"reader": {"_target_":
"rrn_lung_registration.io.ct_io.DirLabReader", "intensity_offset": 0}`` (not options given to ``LoadImaged``
itself: MONAI hands those to every reader). Files it cannot read (other formats, names without a case) fall
through to MONAI's own readers, so one datalist can mix DIR-Lab and NIfTI / DICOM images.

* **Geometry.** The files store no position or orientation, so a volume gets origin ``(0, 0, 0)`` and the
  identity direction (LPS), unless ``origin`` / ``direction`` are given. Array index ``(i, j, k)`` is the
  file's column / row / slice, and DIR-Lab landmark ``(x, y, z)`` (1-based) is voxel ``(x-1, y-1, z-1)``:
  landmarks and images stay consistent whatever the anatomy, so TRE is unaffected. Whether slice 0 is
  the head or the feet is not recorded by the files (several public converters flip the slice axis for
  display); passing ``direction=np.diag([1, 1, -1])`` would express such a flip in the affine without
  touching the voxels, and landmark conversion through the affine follows it.
* **Intensities.** The files store ``HU + 1024`` (air reads about ``+24`` raw; the COPDGene files
  reportedly mark voxels outside the reconstruction field with about ``-2000`` raw, ``-3024`` after the
  shift). Public DIR-Lab preprocessing pipelines subtract 1024 to get Hounsfield units, for the 4D-CT and
  the COPDGene files alike; :class:`DirLabReader` does the same by default (``intensity_offset=-1024``:
  ``value = raw + intensity_offset``); ``intensity_offset=0`` keeps the stored values. The images are not
  part of the shared test data, so check once on yours that air peaks near -1000 HU.

Displacement fields
-------------------
:func:`write_displacement_field` / :func:`read_displacement_field` handle ITK displacement-field images: a
3-component vector per voxel, the displacement ``d(p)`` in LPS mm of the transform ``p -> p + d(p)`` from
the field's (fixed) space to the moving space; ITK's ``DisplacementFieldTransform``, elastix / transformix
and 3D Slicer read them as such. In memory the field is ``(I, J, K, 3)`` (component = LPS axis) with the
grid's voxel -> RAS affine.

Damaged files
-------------
A NIfTI, MetaImage or NRRD file is checked against its own header before ITK reads it
(:func:`~rrn_lung_registration.io.integrity.verify_image_file`): a cut or corrupt file is refused as
``"<file>: truncated or corrupt (...)"`` instead of coming back zero-filled.

Writing
-------
:func:`write_image` writes NIfTI (``.nii``, ``.nii.gz``), MHA (``.mha``) or NRRD (``.nrrd``) from the
tensor's affine, atomically (a temporary file renamed over the target): NIfTI through
:mod:`~rrn_lung_registration.io.nifti` (ITK's header, gzip level 1), the others through ITK. NIfTI keeps
the geometry to float32 precision (its header stores float32).
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.data import ImageReader, ITKReader, MetaTensor
from monai.data.utils import is_no_channel, orientation_ras_lps

from rrn_lung_registration.io.integrity import verify_image_file
from rrn_lung_registration.io.nifti import NIFTI_SUFFIXES, write_nifti
from shared_ops.atomic import atomic_write

__all__ = [
    "DIRLAB_GEOMETRY",
    "DIRLAB_HU_OFFSET",
    "DirLabGeometry",
    "DirLabReader",
    "dirlab_affine",
    "dirlab_geometry",
    "read_ct",
    "read_displacement_field",
    "write_displacement_field",
    "write_image",
]

DIRLAB_HU_OFFSET = -1024
"""Added to DIR-Lab raw values to get Hounsfield units (the files store ``HU + 1024``)."""

WRITE_SUFFIXES = (".nii", ".nii.gz", ".mha", ".nrrd")


@dataclass(frozen=True)
class DirLabGeometry:
    """Published geometry of one DIR-Lab volume: ``shape`` ``(X, Y, Z)`` voxels, ``spacing`` mm."""

    case: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]


def _table() -> dict[str, DirLabGeometry]:
    slice_mm = 2.5
    dirlab_4dct = {  # case: (X, Y, Z, in-plane spacing mm)
        1: (256, 256, 94, 0.97),
        2: (256, 256, 112, 1.16),
        3: (256, 256, 104, 1.15),
        4: (256, 256, 99, 1.13),
        5: (256, 256, 106, 1.10),
        6: (512, 512, 128, 0.97),
        7: (512, 512, 136, 0.97),
        8: (512, 512, 128, 0.97),
        9: (512, 512, 128, 0.97),
        10: (512, 512, 120, 0.97),
    }
    copdgene = {
        1: (512, 512, 121, 0.625),
        2: (512, 512, 102, 0.645),
        3: (512, 512, 126, 0.652),
        4: (512, 512, 126, 0.590),
        5: (512, 512, 131, 0.647),
        6: (512, 512, 119, 0.633),
        7: (512, 512, 112, 0.625),
        8: (512, 512, 115, 0.586),
        9: (512, 512, 116, 0.664),
        10: (512, 512, 135, 0.742),
    }
    table = {}
    for prefix, cases in (("case", dirlab_4dct), ("copd", copdgene)):
        for number, (x, y, z, mm) in cases.items():
            name = f"{prefix}{number}"
            table[name] = DirLabGeometry(name, (x, y, z), (mm, mm, slice_mm))
    return table


DIRLAB_GEOMETRY: dict[str, DirLabGeometry] = _table()
"""DIR-Lab 4D-CT ``case1``..``case10`` and COPDGene ``copd1``..``copd10`` dimensions and spacings."""

_CASE_PATTERN = re.compile(r"(?<![a-z])(case|copd)[_\-]?0*(\d+)", re.IGNORECASE)


def _case_in(text: str) -> str | None:
    match = _CASE_PATTERN.search(text)
    return f"{match.group(1).lower()}{int(match.group(2))}" if match else None


def dirlab_geometry(case_or_path: str | os.PathLike) -> DirLabGeometry:
    """The published geometry of a DIR-Lab case, named (``"case1"``, ``"COPD3"``) or found in a path.

    The case is searched (case-insensitively, ``case<N>`` / ``copd<N>``) in the file name first, then in
    the names of its parent folders, nearest first (``Case3Pack/Images/T00.img`` is ``case3``).

    Raises:
        ValueError: no known case in the name (the message names it and lists the known cases).
    """
    path = Path(case_or_path)
    for part in (path.name, *(parent.name for parent in path.parents)):
        case = _case_in(part)
        if case is not None:
            if case not in DIRLAB_GEOMETRY:
                raise ValueError(
                    f"{case_or_path}: DIR-Lab case {case!r} is unknown; known cases are case1-10 (4D-CT) and "
                    "copd1-10 (COPDGene). Pass shape= and spacing= to DirLabReader for other files."
                )
            return DIRLAB_GEOMETRY[case]
    raise ValueError(
        f"{case_or_path}: cannot tell the DIR-Lab case from the name (expected 'case<N>' or 'copd<N>'); "
        "pass case=, or shape= and spacing=, to DirLabReader."
    )


def _lps_affine(spacing, origin, direction) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(direction, dtype=np.float64) @ np.diag(np.asarray(spacing, dtype=np.float64))
    affine[:3, 3] = np.asarray(origin, dtype=np.float64)
    return affine


def dirlab_affine(case_or_path: str | os.PathLike) -> np.ndarray:
    """Voxel-to-RAS affine ``(4, 4)`` that :class:`DirLabReader` gives a case (identity direction, origin 0).

    Enough to convert DIR-Lab landmarks to millimetres without the image.
    """
    geometry = dirlab_geometry(case_or_path)
    return orientation_ras_lps(_lps_affine(geometry.spacing, (0.0, 0.0, 0.0), np.eye(3)))


@dataclass
class DirLabVolume:
    """What :meth:`DirLabReader.read` returns: the voxels ``(X, Y, Z)`` (raw int16) and their geometry."""

    filename: str
    case: str | None
    raw: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray


class DirLabReader(ImageReader):
    """MONAI image reader for DIR-Lab headerless int16 ``.img`` volumes.

    Output follows ``ITKReader``: array ``(X, Y, Z)`` (ITK index order), metadata with ``spacing``,
    ``origin``, ``direction`` (LPS), ``original_affine`` / ``affine`` (voxel -> RAS mm), ``space``
    (``RAS``), ``spatial_shape`` and ``original_channel_dim`` (no channel); ``LoadImage`` adds
    ``filename_or_obj``. Several files given together are stacked on a new first (channel) axis.

    Args:
        case: the DIR-Lab case (``"case1"`` .. ``"case10"``, ``"copd1"`` .. ``"copd10"``); default: found in
            each file's path (see :func:`dirlab_geometry`).
        shape: ``(X, Y, Z)`` voxels, overriding the table (then ``spacing`` is needed too unless the case is
            known).
        spacing: ``(sx, sy, sz)`` mm, overriding the table.
        intensity_offset: added to the stored values; the default ``-1024`` gives Hounsfield units (the
            files store ``HU + 1024``), ``0`` keeps the stored values.
        origin: LPS mm of voxel ``(0, 0, 0)`` (default ``(0, 0, 0)``: the files carry none).
        direction: ``(3, 3)`` LPS direction cosines (default: identity; see the module notes on slice order).

    Raises (from ``read``):
        ValueError: a suffix other than ``.img`` / ``.raw``, an unknown case, or a file whose size is not
            ``X * Y * Z * 2`` bytes (the message names the file, the expected geometry and the size found).
    """

    def __init__(
        self,
        case: str | None = None,
        shape: Sequence[int] | None = None,
        spacing: Sequence[float] | None = None,
        intensity_offset: float = DIRLAB_HU_OFFSET,
        origin: Sequence[float] = (0.0, 0.0, 0.0),
        direction: Sequence[Sequence[float]] | np.ndarray | None = None,
    ) -> None:
        super().__init__()
        if case is not None:
            case = dirlab_geometry(case).case
        if shape is not None and (len(shape) != 3 or min(int(s) for s in shape) < 1):
            raise ValueError(f"shape must be three positive sizes (X, Y, Z), got {shape}.")
        if spacing is not None and (len(spacing) != 3 or min(float(s) for s in spacing) <= 0):
            raise ValueError(f"spacing must be three positive millimetre values, got {spacing}.")
        if shape is not None and spacing is None and case is None:
            raise ValueError("shape= without spacing= needs case= to take the spacing from the DIR-Lab table.")
        self.case = case
        self.shape = None if shape is None else tuple(int(s) for s in shape)
        self.spacing = None if spacing is None else tuple(float(s) for s in spacing)
        self.intensity_offset = float(intensity_offset)
        self.origin = tuple(float(v) for v in origin)
        self.direction = np.eye(3) if direction is None else np.asarray(direction, dtype=np.float64)
        if len(self.origin) != 3 or self.direction.shape != (3, 3):
            raise ValueError(f"origin must be (3,) and direction (3, 3), got {origin} and {self.direction.shape}.")

    def verify_suffix(self, filename: Sequence[os.PathLike] | os.PathLike) -> bool:
        """``True`` for ``.img`` files without an Analyze ``.hdr`` beside them."""
        names = [filename] if isinstance(filename, (str, os.PathLike)) else list(filename)
        return bool(names) and all(_is_headerless_img(Path(name)) for name in names)

    def _geometry(self, path: Path) -> tuple[str | None, tuple[int, int, int], tuple[float, float, float]]:
        if self.shape is not None and self.spacing is not None:
            return self.case, self.shape, self.spacing
        table = DIRLAB_GEOMETRY[self.case] if self.case is not None else dirlab_geometry(path)
        return table.case, self.shape or table.shape, self.spacing or table.spacing

    def read(self, data: Sequence[os.PathLike] | os.PathLike, **kwargs) -> DirLabVolume | list[DirLabVolume]:
        """Read one file (or several): each becomes a :class:`DirLabVolume` with its raw voxels."""
        names = [data] if isinstance(data, (str, os.PathLike)) else list(data)
        volumes = []
        for name in names:
            path = Path(name)
            if not path.is_file():
                raise FileNotFoundError(f"{path}: DIR-Lab image not found.")
            if path.suffix.lower() not in (".img", ".raw"):
                raise ValueError(f"{path}: not a DIR-Lab .img (or headerless .raw) file.")
            case, shape, spacing = self._geometry(path)
            expected = int(np.prod(shape)) * 2
            size = path.stat().st_size
            if size != expected:
                what = f"DIR-Lab {case}" if case else "the given geometry"
                raise ValueError(
                    f"{path}: {size} bytes, but {what} is {shape[0]}x{shape[1]}x{shape[2]} int16 voxels = "
                    f"{expected} bytes; is it the right case (or pass case=/shape=/spacing=)?"
                )
            raw = np.fromfile(path, dtype="<i2").reshape(shape[::-1]).transpose(2, 1, 0)
            volumes.append(DirLabVolume(str(path), case, raw, spacing, self.origin, self.direction.copy()))
        return volumes[0] if len(volumes) == 1 else volumes

    def _values(self, raw: np.ndarray) -> np.ndarray:
        offset = self.intensity_offset
        if offset == 0:
            return raw.astype(np.int16)
        if float(offset).is_integer():
            shifted = raw.astype(np.int32) + int(offset)
            info = np.iinfo(np.int16)
            if shifted.min() >= info.min and shifted.max() <= info.max:
                return shifted.astype(np.int16)
            return shifted
        return raw.astype(np.float32) + np.float32(offset)

    def get_data(self, img: DirLabVolume | Sequence[DirLabVolume]) -> tuple[np.ndarray, dict]:
        """Array ``(X, Y, Z)`` (or ``(N, X, Y, Z)`` for several files) and ``ITKReader``-style metadata."""
        volumes = [img] if isinstance(img, DirLabVolume) else list(img)
        arrays, meta = [], None
        for volume in volumes:
            lps = _lps_affine(volume.spacing, volume.origin, volume.direction)
            header = {
                "spacing": np.asarray(volume.spacing, dtype=np.float64),
                "origin": np.asarray(volume.origin, dtype=np.float64),
                "direction": np.asarray(volume.direction, dtype=np.float64),
                "dirlab_case": volume.case or "",
                "intensity_offset": self.intensity_offset,
                "original_affine": orientation_ras_lps(lps),
                "space": "RAS",
                "spatial_shape": np.asarray(volume.raw.shape),
                "original_channel_dim": float("nan"),
            }
            header["affine"] = header["original_affine"].copy()
            if meta is None:
                meta = header
            elif not np.allclose(meta["affine"], header["affine"]) or not np.array_equal(
                meta["spatial_shape"], header["spatial_shape"]
            ):
                raise ValueError(f"{volume.filename}: cannot stack DIR-Lab volumes of different geometry as channels.")
            arrays.append(self._values(volume.raw))
        if len(arrays) == 1:
            return arrays[0], meta
        meta["original_channel_dim"] = 0
        return np.stack(arrays, axis=0), meta


def _is_headerless_img(path: Path) -> bool:
    if path.suffix.lower() != ".img":
        return False
    return not (path.with_suffix(".hdr").exists() or path.with_suffix(".HDR").exists())


def _is_dicom_file(path: Path) -> bool:
    if path.suffix.lower() in (".dcm", ".dicom", ".ima"):
        return True
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def _read_dicom_series(folder: Path, series_uid: str | None = None, member: Path | None = None):
    """ITK image of the DICOM series in ``folder`` with the most slices (or ``series_uid`` / ``member``'s)."""
    import itk

    if not any(entry.is_file() for entry in folder.iterdir()):
        raise FileNotFoundError(f"{folder}: no DICOM series found (the folder holds no files).")
    names = itk.GDCMSeriesFileNames.New()
    names.SetUseSeriesDetails(True)
    names.SetGlobalWarningDisplay(False)
    names.SetDirectory(str(folder))
    uids = list(names.GetSeriesUIDs())
    if not uids:
        raise FileNotFoundError(f"{folder}: no DICOM series found in this folder.")
    files = {uid: list(names.GetFileNames(uid)) for uid in uids}
    if series_uid is not None:
        chosen = [uid for uid in uids if uid == series_uid or uid.startswith(f"{series_uid}.")]
        if not chosen:
            raise ValueError(f"{folder}: no DICOM series {series_uid!r}; the folder has {uids}.")
        uid = chosen[0]
    elif member is not None:
        uid = next((u for u in uids if any(Path(f).resolve() == member.resolve() for f in files[u])), None)
        if uid is None:
            raise ValueError(f"{member}: GDCM does not list this file in any DICOM series of {folder}.")
    else:
        uid = max(uids, key=lambda u: len(files[u]))  # first of the largest on ties
        if len(uids) > 1:
            counts = ", ".join(f"{u} ({len(files[u])} slices)" for u in uids)
            warnings.warn(f"{folder}: {len(uids)} DICOM series ({counts}); reading {uid}.", stacklevel=3)
    chosen_files = files[uid]
    image = itk.imread(chosen_files if len(chosen_files) > 1 else chosen_files[0])
    if len(chosen_files) > 1:
        _set_slice_geometry(image, chosen_files)
    return image, uid, len(chosen_files)


def _slice_position(path: str) -> np.ndarray:
    """ImagePositionPatient (LPS mm) of one DICOM file, read from its header only."""
    import itk

    io = itk.GDCMImageIO.New()
    io.SetFileName(path)
    io.ReadImageInformation()
    return np.array([io.GetOrigin(axis) for axis in range(3)], dtype=np.float64)


def _set_slice_geometry(image, files: Sequence[str]) -> None:
    """Make the slice axis of a series read by ITK follow the files' own slice positions.

    ITK stacks the files in the order GDCM sorted them and takes the origin from the first, but builds
    the slice direction from the orientation and spacing tags; a negative SpacingBetweenSlices (POPI's
    4D-CT has -2.0) turns that direction around, putting every slice on the wrong side of the first. The
    vector from the first to the last slice position is the truth: slice ``k`` lies at ``first + k (last -
    first) / (n - 1)``.
    """
    import itk

    first, last = _slice_position(files[0]), _slice_position(files[-1])
    step = (last - first) / (len(files) - 1)
    spacing_k = float(np.linalg.norm(step))
    if spacing_k == 0:
        return
    direction = np.array(itk.array_from_matrix(image.GetDirection()), dtype=np.float64)
    direction[:, 2] = step / spacing_k
    spacing = list(image.GetSpacing())
    spacing[2] = spacing_k
    image.SetDirection(itk.matrix_from_array(np.ascontiguousarray(direction)))
    image.SetSpacing(spacing)
    image.SetOrigin([float(v) for v in first])


def _geometry_from_affine(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(spacing, origin, direction)`` in LPS from a voxel-to-RAS affine ``(4, 4)``."""
    lps = orientation_ras_lps(np.asarray(affine, dtype=np.float64))
    linear = lps[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    if np.any(spacing <= 0):
        raise ValueError(f"the affine has a zero-length axis: {affine.tolist()}.")
    return spacing, lps[:3, 3].copy(), linear / spacing


def _to_metatensor(array: np.ndarray, meta: dict, source: str) -> MetaTensor:
    if array.ndim != 3 or not is_no_channel(meta.get("original_channel_dim")):
        raise ValueError(f"{source}: expected a 3-D volume, got an image of shape {tuple(array.shape)}.")
    if array.dtype == np.uint16:
        array = array.astype(np.int32)  # torch has little support for unsigned 16/32-bit tensors
    elif array.dtype == np.uint32:
        array = array.astype(np.int64)
    elif array.dtype.byteorder not in ("=", "|"):
        array = array.astype(array.dtype.newbyteorder("="))
    affine = np.asarray(meta["affine"], dtype=np.float64)
    spacing, origin, direction = _geometry_from_affine(affine)
    meta = {key: value for key, value in meta.items() if key != "affine"}
    meta.setdefault("spacing", spacing)
    meta.setdefault("origin", origin)
    meta.setdefault("direction", direction)
    meta["original_affine"] = np.asarray(meta.get("original_affine", affine), dtype=np.float64)
    meta["spatial_shape"] = np.asarray(array.shape)
    meta["space"] = "RAS"
    meta["original_channel_dim"] = float("nan")
    meta["filename_or_obj"] = source
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return MetaTensor(tensor, affine=torch.as_tensor(affine, dtype=torch.float64), meta=meta)


def _itk_to_metatensor(image, source: str, extra: dict | None = None) -> MetaTensor:
    import itk

    dimension = image.GetImageDimension()
    if dimension != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        size = tuple(int(s) for s in itk.size(image))
        components = image.GetNumberOfComponentsPerPixel()
        detail = f" with {components} components per voxel" if components != 1 else ""
        raise ValueError(f"{source}: expected a 3-D volume, got a {dimension}-D image of size {size}{detail}.")
    array, meta = ITKReader(affine_lps_to_ras=True).get_data(image)
    meta["spacing"] = np.asarray(image.GetSpacing(), dtype=np.float64)
    meta["origin"] = np.asarray(image.GetOrigin(), dtype=np.float64)
    meta["direction"] = np.asarray(itk.array_from_matrix(image.GetDirection()), dtype=np.float64)
    meta.update(extra or {})
    return _to_metatensor(array, meta, source)


def read_ct(path: str | os.PathLike, reader: ImageReader | None = None, series_uid: str | None = None) -> MetaTensor:
    """Read a CT volume: ``MetaTensor (I, J, K)`` in ITK index order, affine voxel -> RAS mm.

    The physical geometry (origin, spacing, direction) is kept as the file states it; see the module
    notes for the metadata keys. Voxel values keep the file's type (DICOM rescale slope / intercept
    applied, so CT comes out in HU); unsigned 16 / 32-bit volumes become int32 / int64.

    Args:
        path: one of

            * a folder of DICOM files: the series with the most slices is read (a warning lists the others;
              ``series_uid`` picks one), through ITK's GDCM series reader;
            * one DICOM file (``.dcm``, or any file with the DICM preamble): the series it belongs to;
            * NIfTI (``.nii``, ``.nii.gz``), MHA / MHD, NRRD, Analyze (``.hdr`` / ``.img`` pair), or any other
              format ITK reads;
            * a DIR-Lab ``.img`` (no ``.hdr`` beside it), through :class:`DirLabReader` (HU; case from the
              name).
        reader: a MONAI ``ImageReader`` to use instead (for example ``DirLabReader(case="copd2")`` for a
            renamed DIR-Lab file); it must give one 3-D volume without a channel.
        series_uid: the DICOM series to read: its SeriesInstanceUID, or the GDCM series identifier (the UID
            followed by ``.``-separated series details, as ``meta["series_uid"]`` shows it).

    Raises:
        FileNotFoundError: ``path`` does not exist, or a folder holds no DICOM series (naming the folder).
        ValueError: not a single 3-D volume ("expected a 3-D volume", naming the file), an unreadable
            DIR-Lab file, or a NIfTI / MetaImage / NRRD file holding fewer voxel bytes than its header announces
            or a damaged compressed stream ("<file>: truncated or corrupt (...)", see
            :mod:`rrn_lung_registration.io.integrity`; ITK itself would fill a cut NIfTI file with zeros).

    For the files :mod:`~rrn_lung_registration.io.integrity` checks, ``meta["nonfinite_voxels"]`` counts the NaN /
    infinite values stored in the file (ITK's NIfTI reader reads them as 0; a warning says so).
    """
    path = Path(os.path.expanduser(str(path)))
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder.")
    source = str(path)
    nonfinite = verify_image_file(path) if path.is_file() else None
    if reader is not None:
        array, meta = reader.get_data(reader.read(source))
        return _with_file_check(_to_metatensor(np.asarray(array), dict(meta), source), nonfinite)
    if path.is_dir():
        image, uid, count = _read_dicom_series(path, series_uid=series_uid)
        return _itk_to_metatensor(image, source, {"series_uid": uid, "number_of_files": count})
    if _is_headerless_img(path):
        dirlab = DirLabReader()
        array, meta = dirlab.get_data(dirlab.read(source))
        return _to_metatensor(array, meta, source)
    if _is_dicom_file(path):
        image, uid, count = _read_dicom_series(path.parent, series_uid=series_uid, member=path)
        return _itk_to_metatensor(image, source, {"series_uid": uid, "number_of_files": count})
    import itk

    try:
        image = itk.imread(source)
    except (RuntimeError, KeyError) as error:
        raise ValueError(f"{path}: ITK cannot read this file ({str(error).strip().splitlines()[-1]}).") from None
    return _with_file_check(_itk_to_metatensor(image, source), nonfinite)


def _with_file_check(image: MetaTensor, nonfinite: int | None) -> MetaTensor:
    """Record the file's count of non-finite stored values (``meta["nonfinite_voxels"]``); warn when the
    reader replaced them (ITK's NIfTI reader reads NaN / inf as 0)."""
    if nonfinite is None:
        return image
    image.meta["nonfinite_voxels"] = nonfinite
    if nonfinite and image.is_floating_point():
        kept = int((~torch.isfinite(image.as_tensor())).sum())
        if kept < nonfinite:
            warnings.warn(
                f"{image.meta['filename_or_obj']}: {nonfinite} NaN or infinite voxels in the file were read as "
                "finite values (ITK's NIfTI reader makes them 0).",
                stacklevel=3,
            )
    return image


def _itk_array(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.bool_:
        return array.astype(np.uint8)
    if array.dtype == np.int8:
        return array.astype(np.int16)
    if array.dtype == np.float16:
        return array.astype(np.float32)
    if array.dtype == np.int64:
        info = np.iinfo(np.int32)
        if array.size and (array.min() < info.min or array.max() > info.max):
            return array.astype(np.float64)
        return array.astype(np.int32)
    if array.dtype == np.uint64:
        return array.astype(np.float64)
    return array


def write_image(
    path: str | os.PathLike,
    image: torch.Tensor | np.ndarray,
    affine: np.ndarray | torch.Tensor | None = None,
    compress: bool = True,
) -> None:
    """Write a volume ``(I, J, K)`` (or ``(1, I, J, K)``) as NIfTI, MHA or NRRD, atomically.

    The geometry comes from ``affine`` (voxel -> RAS, ``(4, 4)``), by default the ``MetaTensor``'s own, and
    is written as ITK spacing / origin / direction (LPS), so :func:`read_ct` gives the same affine back
    (to float32 precision for NIfTI). Values keep their type where ITK supports it (bool -> uint8,
    int8 -> int16, float16 -> float32, int64 -> int32 when it fits). ``compress`` applies to MHA / NRRD;
    NIfTI is compressed when the name ends with ``.gz``.

    Raises:
        ValueError: an unsupported suffix (``.mhd`` / ``.nhdr`` split headers cannot be written atomically:
            use ``.mha`` / ``.nrrd``), or not a single 3-D volume.
    """
    import itk

    path = Path(path)
    name = path.name.lower()
    if not name.endswith(WRITE_SUFFIXES):
        raise ValueError(f"{path}: unsupported suffix; write one of {', '.join(WRITE_SUFFIXES)}.")
    if affine is None:
        if not isinstance(image, MetaTensor):
            raise ValueError(f"{path}: pass affine= (voxel -> RAS) to write an array that is not a MetaTensor.")
        affine = image.affine
    affine = np.asarray(torch.as_tensor(affine, dtype=torch.float64).cpu(), dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"{path}: expected a (4, 4) voxel-to-RAS affine, got shape {affine.shape}.")
    data = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if data.ndim == 4 and data.shape[0] == 1:
        data = data[0]
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3-D volume (I, J, K) or (1, I, J, K), got shape {data.shape}.")
    if name.endswith(NIFTI_SUFFIXES):
        write_nifti(path, _itk_array(data), affine)
        return
    spacing, origin, direction = _geometry_from_affine(affine)
    itk_image = itk.image_from_array(np.ascontiguousarray(_itk_array(data).transpose(2, 1, 0)))
    itk_image.SetSpacing([float(s) for s in spacing])
    itk_image.SetOrigin([float(v) for v in origin])
    itk_image.SetDirection(itk.matrix_from_array(np.ascontiguousarray(direction)))

    def write(tmp: Path) -> None:
        itk.imwrite(itk_image, str(tmp), compression=compress)

    atomic_write(path, write)


def write_displacement_field(
    path: str | os.PathLike, vectors: torch.Tensor | np.ndarray, affine, compress: bool = True
) -> None:
    """Write ``vectors (I, J, K, 3)`` (LPS mm) as an ITK displacement-field image, atomically.

    ``affine`` is the voxel -> RAS affine of the field's grid; NIfTI, MHA or NRRD by the suffix (``compress``
    as in :func:`write_image`).
    """
    import itk

    path = Path(path)
    if not path.name.lower().endswith(WRITE_SUFFIXES):
        raise ValueError(f"{path}: unsupported suffix; write one of {', '.join(WRITE_SUFFIXES)}.")
    data = vectors.detach().cpu().numpy() if isinstance(vectors, torch.Tensor) else np.asarray(vectors)
    if data.ndim != 4 or data.shape[-1] != 3:
        raise ValueError(f"{path}: expected displacement vectors (I, J, K, 3), got shape {data.shape}.")
    affine = np.asarray(torch.as_tensor(affine, dtype=torch.float64).cpu())
    if path.name.lower().endswith(NIFTI_SUFFIXES):
        write_nifti(path, data.astype(np.float32, copy=False), affine, vector=True)
        return
    spacing, origin, direction = _geometry_from_affine(affine)
    image = itk.image_from_array(np.ascontiguousarray(data.astype(np.float32).transpose(2, 1, 0, 3)), is_vector=True)
    image.SetSpacing([float(v) for v in spacing])
    image.SetOrigin([float(v) for v in origin])
    image.SetDirection(itk.matrix_from_array(np.ascontiguousarray(direction)))
    atomic_write(path, lambda tmp: itk.imwrite(image, str(tmp), compression=compress))


def read_displacement_field(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Read an ITK displacement field: ``(vectors (I, J, K, 3) float32 LPS mm, affine (4, 4) voxel -> RAS)``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a 3-D image with 3 components per voxel, is truncated or corrupt, or holds
            NaN / infinite displacements (naming the file).
    """
    import itk

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such displacement field file.")
    nonfinite = verify_image_file(path) or 0
    try:
        image = itk.imread(str(path))
    except (RuntimeError, KeyError) as error:
        raise ValueError(f"{path}: ITK cannot read this file ({str(error).strip().splitlines()[-1]}).") from None
    dimension, components = image.GetImageDimension(), image.GetNumberOfComponentsPerPixel()
    if dimension != 3 or components != 3:
        raise ValueError(
            f"{path}: expected a displacement field (a 3-D image with 3 components per voxel), got a "
            f"{dimension}-D image with {components} component(s) per voxel."
        )
    array = np.asarray(itk.array_from_image(image), dtype=np.float32).transpose(2, 1, 0, 3)
    nonfinite = max(nonfinite, int(array.size - np.count_nonzero(np.isfinite(array))))
    if nonfinite:
        raise ValueError(
            f"{path}: {nonfinite} displacement values are NaN or infinite; a displacement field must be finite "
            "everywhere."
        )
    direction = np.asarray(itk.array_from_matrix(image.GetDirection()), dtype=np.float64)
    lps = np.eye(4)
    lps[:3, :3] = direction @ np.diag(np.asarray(image.GetSpacing(), dtype=np.float64))
    lps[:3, 3] = np.asarray(image.GetOrigin(), dtype=np.float64)
    affine = orientation_ras_lps(lps)
    return torch.from_numpy(np.ascontiguousarray(array)), torch.as_tensor(affine, dtype=torch.float64)
