"""MONAI Label radiology app: lung masks and exhale/inhale registration of lung CT (``rrn_lung_registration``).

Start it with ``monailabel start_server --app integrations/monailabel/radiology --studies STUDIES`` (see the
README next to this folder for the ``--conf`` keys and the pairing rule). Models: ``lung`` and ``registration``
(:mod:`rrn_label_tasks`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from fastapi import HTTPException
from monailabel.interfaces.app import MONAILabelApp
from rrn_label_tasks import (
    LungPairRegistration,
    LungSegmentation,
    Pairing,
    RequestError,
    StudyNotFoundError,
    registration_settings,
)

logger = logging.getLogger(__name__)


class RadiologyApp(MONAILabelApp):
    """Models ``lung`` and ``registration``; a bad request is answered with HTTP 404 / 400 and a message naming the
    study instead of a result.

    ``conf`` keys (``--conf KEY VALUE``): ``moving_suffix`` / ``fixed_suffix`` (pairing rule, default ``_exhale`` /
    ``_inhale``), ``cache_dir`` (registration outputs, default ``<app>/cache``), and the registration settings of
    :func:`rrn_label_tasks.registration_settings` (``registration_grid``, ``registration_steps``, ...).
    """

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]):
        conf = conf or {}
        self.pairing = Pairing(conf.get("moving_suffix", "_exhale"), conf.get("fixed_suffix", "_inhale"))
        self.registration_settings = registration_settings(conf)
        self.cache_dir = Path(conf.get("cache_dir") or os.path.join(app_dir, "cache"))
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="RRN lung CT",
            description="Lung masks and exhale/inhale registration of lung CT (monai-rrn-roigan)",
            version="0.1.0",
        )

    def init_infers(self):
        return {
            "lung": LungSegmentation(),
            "registration": LungPairRegistration(
                self.find_study, self.cache_dir, self.registration_settings, self.pairing
            ),
        }

    def find_study(self, study: str) -> str | None:
        """The image path of a datastore study id, or ``None`` when there is no such study."""
        return self.datastore().get_image_uri(study) or None

    def _check_study(self, request, datastore) -> dict:
        request = dict(request)
        image = request.get("image")
        if isinstance(image, str) and image and not os.path.exists(image):
            if not (datastore or self.datastore()).get_image_uri(image):
                raise HTTPException(status_code=404, detail=f"study {image!r} is not in the datastore ({self.studies})")
            request.setdefault("study", image)
        return request

    def infer(self, request, datastore=None):
        try:
            return super().infer(self._check_study(request, datastore), datastore)
        except (StudyNotFoundError, FileNotFoundError) as error:
            raise HTTPException(status_code=404, detail=str(error)) from error
        except (RequestError, ValueError) as error:  # the package's ValueErrors name the file and what was expected
            raise HTTPException(status_code=400, detail=str(error)) from error
