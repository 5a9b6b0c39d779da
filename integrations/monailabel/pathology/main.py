"""MONAI Label pathology app: virtual-DAB-positive regions of H&E slide regions (``roigan_stain_transfer``).

Start it with ``monailabel start_server --app integrations/monailabel/pathology --studies SLIDES --conf generator
CHECKPOINT`` (see the README next to this folder). Model: ``virtual_dab`` (:mod:`roigan_label_tasks`), drawn by
MONAI Label's QuPath extension.
"""

from __future__ import annotations

import logging
import os

from fastapi import HTTPException
from monailabel.interfaces.app import MONAILabelApp
from roigan_label_tasks import RequestError, StudyNotFoundError, VirtualDabRegions, region_settings

logger = logging.getLogger(__name__)

_NETWORK_KEYS = {"num_blocks": int, "base_channels": int, "upsampling": str}


class PathologyApp(MONAILabelApp):
    """Model ``virtual_dab``; a bad request is answered with HTTP 404 / 400 and a message naming the study.

    ``conf`` keys (``--conf KEY VALUE``): ``generator`` (checkpoint with ``g_xy``, default
    ``<app>/model/generator.pt``), ``num_blocks`` / ``base_channels`` / ``upsampling`` (the generator's sizes, default
    what the checkpoint records, else the paper's 9 / 64 / transposed) and the region settings of
    :func:`roigan_label_tasks.region_settings` (``mpp``, ``tile_size``, ``overlap``, ...).
    """

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]):
        conf = conf or {}
        self.generator_weights = conf.get("generator") or os.path.join(app_dir, "model", "generator.pt")
        self.network = {}
        for key, kind in _NETWORK_KEYS.items():
            if conf.get(key):
                try:
                    self.network[key] = kind(conf[key])
                except ValueError:
                    raise ValueError(f"--conf {key} {conf[key]!r}: expected a {kind.__name__}") from None
        self.region_settings = region_settings(conf)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="RoI-CycleGAN virtual IHC",
            description="Virtual-DAB-positive regions of H&E slides (monai-rrn-roigan)",
            version="0.1.0",
        )

    def init_infers(self):
        task = VirtualDabRegions(weights=self.generator_weights, network=self.network, settings=self.region_settings)
        if not task.is_valid():
            logger.warning(
                "virtual_dab is not offered: no generator checkpoint at %s (train one with the roigan_stain_transfer "
                "bundle, then pass --conf generator FILE or copy it there)",
                self.generator_weights,
            )
        return {"virtual_dab": task}

    def _check_study(self, request, datastore) -> dict:
        request = dict(request)
        image = request.get("image")
        if isinstance(image, str) and image and not os.path.exists(image):
            if not (datastore or self.datastore()).get_image_uri(image):
                raise HTTPException(status_code=404, detail=f"study {image!r} is not in the datastore ({self.studies})")
            request.setdefault("study", image)
        return request

    def _answer(self, run, request, datastore):
        try:
            return run(self._check_study(request, datastore), datastore)
        except (StudyNotFoundError, FileNotFoundError) as error:
            raise HTTPException(status_code=404, detail=str(error)) from error
        except (RequestError, ValueError) as error:  # the package's ValueErrors name the file and what was expected
            raise HTTPException(status_code=400, detail=str(error)) from error

    def infer(self, request, datastore=None):
        return self._answer(super().infer, request, datastore)

    def infer_wsi(self, request, datastore=None):
        return self._answer(super().infer_wsi, request, datastore)
