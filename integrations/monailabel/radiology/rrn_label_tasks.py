"""MONAI Label infer tasks of the radiology app: lung masks and the registration of a lung CT pair.

``lung`` (:class:`LungSegmentation`)
    The automatic lung mask of :func:`rrn_lung_registration.lung_mask.lung_mask` (threshold, outside-air
    removal, components, closing, hole filling; no trained weights). Returns a ``uint8`` label image on the
    study's own grid and geometry (1 = lung).

``registration`` (:class:`LungPairRegistration`)
    Registers a study pair with :class:`rrn_lung_registration.pipeline.LungRegistration` and writes the
    pipeline's outputs (:func:`rrn_lung_registration.pipeline.write_outputs`) into a cache folder, one folder per
    pair, input files and settings; the request's ``result`` picks the file returned (:data:`RESULTS`: the warped
    moving image, the Jacobian determinant map, the displacement field or the fixed lung mask), all on the fixed
    study's grid. Asking for a second file of the same pair reuses the cached registration.

Pairing (:class:`Pairing`): the moving and the fixed study of a request are

* the request's ``image`` as moving and its ``fixed`` parameter (a study id) as fixed, when ``fixed`` is given;
* otherwise by name: ``<case><moving_suffix>`` (moving, default ``_exhale``) is registered onto
  ``<case><fixed_suffix>`` (fixed, default ``_inhale``), whichever of the two the request names (the DIR-Lab
  convention: exhale onto inhale; both requests give the same registration).

A request that cannot be answered raises :class:`RequestError` (a ``ValueError``) naming the study:
:class:`StudyNotFoundError` when a study (or its paired study) is not in the datastore, the base class for a
name without a pairing suffix, an unknown ``result`` and the like. The app (``main.py``) turns them into HTTP
404 / 400 responses carrying the message.

Every file the tasks write goes through :mod:`shared_ops.atomic` (``write_image`` and ``write_outputs`` of the
package use it too): a result is either complete under its name or absent.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from monai.data.utils import affine_to_spacing
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from rrn_lung_registration import ct_io, pipeline
from rrn_lung_registration import lung_mask as lung_masking
from shared_ops.atomic import atomic_write

__all__ = [
    "RESULTS",
    "LungPairRegistration",
    "LungSegmentation",
    "Pairing",
    "RequestError",
    "StudyNotFoundError",
    "registration_settings",
    "study_id",
]

logger = logging.getLogger(__name__)

#: ``result`` values of the registration task -> the pipeline's output file returned (on the fixed study's grid).
RESULTS = {
    "warped": "warped_moving.nii.gz",
    "jacobian": "jacobian_determinant.nii.gz",
    "displacement": "displacement_field.nii",
    "fixed_lung_mask": "fixed_lung_mask.nii.gz",
}

#: Image suffixes stripped from a file name to get its study id (as MONAI Label's local datastore does).
_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".dcm")

StudyLookup = Callable[[str], "str | None"]
"""A study id -> the path of its image (file or DICOM folder), or ``None`` when the datastore has no such study."""


class RequestError(ValueError):
    """A request the task cannot answer; the message names the study and what was expected."""


class StudyNotFoundError(RequestError):
    """A study of the request (or its paired study) is not in the datastore."""


def study_id(request: Mapping[str, Any]) -> str:
    """The study id of a request: ``request["study"]`` (set by the app), else the image file's name without suffix."""
    study = request.get("study")
    if study:
        return str(study)
    name = Path(str(request.get("image", ""))).name
    for suffix in _IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _image_path(request: Mapping[str, Any], study: str) -> Path:
    image = request.get("image")
    if not isinstance(image, str) or not image:
        raise StudyNotFoundError(f"study {study!r}: no image file for it (is it in the datastore?)")
    path = Path(image)
    if not path.exists():
        raise StudyNotFoundError(f"study {study!r}: its image {path} does not exist")
    return path


def _result_path(prefix: str, suffix: str = ".nii.gz") -> Path:
    """A fresh name in the temporary folder; MONAI Label deletes the returned result once it has been sent."""
    return Path(tempfile.gettempdir()) / f"{prefix}-{uuid.uuid4().hex}{suffix}"


def _latencies(start: float, stages: Mapping[str, float]) -> dict[str, float]:
    out = {name: round(seconds, 3) for name, seconds in stages.items()}
    out["total"] = round(time.perf_counter() - start, 3)
    return out


# ------------------------------------------------------------------------------------------------------ lung


class LungSegmentation(InferTask):
    """``lung``: the lung mask of a CT study in HU (no weights); a ``uint8`` label (1 = lung) on the study's grid.

    Result params: ``label_names`` (``{"lung": 1}``, read by 3D Slicer), ``lung_volume_litres``, ``shape``,
    ``spacing_mm`` and ``latencies`` (seconds).
    """

    def __init__(self, description: str = "Lung mask of a chest CT in HU (threshold-based, no trained weights)"):
        super().__init__(type=InferType.SEGMENTATION, labels={"lung": 1}, dimension=3, description=description)

    def is_valid(self) -> bool:
        return True

    def __call__(self, request: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
        start = time.perf_counter()
        study = study_id(request)
        path = _image_path(request, study)
        image = ct_io.read_ct(path)
        read_s = time.perf_counter() - start
        affine = image.affine.detach().cpu().numpy().astype(np.float64)
        spacing = affine_to_spacing(affine, r=3)
        mask = lung_masking.lung_mask(
            image.as_tensor().numpy(),
            spacing,
            axial_axis=lung_masking.axial_axis_from_affine(affine),
            source=f"study {study!r} ({path})",
        )
        mask_s = time.perf_counter() - start - read_s
        output = _result_path("lung")
        ct_io.write_image(output, mask.astype(np.uint8), affine)
        params = {
            "label_names": {"lung": 1},
            "study": study,
            "lung_volume_litres": round(lung_masking.lung_volume_litres(mask, spacing), 4),
            "shape": list(mask.shape),
            "spacing_mm": [float(s) for s in spacing],
            "latencies": _latencies(start, {"pre": read_s, "infer": mask_s}),
        }
        return str(output), params


# ---------------------------------------------------------------------------------------------- registration


@dataclass(frozen=True)
class Pairing:
    """The naming rule pairing studies: ``<case><moving_suffix>`` is registered onto ``<case><fixed_suffix>``."""

    moving_suffix: str = "_exhale"
    fixed_suffix: str = "_inhale"

    def __post_init__(self) -> None:
        if not self.moving_suffix or not self.fixed_suffix or self.moving_suffix == self.fixed_suffix:
            raise ValueError(
                f"pairing suffixes must be two different non-empty strings, got {self.moving_suffix!r} and "
                f"{self.fixed_suffix!r}"
            )

    def rule(self) -> str:
        return f"'<case>{self.moving_suffix}' is registered onto '<case>{self.fixed_suffix}'"

    def pair(self, study: str, fixed: str | None = None) -> tuple[str, str]:
        """``(moving, fixed)`` study ids for a request on ``study`` (with an explicit ``fixed`` study, or by name)."""
        if fixed:
            if fixed == study:
                raise RequestError(
                    f"study {study!r}: 'fixed' names the study itself; give another study to register onto"
                )
            return study, fixed
        for own, other, moving_first in (
            (self.moving_suffix, self.fixed_suffix, True),
            (self.fixed_suffix, self.moving_suffix, False),
        ):
            if study.endswith(own) and len(study) > len(own):
                partner = study[: -len(own)] + other
                return (study, partner) if moving_first else (partner, study)
        raise RequestError(
            f"study {study!r} has no paired study: its name ends in neither {self.moving_suffix!r} nor "
            f"{self.fixed_suffix!r} (pairing rule: {self.rule()}); name the study to register onto with the "
            "request parameter 'fixed'"
        )


def _conf_value(conf: Mapping[str, Any], key: str, parse: Callable[[str], Any], expected: str) -> Any:
    value = conf.get(key)
    if value is None or value == "":
        return None
    try:
        return parse(str(value))
    except ValueError:
        raise ValueError(f"--conf {key} {value!r}: expected {expected}") from None


def _ints(text: str) -> int | tuple[int, ...]:
    values = tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    if not values:
        raise ValueError(text)
    return values[0] if len(values) == 1 else values


def registration_settings(conf: Mapping[str, Any]) -> pipeline.RegistrationSettings:
    """The pipeline's ``RegistrationSettings`` from the app's ``--conf`` values (its defaults for the keys not given).

    Keys: ``registration_steps`` (the pipeline's ``instance_steps``: without weights at most this many steps per
    level, with weights the instance-optimisation steps), ``registration_prealign`` (``affine``, ``rigid``,
    ``none``), ``registration_prealign_iterations``, ``registration_weights`` (trained RRN weights, a file),
    ``device``, and with weights ``registration_grid`` (``128`` or ``128,128,96``) and ``registration_factors``
    (instance-optimisation levels, e.g. ``4,2``).

    Raises:
        ValueError: a value that does not parse or that the pipeline refuses, naming the key.
    """
    options: dict[str, Any] = {}
    grid = _conf_value(conf, "registration_grid", _ints, "one size or three comma-separated sizes")
    if grid is not None:
        options["grid_size"] = grid
    steps = _conf_value(conf, "registration_steps", int, "a whole number of steps")
    if steps is not None:
        options["instance_steps"] = steps
    factors = _conf_value(conf, "registration_factors", _ints, "comma-separated block factors, e.g. 4,2")
    if factors is not None:
        options["instance_factors"] = (factors,) if isinstance(factors, int) else factors
    iterations = _conf_value(conf, "registration_prealign_iterations", int, "a whole number of iterations")
    if iterations is not None:
        options["prealign_iterations"] = iterations
    for key, name in (("registration_prealign", "prealign"), ("registration_weights", "weights"), ("device", "device")):
        if conf.get(key):
            options[name] = str(conf[key])
    settings = pipeline.RegistrationSettings(**options)
    try:
        settings.check()
    except ValueError as error:
        raise ValueError(f"registration settings from --conf {options}: {error}") from None
    return settings


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:80]


def _file_key(path: Path) -> list:
    """What identifies the content of an input (a file, or a DICOM folder's files) without reading it."""
    if path.is_dir():
        entries = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir() if p.is_file())
        return [str(path.resolve()), entries]
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


class LungPairRegistration(InferTask):
    """``registration``: register a study pair (see the module notes for the pairing) and return one output file.

    Args:
        find_study: study id -> image path, or ``None`` when the datastore has no such study.
        cache_dir: where each registered pair's outputs are kept (one folder per pair, inputs and settings).
        settings: the pipeline's settings (the server's ``--conf``, see :func:`registration_settings`).
        pairing: the naming rule for requests without a ``fixed`` parameter.

    Request parameters: ``fixed`` (a study id: register the request's study onto it), ``result`` (one of
    :data:`RESULTS`, default ``warped``). Result params: ``moving``, ``fixed``, ``result``, ``results`` (the
    choices), ``cached`` (whether the registration was reused), ``jacobian`` (statistics of ``det D phi``:
    min, max, mean in the lungs, folding), ``warnings``, ``timings_s`` (registration stages) and ``latencies``.
    """

    def __init__(
        self,
        find_study: StudyLookup,
        cache_dir: str | os.PathLike,
        settings: pipeline.RegistrationSettings | None = None,
        pairing: Pairing | None = None,
        description: str = "Registers <case>_exhale onto <case>_inhale (or onto the study given as 'fixed')",
    ) -> None:
        self.settings = settings or pipeline.RegistrationSettings()
        self.registration = pipeline.LungRegistration(
            self.settings
        )  # checks the settings now, not at the first request
        self.pairing = pairing or Pairing()
        self.find_study = find_study
        self.cache_dir = Path(cache_dir)
        self._lock = threading.Lock()
        config = {"fixed": "", "result": "warped"}
        super().__init__(type=InferType.OTHERS, labels=[], dimension=3, description=description, config=config)

    def is_valid(self) -> bool:
        return True

    def info(self) -> dict[str, Any]:
        info = super().info()
        info["pairing"] = {
            "moving_suffix": self.pairing.moving_suffix,
            "fixed_suffix": self.pairing.fixed_suffix,
            "rule": self.pairing.rule(),
        }
        info["results"] = dict(RESULTS)
        return info

    def _locate(self, study: str, role_study: str, role: str, given: bool) -> Path:
        path = self.find_study(role_study)
        if path:
            return Path(path)
        if role_study == study:
            raise StudyNotFoundError(f"study {study!r} is not in the datastore")
        if given:
            raise StudyNotFoundError(
                f"study {study!r}: the fixed study {role_study!r} given in the request is not in the datastore"
            )
        raise StudyNotFoundError(
            f"study {study!r}: its paired {role} study {role_study!r} is not in the datastore (pairing rule: "
            f"{self.pairing.rule()}); add it, or name the study to register onto with the request parameter 'fixed'"
        )

    def resolve(self, request: Mapping[str, Any]) -> tuple[tuple[str, Path], tuple[str, Path]]:
        """``((moving id, path), (fixed id, path))`` of a request; raises :class:`RequestError` naming the study."""
        study = study_id(request)
        fixed_given = str(request.get("fixed") or "").strip() or None
        moving_id, fixed_id = self.pairing.pair(study, fixed_given)
        own = _image_path(request, study)
        moving = own if moving_id == study else self._locate(study, moving_id, "moving", False)
        fixed = own if fixed_id == study else self._locate(study, fixed_id, "fixed", fixed_given is not None)
        for name, path in ((moving_id, moving), (fixed_id, fixed)):
            if not path.exists():
                raise StudyNotFoundError(f"study {study!r}: the image of study {name!r} ({path}) does not exist")
        return (moving_id, moving), (fixed_id, fixed)

    def output_folder(self, moving: tuple[str, Path], fixed: tuple[str, Path]) -> Path:
        """The cache folder of a pair: named by the study ids, keyed by the input files and the settings."""
        key = json.dumps(
            {"moving": _file_key(moving[1]), "fixed": _file_key(fixed[1]), "settings": asdict(self.settings)},
            sort_keys=True,
            default=str,
        )
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        return self.cache_dir / f"{_safe(moving[0])}__onto__{_safe(fixed[0])}__{digest}"

    def register(self, moving: tuple[str, Path], fixed: tuple[str, Path]) -> tuple[Path, bool]:
        """Register the pair unless its outputs are cached; returns ``(folder, cached)``."""
        folder = self.output_folder(moving, fixed)
        with self._lock:
            if (folder / "registration.json").is_file():
                return folder, True
            fixed_image = ct_io.read_ct(fixed[1])
            moving_image = ct_io.read_ct(moving[1])
            fixed_image.meta["filename_or_obj"] = f"study {fixed[0]!r} ({fixed[1]})"
            moving_image.meta["filename_or_obj"] = f"study {moving[0]!r} ({moving[1]})"
            logger.info("registering %s onto %s -> %s", moving[0], fixed[0], folder)
            result = self.registration.register(fixed_image, moving_image)
            pipeline.write_outputs(result, fixed_image, moving_image, folder, settings=self.settings)
        return folder, False

    def __call__(self, request: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
        start = time.perf_counter()
        choice = str(request.get("result") or "warped")
        if choice not in RESULTS:
            raise RequestError(
                f"study {study_id(request)!r}: unknown result {choice!r}; expected one of {', '.join(RESULTS)}"
            )
        moving, fixed = self.resolve(request)
        folder, cached = self.register(moving, fixed)
        registered_s = time.perf_counter() - start
        source = folder / RESULTS[choice]
        suffix = ".nii.gz" if source.name.endswith(".nii.gz") else source.suffix  # the field is plain .nii
        output = _result_path(f"registration-{choice}", suffix)
        atomic_write(output, lambda tmp: shutil.copyfile(source, tmp))
        summary = json.loads((folder / "registration.json").read_text())
        params = {
            "moving": moving[0],
            "fixed": fixed[0],
            "result": choice,
            "results": list(RESULTS),
            "cached": cached,
            "jacobian": summary.get("jacobian"),
            "warnings": summary.get("warnings", []),
            "timings_s": summary.get("timings_s", {}),
            "latencies": _latencies(start, {"infer": registered_s}),
        }
        return str(output), params
