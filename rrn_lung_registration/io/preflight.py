"""Checks made before a registration (or a warp) starts, and plausibility checks of its result.

A wrong result that looks like a success is the worst outcome of ``python -m rrn_lung_registration
register``, a failure after minutes of computation the second worst. :mod:`rrn_lung_registration.pipeline`
therefore runs these checks first, in seconds, and each message names the file at fault:

* :func:`check_output_folder`: the output folder can be created and written, is not a file, and holds no
  earlier registration's outputs unless they are to be replaced; :func:`check_output_file` the same for
  the one file ``warp`` writes. :func:`remove_stale_staging` removes the staging folders of runs that were
  killed (their names record the host and process that made them: :func:`staging_prefix`).
* :func:`check_finite`: NaN / infinite voxels, counted in the file itself (ITK reads NIfTI NaN as 0).
* :func:`check_ct_geometry`: voxel spacing and physical extent that a chest CT can have.
* :func:`landmarks_outside`: landmarks that lie outside their image (all outside is an error).
* :func:`jacobian_warning`: a mean Jacobian determinant in the lungs that breathing cannot produce.

Thresholds and why
------------------
* Spacing :data:`SPACING_RANGE_MM` = ``[0.05, 20]`` mm per axis: clinical chest CT is reconstructed at about
  0.2-1 mm in-plane (ultra-high-resolution and photon-counting scanners go down to about 0.1 mm) and
  0.5-5 mm between slices (10 mm for old thick-slice scans). Values outside are wrong units (um, cm, m) or
  a broken header; 0.001 mm would otherwise end in a 30 TiB allocation.
* Extent :data:`EXTENT_RANGE_MM` = ``[20, 1000]`` mm along every axis, and at least
  :data:`MIN_LARGEST_EXTENT_MM` = 100 mm along one: adult lungs are about 250 mm tall and the chest about
  300 mm wide, a scan of the lungs covers well over 100 mm in some direction (a 512-pixel slice with a
  spacing in centimetres spans 50 "mm"), and a chest or chest-abdomen CT is shorter than a metre (stacked
  4D-CT phases or whole-body scans are longer: crop the chest first).
* Mean Jacobian determinant of the transform inside the fixed lungs :data:`JACOBIAN_MEAN_RANGE` =
  ``[0.5, 2.0]``. ``det D phi`` is the local volume ratio moving / fixed, so its mean over the lungs is about
  the lung volume ratio of the two scans (the affine pre-alignment's scale included). Tidal breathing
  (4D-CT, DIR-Lab cases 1-10) changes lung volume by 5-25 % (0.75-0.95 with the inhale scan fixed); breath-
  hold inspiration / expiration pairs (COPDGene, DIR-Lab copd1-10, TLC / FRC) give lung volume ratios of about
  0.55-0.9, lower in healthy lungs, higher with air trapping; the swapped order (exhale fixed) gives the
  inverses, up to about 1.8. The band, symmetric on a log scale, keeps all of these and flags volume
  changes of more than a factor 2: scans of two different people, a wrong scan, or a diverged
  registration (a maximal-effort TLC / RV pair, around 0.4, is the one legitimate case outside; the
  warning says so). It is a warning, not an error: the result is written, with the warning in
  ``registration.json``.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "EXTENT_RANGE_MM",
    "JACOBIAN_MEAN_RANGE",
    "MIN_LARGEST_EXTENT_MM",
    "SPACING_RANGE_MM",
    "STAGING_PREFIX",
    "check_ct_geometry",
    "check_finite",
    "check_landmarks_inside",
    "check_output_file",
    "check_output_folder",
    "jacobian_warning",
    "landmarks_outside",
    "remove_stale_staging",
    "staging_prefix",
]

logger = logging.getLogger(__name__)

SPACING_RANGE_MM = (0.05, 20.0)
EXTENT_RANGE_MM = (20.0, 1000.0)
MIN_LARGEST_EXTENT_MM = 100.0
JACOBIAN_MEAN_RANGE = (0.5, 2.0)
STAGING_PREFIX = ".partial-"
_STAGING_OWNER = re.compile(r"^\.partial-(?P<host>.+)-(?P<pid>\d+)-[^-]+$")


# ---------------------------------------------------------------------------------------------- outputs


def _existing_ancestor(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _write_problem(folder: Path) -> str | None:
    """Why files cannot be created in ``folder`` (an existing folder), or ``None``.

    A probe file is created and removed: permission bits alone do not tell (root ignores them; read-only
    mounts do not show in them).
    """
    if not os.access(folder, os.W_OK | os.X_OK):
        return "permission denied"
    try:
        handle, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
    except OSError as error:
        return error.strerror or str(error)
    os.close(handle)
    os.unlink(probe)
    return None


def _check_writable_location(path: Path, what: str) -> None:
    """``path`` (a folder to create or fill) can be made: no file in the way, its nearest folder writable."""
    ancestor = _existing_ancestor(path)
    if not ancestor.is_dir():
        detail = "is a file, not a folder" if ancestor == Path(os.path.abspath(path)) else f"{ancestor} is a file"
        raise NotADirectoryError(f"{path}: {detail}; {what}.")
    problem = _write_problem(ancestor)
    if problem:
        where = "" if ancestor == Path(os.path.abspath(path)) else f" (in {ancestor})"
        raise PermissionError(f"{path}: cannot write there{where}: {problem}; {what}.")


def check_output_folder(output: str | os.PathLike, outputs: Iterable[str], overwrite: bool = False) -> Path:
    """Refuse an output folder that cannot receive a registration's outputs; returns it as a ``Path``.

    Args:
        output: the folder (created later if missing).
        outputs: the names of a registration's output files.
        overwrite: accept a folder holding an earlier registration's outputs (they are replaced as a set).

    Raises:
        NotADirectoryError: ``output`` (or a parent) is a file.
        PermissionError: files cannot be created there (read-only folder or file system).
        FileExistsError: the folder holds outputs of an earlier registration and ``overwrite`` is false.
    """
    output = Path(output)
    _check_writable_location(output, "--output must name a folder that can be created and written")
    found = [name for name in outputs if (output / name).exists()]
    if found and not overwrite:
        shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
        raise FileExistsError(
            f"{output}: already holds the outputs of an earlier registration ({shown}); pass --overwrite "
            "(overwrite=True) to replace that whole set, or choose another folder."
        )
    return output


def check_output_file(path: str | os.PathLike, suffixes: Sequence[str]) -> Path:
    """Refuse an output file that cannot be written: wrong suffix, a folder, an unwritable folder.

    Raises:
        ValueError: a suffix not in ``suffixes``.
        IsADirectoryError: ``path`` is a folder.
        NotADirectoryError, PermissionError: its folder cannot be created or written.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a folder; the output must be a file name.")
    if not path.name.lower().endswith(tuple(suffixes)):
        raise ValueError(f"{path}: unsupported suffix; write one of {', '.join(suffixes)}.")
    _check_writable_location(path.parent, "the output file's folder must be creatable and writable")
    return path


def staging_prefix() -> str:
    """Name prefix of a new staging folder: ``.partial-<host>-<pid>-`` (see :func:`remove_stale_staging`)."""
    host = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "host"
    return f"{STAGING_PREFIX}{host}-{os.getpid()}-"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, owned by someone else
        return True
    return True


def _is_stale(folder: Path) -> bool:
    owner = _STAGING_OWNER.match(folder.name)
    if owner is None:
        return True  # made before staging folders recorded their owner: no such run is going on
    host = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())
    if owner["host"] != host:
        return False  # another machine's run (shared file system): cannot tell, keep it
    pid = int(owner["pid"])
    return pid != os.getpid() and not _running(pid)


def remove_stale_staging(output: str | os.PathLike) -> list[Path]:
    """Remove the staging folders (``.partial-*``) that killed runs left in ``output``; returns them.

    A staging folder is stale when its name records no owner (older versions), or an owner process on this
    host that no longer runs. Folders of running processes, and of other hosts, are kept.
    """
    output = Path(output)
    if not output.is_dir():
        return []
    removed = []
    for entry in sorted(output.iterdir()):
        if entry.name.startswith(STAGING_PREFIX) and entry.is_dir() and _is_stale(entry):
            shutil.rmtree(entry, ignore_errors=True)
            logger.info("%s: removed the staging folder of an interrupted run", entry)
            removed.append(entry)
    return removed


# ----------------------------------------------------------------------------------------------- images


def check_finite(image: torch.Tensor, source: str) -> None:
    """Refuse an image with NaN / infinite voxels, counted in the file (``meta["nonfinite_voxels"]``, see
    :func:`~rrn_lung_registration.io.ct_io.read_ct`) and in the tensor.

    Raises:
        ValueError: naming ``source`` and the count.
    """
    meta = getattr(image, "meta", None) or {}
    in_file = int(meta.get("nonfinite_voxels", 0) or 0)
    values = image.as_tensor() if hasattr(image, "as_tensor") else image
    in_tensor = int((~torch.isfinite(values)).sum()) if values.is_floating_point() else 0
    count = max(in_file, in_tensor)
    if count:
        raise ValueError(
            f"{source}: {count} of {values.numel()} voxels are NaN or infinite; a CT image must be finite "
            "everywhere (ITK would read NIfTI NaN as 0 HU)."
        )


def _spacing_and_shape(image) -> tuple[np.ndarray, tuple[int, ...]]:
    affine = np.asarray(torch.as_tensor(image.affine, dtype=torch.float64).cpu(), dtype=np.float64)
    return np.linalg.norm(affine[:3, :3], axis=0), tuple(int(s) for s in image.shape[-3:])


def check_ct_geometry(image, source: str) -> None:
    """Refuse a voxel spacing or physical extent that no chest CT has (bounds in the module notes).

    ``image``: a ``MetaTensor`` ``(I, J, K)`` (or ``(..., I, J, K)``) with its voxel -> world affine.

    Raises:
        ValueError: naming ``source``, the spacing, the extent and the accepted ranges.
    """
    spacing, shape = _spacing_and_shape(image)
    extent = spacing * np.asarray(shape)
    low, high = SPACING_RANGE_MM
    described = (
        f"spacing {' x '.join(f'{v:g}' for v in spacing)} mm, {' x '.join(str(s) for s in shape)} voxels, "
        f"extent {' x '.join(f'{v:.4g}' for v in extent)} mm"
    )
    if not np.all(np.isfinite(spacing)) or np.any(spacing < low) or np.any(spacing > high):
        raise ValueError(
            f"{source}: voxel spacing outside [{low:g}, {high:g}] mm, not a chest CT ({described}); is the "
            "spacing in the header in other units, or the header damaged?"
        )
    low, high = EXTENT_RANGE_MM
    if np.any(extent < low) or np.any(extent > high) or extent.max() < MIN_LARGEST_EXTENT_MM:
        raise ValueError(
            f"{source}: physical extent no chest CT has ({described}); expected {low:g} to {high:g} mm along "
            f"every axis and at least {MIN_LARGEST_EXTENT_MM:g} mm along one. Wrong spacing units, stacked "
            "4D-CT phases, or a whole-body scan (crop the chest first)?"
        )


# -------------------------------------------------------------------------------------------- landmarks


def landmarks_outside(points_lps: np.ndarray, image) -> np.ndarray:
    """Which world LPS mm landmarks ``(N, 3)`` lie outside ``image``'s voxels (a half voxel beyond the
    centres of the outer voxels counts as inside): a bool ``(N,)`` array."""
    from rrn_lung_registration.io.landmarks import world_to_voxel

    voxels = world_to_voxel(np.asarray(points_lps, dtype=np.float64).reshape(-1, 3), image.affine)
    size = np.asarray(image.shape[-3:], dtype=np.float64)
    return ~np.all((voxels >= -0.5) & (voxels <= size - 0.5), axis=1)


def check_landmarks_inside(points_lps: np.ndarray, image, path: str | os.PathLike, source: str) -> str | None:
    """Refuse landmarks that all lie outside their image; a warning message when some do (else ``None``).

    Raises:
        ValueError: every landmark of ``path`` lies outside ``image`` (read from ``source``).
    """
    outside = landmarks_outside(points_lps, image)
    count, total = int(outside.sum()), len(outside)
    if count == total:
        raise ValueError(
            f"{path}: all {total} landmarks lie outside the image {source}; are they the landmarks of another "
            "image, or voxel indices read against the wrong geometry (DIR-Lab files refer to their own case)?"
        )
    if count:
        return (
            f"{path}: {count} of {total} landmarks lie outside the image {source}; their TRE is measured where "
            "the image holds no data."
        )
    return None


# --------------------------------------------------------------------------------------------- results


def jacobian_warning(mean_in_lungs: float | None) -> str | None:
    """A warning when the mean Jacobian determinant in the lungs is outside :data:`JACOBIAN_MEAN_RANGE`."""
    low, high = JACOBIAN_MEAN_RANGE
    if mean_in_lungs is None:
        return "the registration grid holds no fixed lung voxel: the Jacobian in the lungs is unknown."
    if low <= mean_in_lungs <= high:
        return None
    change = (
        f"the lungs would change volume by a factor {max(mean_in_lungs, 1 / mean_in_lungs):.2g}, more than "
        "breathing does (a maximal-effort inspiration / residual-volume pair is the one exception)"
        if mean_in_lungs > 0
        else "the transform folds the lungs"
    )
    return (
        f"the mean Jacobian determinant in the lungs is {mean_in_lungs:.3g}, outside [{low:g}, {high:g}]: {change}. "
        "Are the two scans of the same patient, and is the registration sound (see overview.png)?"
    )
