"""Registering every pair of a datalist into one output folder, resumable by the pairs' input files
(the bundle's ``configs/register.json``).

Each pair is registered by :func:`rrn_lung_registration.pipeline.register_files` into ``<output>/<name>/``: its
``name`` key, else the stem of its moving file, made unique with ``_2``, ``_3``, ... Its ``registration.json``
records, besides the settings, the pair's input files (``"inputs"``: absolute paths of ``fixed``, ``moving``,
``fixed_landmarks``, ``moving_landmarks``; null when absent).

A later run over the same output folder finds a finished pair by those inputs, wherever the pair now is in the
datalist, and registers only what is not done. A folder is a pair's result only when it records the pair's
inputs and the same settings (the device aside): after a datalist is reordered no pair is skipped and no
pair reports another one's TRE, and a pair registered with other settings (other weights, grid, steps) is
registered again in its folder. A folder holding another pair's result, or a result without a record of its
inputs (written by an earlier version), is never written over: the pair gets the next free name.

A pair is registered into a hidden staging folder and moved into place with its record, so a run killed at any
moment leaves either the complete folder or none (staging folders of a killed run are removed by the next).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

from rrn_lung_registration.pipeline import RegistrationSettings, register_files
from shared_ops.atomic import atomic_write, atomic_write_text, file_mode

__all__ = ["INPUT_KEYS", "pair_inputs", "register_pairs"]

INPUT_KEYS = ("fixed", "moving", "fixed_landmarks", "moving_landmarks")
REPORT = "registration.json"
_STAGING = ".partial-"


def pair_inputs(pair: Mapping) -> dict[str, str | None]:
    """The input files of a datalist pair as its ``registration.json`` records them: absolute, resolved paths."""
    return {key: str(Path(str(pair[key])).resolve()) if pair.get(key) else None for key in INPUT_KEYS}


def _comparable(settings: Mapping | None) -> dict | None:
    """Settings as JSON holds them, without ``device`` (it does not change what is computed)."""
    if not isinstance(settings, Mapping):
        return None
    record = json.loads(json.dumps(settings, default=str))
    record.pop("device", None)
    return record


def _report(folder: Path) -> dict | None:
    """The ``registration.json`` of ``folder`` (None when absent or unreadable)."""
    try:
        summary = json.loads((folder / REPORT).read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def _folder_mode() -> int:
    """Permissions of a new folder under the umask (``mkdtemp`` makes them private)."""
    mode = file_mode()
    return mode | ((mode & 0o444) >> 2)


def _base_name(pair: Mapping, index: int) -> str:
    return str(pair.get("name") or Path(str(pair["moving"])).name.split(".")[0] or f"pair_{index}")


def _free_name(base: str, unavailable: set[str]) -> str:
    name, suffix = base, 1
    while name in unavailable:
        suffix += 1
        name = f"{base}_{suffix}"
    return name


def _move_into_place(staging: Path, folder: Path) -> None:
    """Rename ``staging`` to ``folder``, replacing a previous ``folder`` (renamed aside first, then deleted)."""
    if not folder.exists():
        os.replace(staging, folder)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{folder.name}{_STAGING}", dir=folder.parent))
    os.replace(folder, aside / folder.name)
    os.replace(staging, folder)
    shutil.rmtree(aside, ignore_errors=True)


def _register(pair: Mapping, inputs: dict, folder: Path, settings: RegistrationSettings) -> dict:
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}{_STAGING}", dir=folder.parent))
    try:
        summary = register_files(
            pair["fixed"], pair["moving"], staging, pair.get("fixed_landmarks"), pair.get("moving_landmarks"),
            settings,
        )  # fmt: skip
        summary["inputs"] = inputs
        atomic_write_text(staging / REPORT, json.dumps(summary, indent=2, default=str) + "\n")
        staging.chmod(_folder_mode())
        _move_into_place(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return summary


def _row(name: str, inputs: Mapping, summary: Mapping) -> dict:
    tre = summary.get("tre_mm", {})
    return {
        "pair": name,
        "tre_before_mm": tre.get("before", {}).get("mean"),
        "tre_prealign_mm": tre.get("prealign", {}).get("mean"),
        "tre_after_mm": tre.get("after", {}).get("mean"),
        "tre_after_snapped_mm": tre.get("after_snapped", {}).get("mean"),
        "folding_percent_in_lungs": summary["jacobian"]["folding_percent_in_lungs"],
        "seconds": round(sum(summary["timings_s"].values()), 1),
        "fixed": inputs["fixed"],
        "moving": inputs["moving"],
    }


def _write_summary(path: Path, rows: Sequence[dict]) -> None:
    header = list(rows[0]) if rows else ["pair"]

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows([["" if row[key] is None else row[key] for key in header] for row in rows])

    atomic_write(path, write)


def register_pairs(
    pairs: Sequence[Mapping], output_dir: str | os.PathLike, settings: RegistrationSettings | None = None
) -> list[dict]:
    """Register every pair (``fixed``, ``moving``, optional ``fixed_landmarks`` / ``moving_landmarks`` and
    ``name``) into ``output_dir/<name>/``, skipping the pairs already done (see the module notes).

    Also writes ``output_dir/summary.csv`` (one row per pair, in datalist order: its folder, mean TRE before / after
    pre-alignment / after, folding in the lungs, seconds, and its fixed and moving files) and returns the rows.
    """
    settings = settings or RegistrationSettings()
    wanted = _comparable(asdict(settings))
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    reports: dict[str, dict | None] = {}
    for folder in sorted(output_dir.iterdir()):
        if folder.is_dir() and folder.name.startswith(".") and _STAGING in folder.name:
            shutil.rmtree(folder, ignore_errors=True)  # left by a killed run
        elif folder.is_dir() and not folder.name.startswith("."):
            reports[folder.name] = _report(folder)
    by_inputs: dict[str, str] = {}
    for name, report in reports.items():
        if report is not None and isinstance(report.get("inputs"), dict):
            by_inputs.setdefault(json.dumps(report["inputs"], sort_keys=True), name)

    inputs = [pair_inputs(pair) for pair in pairs]
    keys = [json.dumps(record, sort_keys=True) for record in inputs]
    names: list[str | None] = [by_inputs.get(key) for key in keys]
    unavailable = {name for name, report in reports.items() if report is not None} | {n for n in names if n}
    for index, pair in enumerate(pairs):
        if names[index] is None:
            earlier = [names[i] for i in range(index) if keys[i] == keys[index]]  # the same pair listed twice
            names[index] = earlier[0] if earlier else _free_name(_base_name(pair, index), unavailable)
            unavailable.add(names[index])

    rows = []
    for pair, record, name in zip(pairs, inputs, names, strict=True):
        report = reports.get(name)
        done = report is not None and report.get("inputs") == record and _comparable(report.get("settings")) == wanted
        if not done:
            report = reports[name] = _register(pair, record, output_dir / name, settings)
        rows.append(_row(name, record, report))
    _write_summary(output_dir / "summary.csv", rows)
    return rows
