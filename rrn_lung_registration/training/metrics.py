"""Target registration error as an Ignite metric, and a handler that writes the per-pair TRE report."""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.metrics import Metric

from rrn_lung_registration.io.landmarks import landmark_errors, summarize_errors
from rrn_lung_registration.training.data import IMAGE_KEYS, LANDMARK_KEYS
from shared_ops.atomic import atomic_write

__all__ = ["TargetRegistrationError", "TREReportWriter"]

logger = logging.getLogger(__name__)

STAGES = ("before", "after", "after_snapped")
STATS = ("mean", "std", "p95", "max")


def _items(output) -> list[Mapping]:
    """Per-pair dicts from an engine output: a list of dicts (decollated) or one dict of batches."""
    if isinstance(output, Mapping):
        batch = len(output["pred"])
        return [{key: value[i] for key, value in output.items() if _is_batched(value, batch)} for i in range(batch)]
    return list(output)


def _is_batched(value, batch: int) -> bool:
    return isinstance(value, (torch.Tensor, list, tuple)) and len(value) == batch


def _name(item: Mapping, key: str) -> str:
    meta = getattr(item.get(key), "meta", {}) or {}
    return str(meta.get("filename_or_obj", ""))


class TargetRegistrationError(Metric):
    """Mean TRE in mm over the pairs that have landmarks (each pair: mean over its landmarks).

    The iteration output must hold ``pred`` (ddf, voxels), the ``moving`` image (a MetaTensor: its affine
    gives the millimetres) and voxel landmarks ``fixed_landmarks`` / ``moving_landmarks``
    (:class:`rrn_lung_registration.training.data.LandmarksToVoxeld`). Pairs without landmarks are skipped; with none
    at all the metric is NaN. Distributed runs reduce over all ranks.

    Args:
        snap_to_voxel: DIR-Lab style TRE (landmarks and carried points rounded to voxels).
        output_transform: ignite's hook applied to the engine output before :meth:`update`.
    """

    def __init__(
        self,
        snap_to_voxel: bool = False,
        output_transform: Callable = lambda x: x,
        device: str | torch.device = "cpu",
    ) -> None:
        self.snap_to_voxel = snap_to_voxel
        self.records: list[dict] = []
        super().__init__(output_transform=output_transform, device=device)

    def reset(self) -> None:
        self.records = []

    def update(self, output) -> None:
        for item in _items(output):
            if not all(key in item for key in LANDMARK_KEYS):
                continue
            moving = item[IMAGE_KEYS[1]]
            fixed_points, moving_points = (item[key].detach().cpu().numpy() for key in LANDMARK_KEYS)
            before = landmark_errors(None, fixed_points, moving_points, moving.affine)
            after = landmark_errors(item["pred"], fixed_points, moving_points, moving.affine)
            snapped = landmark_errors(item["pred"], fixed_points, moving_points, moving.affine, snap_to_voxel=True)
            self.records.append(
                {
                    "fixed": _name(item, IMAGE_KEYS[0]),
                    "moving": _name(item, IMAGE_KEYS[1]),
                    "before": summarize_errors(before),
                    "after": summarize_errors(after),
                    "after_snapped": summarize_errors(snapped),
                    "errors": after.tolist(),
                }
            )

    def compute(self) -> float:
        key = "after_snapped" if self.snap_to_voxel else "after"
        values = torch.tensor([sum(r[key]["mean"] for r in self.records), len(self.records)], dtype=torch.float64)
        total, count = idist.all_reduce(values).tolist() if idist.get_world_size() > 1 else values.tolist()
        if count == 0:
            logger.warning("no validation pair has landmarks: TRE is undefined (NaN).")
            return float("nan")
        return total / count


class TREReportWriter:
    """At the end of an evaluation, write ``tre_per_pair.csv`` and ``tre_summary.json`` into ``output_dir``.

    Reads the records of a :class:`TargetRegistrationError` attached to the same engine. Each CSV row is a
    pair: mean / std / p95 / max before registration, after (sub-voxel) and after (snap-to-voxel). The
    summary holds the mean and std over pairs of each pair's mean, and the pooled per-landmark statistics.
    """

    def __init__(self, metric: TargetRegistrationError, output_dir: str | os.PathLike) -> None:
        self.metric = metric
        self.output_dir = Path(output_dir)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        records = self.metric.records
        if not records:
            logger.warning("no pair with landmarks: no TRE report written.")
            return
        columns = ["fixed", "moving", "landmarks"] + [f"{stage}_{stat}" for stage in STAGES for stat in STATS]

        def write_csv(tmp: Path) -> None:
            with open(tmp, "w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(columns)
                for r in records:
                    stats = [f"{r[stage][stat]:.4f}" for stage in STAGES for stat in STATS]
                    writer.writerow([r["fixed"], r["moving"], r["after"]["count"], *stats])

        summary = {"pairs": len(records), "unit": "mm"}
        for stage in STAGES:
            means = np.array([r[stage]["mean"] for r in records])
            summary[stage] = {"mean_of_pair_means": float(means.mean()), "std_of_pair_means": float(means.std())}
        summary["after"]["landmarks"] = summarize_errors(np.concatenate([r["errors"] for r in records]))
        atomic_write(self.output_dir / "tre_per_pair.csv", write_csv)
        atomic_write(self.output_dir / "tre_summary.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2)))
        logger.info(f"TRE report written to {self.output_dir}: mean {summary['after']['mean_of_pair_means']:.3f} mm")
