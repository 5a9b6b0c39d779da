"""The files of a whole-slide run: their names, the checks before any work, staging, the region and run tables.

Every file of a slide is written under a temporary name first (:class:`StagedOutputs`) and renamed into place
only when all of them are complete, so a run killed at any moment leaves no output of its own behind; the next
run on the same output removes the temporary files such a run left (:func:`check_outputs`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from roigan_stain_transfer.wsi.annotations import Polygon, polygon_area
from shared_ops.atomic import atomic_write_text, file_mode, temporary_sibling

__all__ = [
    "REGION_FIELDS",
    "RUN_FIELDS",
    "StagedOutputs",
    "check_outputs",
    "csv_text",
    "json_text",
    "output_paths",
    "region_table",
    "write_run_summary",
]

REGION_FIELDS = ("region", "area_mm2", "centroid_x", "centroid_y", "xmin", "ymin", "xmax", "ymax", "holes")
RUN_FIELDS = (
    "slide",
    "status",
    "output",
    "tiles",
    "tissue_fraction",
    "seconds",
    "dab_regions",
    "dab_area_mm2",
    "error",
)


def output_paths(output: str | os.PathLike) -> dict[str, Path]:
    """Every file written for the virtual slide ``output`` (``.tif`` / ``.tiff``).

    ``slide``: the virtual IHC slide; ``thumbnail``: H&E | virtual IHC PNG; ``tissue``: tissue mask PNG;
    ``dab_tiff`` / ``dab_png``: DAB heat map as pyramidal TIFF and as PNG overlay; ``regions``: DAB-positive
    regions as QuPath GeoJSON on the virtual slide, ``regions_he`` the same on the H&E slide's level 0;
    ``regions_csv``: one row per region; ``summary``: JSON of the run.
    """
    output = Path(output)
    if output.suffix.lower() not in (".tif", ".tiff"):
        raise ValueError(f"{output}: the virtual slide is a pyramidal TIFF; expected a .tif or .tiff output name")
    stem = output.with_suffix("")

    def sibling(suffix: str) -> Path:
        return stem.with_name(stem.name + suffix)

    return {
        "slide": output,
        "thumbnail": sibling(".thumbnail.png"),
        "tissue": sibling(".tissue.png"),
        "dab_tiff": sibling(".dab.tiff"),
        "dab_png": sibling(".dab.png"),
        "regions": sibling(".dab_regions.geojson"),
        "regions_he": sibling(".dab_regions.he.geojson"),
        "regions_csv": sibling(".dab_regions.csv"),
        "summary": sibling(".json"),
    }


def check_outputs(paths: dict[str, Path], overwrite: bool, remove_stale: bool = True) -> None:
    """Refuse before any work: existing outputs (unless ``overwrite``), a folder that is a file or not writable.

    With ``remove_stale``, temporary files that a killed run left for the same output are deleted (one run per
    output at a time).
    """
    folder = paths["slide"].parent
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder}: the output folder is a file")
    if any(p.is_dir() for p in paths.values()):
        raise IsADirectoryError(f"{paths['slide']}: an output name is taken by a folder")
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{existing[0]} exists ({len(existing)} output file(s)); pass --overwrite to replace them"
        )
    folder.mkdir(parents=True, exist_ok=True)
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"{folder}: the output folder is not writable")
    if remove_stale:
        stem, random_part = paths["slide"].stem, "?" * 8  # tempfile's random names: 8 characters
        staged = f".{stem}-{random_part}.partial*"  # StagedOutputs' files
        nested = f"..{stem}-{random_part}-{random_part}.partial.partial*"  # the TIFF writer's, inside a staged name
        for pattern in (staged, nested):
            for stale in folder.glob(pattern):
                stale.unlink(missing_ok=True)


class StagedOutputs:
    """Temporary names for a set of output files, renamed into place together by :meth:`commit`."""

    def __init__(self, paths: dict[str, Path]) -> None:
        self.paths = paths
        self._staged: dict[str, Path] = {}

    def path(self, name: str) -> Path:
        """A fresh temporary file next to ``paths[name]`` (same suffixes) to write that output into."""
        self._staged[name] = temporary_sibling(self.paths[name])
        return self._staged[name]

    def commit(self) -> None:
        for name, tmp in self._staged.items():
            os.chmod(tmp, file_mode())
            os.replace(tmp, self.paths[name])
        self._staged.clear()

    def abort(self) -> None:
        for tmp in self._staged.values():
            tmp.unlink(missing_ok=True)
        self._staged.clear()


def region_table(polygons: Sequence[Polygon], mpp: float) -> tuple[list[dict], list[dict]]:
    """Per-region GeoJSON properties and CSV rows for ``polygons`` whose coordinates are pixels of ``mpp`` um."""
    props, rows = [], []
    for number, polygon in enumerate(polygons, start=1):
        area_mm2 = polygon_area(polygon) * (mpp * 1e-3) ** 2
        (x0, y0), (x1, y1) = polygon.exterior.min(axis=0), polygon.exterior.max(axis=0)
        props.append({"name": f"DAB region {number}", "area_mm2": round(area_mm2, 6)})
        rows.append(
            {
                "region": number,
                "area_mm2": f"{area_mm2:.6f}",
                "centroid_x": f"{polygon.exterior[:, 0].mean():.1f}",
                "centroid_y": f"{polygon.exterior[:, 1].mean():.1f}",
                "xmin": f"{x0:.1f}",
                "ymin": f"{y0:.1f}",
                "xmax": f"{x1:.1f}",
                "ymax": f"{y1:.1f}",
                "holes": len(polygon.holes),
            }
        )
    return props, rows


def csv_text(rows: Sequence[dict], fields: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fields), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _json_value(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN
    return value


def json_text(value: Any) -> str:
    """JSON of ``value`` with NumPy scalars as numbers and NaN / infinities as null."""
    return json.dumps(_json_value(value), indent=2, allow_nan=False) + "\n"


def write_run_summary(output_dir: Path, results: Sequence[dict[str, Any]]) -> None:
    """``summary.csv`` (one row per slide, failed ones with their error) and ``summary.json`` in ``output_dir``."""
    rows = []
    for r in results:
        ok = "error" not in r
        rows.append(
            {
                "slide": r["slide"],
                "status": "ok" if ok else "failed",
                "output": r["outputs"]["slide"] if ok else "",
                "tiles": r["tiles"]["translated"] if ok else "",
                "tissue_fraction": f"{r['tissue_fraction']:.4f}" if ok else "",
                "seconds": r["seconds"]["total"] if ok else "",
                "dab_regions": r["dab"]["regions"] if ok else "",
                "dab_area_mm2": f"{r['dab']['positive_area_mm2']:.4f}" if ok else "",
                "error": r.get("error", ""),
            }
        )
    atomic_write_text(output_dir / "summary.csv", csv_text(rows, RUN_FIELDS))
    atomic_write_text(output_dir / "summary.json", json_text(list(results)))
