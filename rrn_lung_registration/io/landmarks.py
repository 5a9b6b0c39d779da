"""Landmark files, voxel <-> world conversion and target registration error (TRE).

Conventions (stated once for the package):

* World coordinates are millimetres in the ITK / DICOM **LPS** frame (x: patient right -> left,
  y: anterior -> posterior, z: inferior -> superior), the frame of ITK, elastix and 3D Slicer's files.
* Image geometry is MONAI's: a ``MetaTensor`` affine maps a voxel index ``(i, j, k)`` (0-based, array
  axis order of the tensor) to **RAS** millimetres. ``LPS = diag(-1, -1, 1) @ RAS``.
* Voxel landmarks are ``(N, 3)`` float coordinates in the array axis order of the tensor they belong
  to, so that a displacement field ``ddf (3, D, H, W)`` (channel ``c`` = axis ``c``, MONAI ``Warp``
  convention: ``warped(x) = moving(x + ddf(x))``) carries a fixed-image landmark ``p`` to the
  moving-image point ``p + ddf(p)``.

Landmark files (:func:`read_landmarks` reads any of them and returns world LPS mm):

* **CSV** (``.csv``): one point per row under the header ``x,y,z``, world LPS mm.
* **DIR-Lab** text (``Case1_300_T00_xyz.txt``, ``copd1_300_eBH_xyz_r1.txt``): one point per line, three
  numbers separated by tabs / spaces (integers or floats, trailing tab and CRLF allowed), **1-based voxel
  indices** ``x y z`` of the image: column, row, slice of the raw file, i.e. ITK index order, so a point
  ``(x, y, z)`` is voxel ``(x - 1, y - 1, z - 1)`` of the ``(I, J, K)`` array that
  :mod:`rrn_lung_registration.io.ct_io` reads. Some files (the COPDGene ``iBH`` ones) start with the two
  lines ``index`` / ``300`` of the elastix header although their values are still DIR-Lab 1-based.
* **elastix / transformix point sets**: first line ``point`` (world coordinates, ITK LPS mm) or ``index``
  (0-based continuous voxel indices in ITK index order), second line the number of points, then one point
  per line. :func:`write_elastix_points` writes the ``point`` form (transformix ``-def`` input).

Voxel formats need the geometry of the image the indices refer to (the image as read from its file,
before any resampling or reorientation): a ``MetaTensor`` or its ``(4, 4)`` voxel-to-RAS affine.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from shared_ops.atomic import atomic_write

__all__ = [
    "LANDMARK_FORMATS",
    "LPS_TO_RAS",
    "detect_landmark_format",
    "dirlab_to_world",
    "landmark_errors",
    "read_dirlab_landmarks",
    "read_elastix_points",
    "read_landmark_pair",
    "read_landmarks",
    "read_landmarks_csv",
    "sample_field",
    "summarize_errors",
    "voxel_to_world",
    "world_to_dirlab",
    "world_to_voxel",
    "write_elastix_points",
    "write_landmarks_csv",
]

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
CSV_HEADER = ("x", "y", "z")


def read_landmarks_csv(path: str | os.PathLike) -> np.ndarray:
    """Read a landmark CSV (header ``x,y,z``, world LPS mm): ``(N, 3)`` float64.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a malformed file; the message names the file and, for a bad row, its line number.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: landmark file not found.")
    rows: list[tuple[int, list[str]]] = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            for row in reader:
                if row and any(cell.strip() for cell in row):
                    rows.append((reader.line_num, [cell.strip() for cell in row]))
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text landmark file (it does not decode as UTF-8).") from None
    except csv.Error as error:
        raise ValueError(f"{path}: line {reader.line_num}: not a CSV row ({error}).") from None
    if not rows or tuple(cell.lower() for cell in rows[0][1]) != CSV_HEADER:
        where = f"line {rows[0][0]}: " if rows else ""
        raise ValueError(f"{path}: {where}expected a CSV with the header 'x,y,z' (world LPS millimetres).")
    if len(rows) == 1:
        raise ValueError(f"{path}: expected one or more rows of three finite numbers after the header, got none.")
    points = np.empty((len(rows) - 1, 3), dtype=np.float64)
    for index, (number, row) in enumerate(rows[1:]):
        if len(row) != 3:
            raise ValueError(f"{path}: line {number}: expected three numbers x,y,z, got {len(row)}: {','.join(row)!r}.")
        try:
            points[index] = [float(cell) for cell in row]
        except ValueError:
            raise ValueError(f"{path}: line {number}: expected three numbers x,y,z, got {','.join(row)!r}.") from None
        if not np.isfinite(points[index]).all():
            raise ValueError(f"{path}: line {number}: landmark coordinates must be finite numbers, got {row}.")
    return points


def write_landmarks_csv(path: str | os.PathLike, points: np.ndarray) -> None:
    """Write world LPS mm points ``(N, 3)`` as a landmark CSV (atomically)."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(CSV_HEADER)
            writer.writerows([[f"{v:.6f}" for v in row] for row in points])

    atomic_write(Path(path), write)


def _affine(affine) -> np.ndarray:
    affine = np.asarray(torch.as_tensor(affine, dtype=torch.float64).cpu(), dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"expected a (4, 4) voxel-to-RAS affine, got shape {affine.shape}.")
    return affine


def world_to_voxel(points: np.ndarray, affine) -> np.ndarray:
    """World LPS mm ``(N, 3)`` -> voxel coordinates ``(N, 3)`` of an image with voxel-to-RAS ``affine``."""
    ras = np.asarray(points, dtype=np.float64).reshape(-1, 3) @ LPS_TO_RAS
    inverse = np.linalg.inv(_affine(affine))
    return ras @ inverse[:3, :3].T + inverse[:3, 3]


def voxel_to_world(voxels: np.ndarray, affine) -> np.ndarray:
    """Voxel coordinates ``(N, 3)`` -> world LPS mm ``(N, 3)`` for an image with voxel-to-RAS ``affine``."""
    matrix = _affine(affine)
    ras = np.asarray(voxels, dtype=np.float64).reshape(-1, 3) @ matrix[:3, :3].T + matrix[:3, 3]
    return ras @ LPS_TO_RAS


def sample_field(field: torch.Tensor, points: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Trilinear samples of ``field (C, D, H, W)`` at voxel ``points (N, 3)``; border values outside.

    Returns ``(N, C)`` in float64.
    """
    if field.ndim != 4:
        raise ValueError(f"expected a field (C, D, H, W), got shape {tuple(field.shape)}.")
    field = field.detach().to(torch.float64)
    points = torch.as_tensor(points, dtype=torch.float64, device=field.device).reshape(-1, 3)
    size = torch.tensor(field.shape[1:], dtype=torch.float64, device=field.device)
    points = torch.minimum(torch.clamp(points, min=0), size - 1)
    low = torch.minimum(points.floor(), size - 2).clamp(min=0).long()
    frac = points - low
    values = torch.zeros(points.shape[0], field.shape[0], dtype=torch.float64, device=field.device)
    for corner in range(8):
        offset = torch.tensor([(corner >> 2) & 1, (corner >> 1) & 1, corner & 1], device=field.device)
        index = torch.minimum(low + offset, size.long() - 1)
        weight = torch.where(offset.bool(), frac, 1 - frac).prod(dim=1)
        values += weight[:, None] * field[:, index[:, 0], index[:, 1], index[:, 2]].T
    return values


def landmark_errors(
    ddf: torch.Tensor | None,
    fixed_points: np.ndarray,
    moving_points: np.ndarray,
    moving_affine,
    snap_to_voxel: bool = False,
) -> np.ndarray:
    """TRE per landmark pair in mm.

    Each fixed landmark ``p`` is carried to ``p + ddf(p)`` in the moving image's voxel grid and compared,
    in world millimetres, with its moving landmark.

    Args:
        ddf: ``(3, D, H, W)`` displacement in voxels (``None``: before registration, ``ddf = 0``).
        fixed_points: ``(N, 3)`` voxel coordinates in the fixed image.
        moving_points: ``(N, 3)`` voxel coordinates in the moving image.
        moving_affine: voxel-to-RAS affine ``(4, 4)`` of the moving image grid the field points into.
        snap_to_voxel: DIR-Lab style: the fixed landmark is rounded to its nearest voxel, the field read
            there, and the carried point rounded to a voxel before measuring.
    """
    fixed = np.asarray(fixed_points, dtype=np.float64).reshape(-1, 3)
    moving = np.asarray(moving_points, dtype=np.float64).reshape(-1, 3)
    if fixed.shape != moving.shape:
        raise ValueError(f"fixed and moving landmarks differ in number: {len(fixed)} vs {len(moving)}.")
    start = np.rint(fixed) if snap_to_voxel else fixed
    carried = start if ddf is None else start + sample_field(ddf, start).cpu().numpy()
    if snap_to_voxel:
        carried = np.rint(carried)
    linear = _affine(moving_affine)[:3, :3]
    return np.linalg.norm((carried - moving) @ linear.T, axis=1)


def summarize_errors(errors: Sequence[float] | np.ndarray) -> dict[str, float]:
    """``{"mean", "median", "std", "p95", "max", "count"}`` of per-landmark errors in mm."""
    errors = np.asarray(errors, dtype=np.float64).reshape(-1)
    if errors.size == 0:
        raise ValueError("no landmark errors to summarise.")
    return {
        "mean": float(errors.mean()),
        "median": float(np.median(errors)),
        "std": float(errors.std()),
        "p95": float(np.percentile(errors, 95)),
        "max": float(errors.max()),
        "count": int(errors.size),
    }


LANDMARK_FORMATS = ("csv", "dirlab", "elastix")
ELASTIX_KINDS = ("point", "index")
_DIRLAB_NAME = re.compile(r"(case|copd)_?\d+.*_xyz", re.IGNORECASE)


def _text_lines(path: Path) -> list[tuple[int, str]]:
    """Non-blank lines of a text file as ``(line number, stripped text)``."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: landmark file not found.")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text landmark file (it does not decode as UTF-8).") from None
    lines = [(number, line.strip()) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not lines:
        raise ValueError(f"{path}: the landmark file is empty.")
    return lines


def _split_header(path: Path, lines: list[tuple[int, str]]) -> tuple[str | None, list[tuple[int, str]]]:
    """Strip an elastix header (``point`` / ``index`` line, count line) and check the count."""
    kind = lines[0][1].lower()
    if kind not in ELASTIX_KINDS:
        return None, lines
    if len(lines) < 2:
        raise ValueError(f"{path}: the '{kind}' header must be followed by a line with the number of points.")
    number, count_text = lines[1]
    try:
        count = int(count_text)
    except ValueError:
        raise ValueError(
            f"{path}: line {number}: expected the number of points after the '{kind}' header, got {count_text!r}."
        ) from None
    rows = lines[2:]
    if count != len(rows):
        raise ValueError(f"{path}: the header announces {count} points but the file holds {len(rows)}.")
    return kind, rows


def _parse_points(path: Path, rows: list[tuple[int, str]]) -> np.ndarray:
    """Rows of three whitespace-separated numbers -> ``(N, 3)`` float64."""
    if not rows:
        raise ValueError(f"{path}: the file holds no landmarks.")
    points = np.empty((len(rows), 3), dtype=np.float64)
    for index, (number, row) in enumerate(rows):
        cells = row.split()
        if len(cells) != 3:
            raise ValueError(f"{path}: line {number}: expected three numbers 'x y z', got {len(cells)}: {row!r}.")
        try:
            points[index] = [float(cell) for cell in cells]
        except ValueError:
            raise ValueError(f"{path}: line {number}: expected three numbers 'x y z', got {row!r}.") from None
        if not np.isfinite(points[index]).all():
            raise ValueError(f"{path}: line {number}: landmark coordinates must be finite numbers, got {row!r}.")
    return points


def read_dirlab_landmarks(path: str | os.PathLike) -> np.ndarray:
    """Read a DIR-Lab landmark file: ``(N, 3)`` float64 **1-based** voxel indices ``x y z``.

    Both DIR-Lab text layouts are accepted (tab- or space-separated integers or floats, leading spaces,
    trailing tab, CRLF line ends), with or without the two-line ``index`` / count header some COPDGene
    files carry (the values stay 1-based: the header is checked against the number of rows, nothing else).
    Convert to millimetres with :func:`dirlab_to_world`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a malformed file (the message names it and the line), or a ``point`` header (world
            coordinates, not DIR-Lab voxel indices: use :func:`read_elastix_points`).
    """
    path = Path(path)
    kind, rows = _split_header(path, _text_lines(path))
    if kind == "point":
        raise ValueError(
            f"{path}: the 'point' header marks world coordinates, not DIR-Lab voxel indices; "
            "read it with read_elastix_points or read_landmarks."
        )
    return _parse_points(path, rows)


def read_elastix_points(path: str | os.PathLike) -> tuple[str, np.ndarray]:
    """Read an elastix / transformix point-set file: ``(kind, points (N, 3) float64)``.

    ``kind`` is ``"point"`` (world coordinates, ITK LPS mm) or ``"index"`` (0-based continuous voxel
    indices in ITK index order, ``(I, J, K)`` of the image the file refers to).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the first line is not ``point`` / ``index``, the count line is missing or disagrees with
            the number of points, or a point is not three numbers (naming the file and line).
    """
    path = Path(path)
    kind, rows = _split_header(path, _text_lines(path))
    if kind is None:
        raise ValueError(f"{path}: an elastix point file starts with a line 'point' or 'index'.")
    return kind, _parse_points(path, rows)


def write_elastix_points(path: str | os.PathLike, points: np.ndarray) -> None:
    """Write world LPS mm points ``(N, 3)`` as an elastix ``point`` file (transformix input), atomically."""
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 3 or len(points) == 0 or not np.isfinite(points).all():
        raise ValueError(f"{path}: expected one or more finite points (N, 3), got shape {points.shape}.")

    def write(tmp: Path) -> None:
        lines = ["point", str(len(points))] + [" ".join(repr(float(v)) for v in row) for row in points]
        tmp.write_text("\n".join(lines) + "\n")

    atomic_write(Path(path), write)


def _image_affine(image, path: Path | None = None) -> np.ndarray:
    """The voxel-to-RAS affine voxel landmarks of a file refer to: the image's as read from its file.

    A ``MetaTensor`` gives ``meta["original_affine"]`` when it has one (the grid of its file, before any
    MONAI spatial transform), else its ``affine``; an array / tensor is taken as the ``(4, 4)`` affine.
    """
    if image is None:
        where = f"{path}: " if path is not None else ""
        raise ValueError(
            f"{where}voxel landmarks need the geometry of their image: pass image= (a MetaTensor or its "
            "(4, 4) voxel-to-RAS affine)."
        )
    meta = getattr(image, "meta", None)
    if isinstance(meta, dict) and hasattr(image, "affine"):
        return _affine(meta.get("original_affine", image.affine))
    return _affine(image)


def dirlab_to_world(points: np.ndarray, image) -> np.ndarray:
    """DIR-Lab 1-based voxel ``x y z`` ``(N, 3)`` -> world LPS mm ``(N, 3)``: voxel ``(x-1, y-1, z-1)``.

    ``image``: the volume the indices refer to (``MetaTensor`` from :func:`rrn_lung_registration.io.ct_io.read_ct`
    or ``DirLabReader``) or its ``(4, 4)`` voxel-to-RAS affine (e.g. ``ct_io.dirlab_affine("case1")``).
    """
    return voxel_to_world(np.asarray(points, dtype=np.float64).reshape(-1, 3) - 1.0, _image_affine(image))


def world_to_dirlab(points: np.ndarray, image) -> np.ndarray:
    """World LPS mm ``(N, 3)`` -> DIR-Lab 1-based voxel ``x y z`` ``(N, 3)`` (inverse of :func:`dirlab_to_world`)."""
    return world_to_voxel(points, _image_affine(image)) + 1.0


def detect_landmark_format(path: str | os.PathLike) -> str:
    """``"csv"``, ``"elastix"`` or ``"dirlab"``, from the file's suffix, name and first line.

    * ``.csv`` suffix, or a first line ``x,y,z``: CSV (world LPS mm);
    * first line ``point``: elastix (world coordinates);
    * first line ``index``: DIR-Lab when the name is DIR-Lab's (``case<N>...`` / ``copd<N>...`` with
      ``_xyz``, as the COPDGene ``iBH`` files, whose values are 1-based), else elastix (0-based);
    * anything else (rows of three numbers): DIR-Lab.
    """
    path = Path(path)
    if path.suffix.lower() == ".csv":
        return "csv"
    first = _text_lines(path)[0][1].lower()
    if first.replace(" ", "") == ",".join(CSV_HEADER):
        return "csv"
    if first == "point":
        return "elastix"
    if first == "index":
        return "dirlab" if _DIRLAB_NAME.search(path.name) else "elastix"
    return "dirlab"


def read_landmarks(path: str | os.PathLike, image=None, format: str | None = None) -> np.ndarray:
    """Read landmarks of any supported format as world LPS mm ``(N, 3)`` float64.

    Args:
        path: a CSV, DIR-Lab or elastix file (see the module notes).
        image: the image voxel formats (DIR-Lab, elastix ``index``) refer to, as read from its file: a
            ``MetaTensor`` or its ``(4, 4)`` voxel-to-RAS affine. Not needed for world formats.
        format: ``"csv"``, ``"dirlab"`` or ``"elastix"``; default :func:`detect_landmark_format`.

    Raises:
        ValueError: a malformed file, an unknown ``format``, or a voxel format without ``image`` (each
            naming the file).
    """
    path = Path(path)
    fmt = detect_landmark_format(path) if format is None else format.lower()
    if fmt == "csv":
        return read_landmarks_csv(path)
    if fmt == "dirlab":
        points = read_dirlab_landmarks(path)
        return dirlab_to_world(points, _image_affine(image, path))
    if fmt == "elastix":
        kind, points = read_elastix_points(path)
        return points if kind == "point" else voxel_to_world(points, _image_affine(image, path))
    raise ValueError(f"{path}: unknown landmark format {format!r}; expected one of {LANDMARK_FORMATS}.")


def read_landmark_pair(
    fixed_path: str | os.PathLike,
    moving_path: str | os.PathLike,
    fixed_image=None,
    moving_image=None,
    format: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Read corresponding fixed and moving landmarks: two ``(N, 3)`` world LPS mm arrays.

    ``fixed_image`` / ``moving_image`` as ``image`` of :func:`read_landmarks` (voxel formats only).

    Raises:
        ValueError: the two files hold different numbers of points (naming both), or either is malformed.
    """
    fixed = read_landmarks(fixed_path, image=fixed_image, format=format)
    moving = read_landmarks(moving_path, image=moving_image, format=format)
    if fixed.shape != moving.shape:
        raise ValueError(
            f"landmark files of a pair must hold the same number of points: {fixed_path} has {len(fixed)}, "
            f"{moving_path} has {len(moving)}."
        )
    return fixed, moving
