"""MONAI Deploy application: register an exhale CT to an inhale CT with the RRN bundle's TorchScript model.

Written for the MONAI Deploy App SDK 4.x API (Holoscan operators; see ``../README.md`` for the SDK versions).
Three operators:

1. ``PairLoaderOperator`` reads ``fixed.*`` and ``moving.*`` (any format MONAI's ``LoadImage`` reads: NIfTI,
   MHA, NRRD, ...) from the input folder and builds the 2-channel ``image`` with the bundle's own ``loading``
   entry (read from ``extra/inference.json`` inside the model file): the moving image resampled onto the fixed
   grid, channel 0 moving, channel 1 fixed, the fixed image's geometry.
2. ``RegistrationBundleOperator``, the SDK's ``MonaiBundleInferenceOperator``: the bundle's ``preprocessing``
   (reorientation, crop to the fixed lung box, HU window, resize to the network grid), ``inferer`` and
   ``postprocessing`` on ``image``; ``pred`` is the displacement field on the network grid, ``warped`` the moving
   image warped and resampled back onto the fixed image's grid.
3. ``RegistrationWriterOperator`` writes ``<pair>_ddf.nii.gz`` and ``<pair>_warped.nii.gz`` into the output
   folder, the files the bundle's ``inference.json`` writes.

Run: ``python app.py -i INPUT_FOLDER -o OUTPUT_FOLDER -m model.ts`` (or the folder: ``python . -i ...``).
A failure in any operator ends the run with a non-zero exit code; the two output files appear together, at the end.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from monai.deploy.conditions import CountCondition
from monai.deploy.core import AppContext, Application, Fragment, Image, IOType, Operator, OperatorSpec
from monai.deploy.operators.monai_bundle_inference_operator import (
    IOMapping,
    MonaiBundleInferenceOperator,
    get_bundle_config,
)

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")


def _meta_dict(value) -> dict:
    """The metadata of a MONAI ``MetaTensor`` as a plain dict for an SDK ``Image`` (affine as a numpy array)."""
    meta = dict(getattr(value, "meta", {}) or {})
    for key in ("affine", "original_affine"):
        if isinstance(meta.get(key), torch.Tensor):
            meta[key] = meta[key].detach().cpu().numpy()
    return meta


def _as_image(value) -> Image:
    return Image(value.detach().cpu().numpy(), metadata=_meta_dict(value))


def _find(folder: Path, stem: str) -> Path:
    found = [p for p in sorted(folder.iterdir()) if p.name.startswith(stem) and p.name.endswith(IMAGE_SUFFIXES)]
    if len(found) != 1:
        raise FileNotFoundError(
            f"{folder}: expected one {stem}.* image ({', '.join(IMAGE_SUFFIXES)}), found {[p.name for p in found]}."
        )
    return found[0]


def model_path(app_context: AppContext) -> Path:
    """The bundle's TorchScript file the application was given (``-m`` or ``HOLOSCAN_MODEL_PATH``)."""
    model = app_context.models.get() if app_context.models else None
    if model is None:
        raise FileNotFoundError(
            f"{app_context.model_path}: no TorchScript model found; pass the bundle's models/model.ts "
            "(python -m monai.bundle ckpt_export) with -m."
        )
    return Path(model.path)


class PairLoaderOperator(Operator):
    """``fixed.*`` and ``moving.*`` of the input folder -> the 2-channel ``image`` (bundle ``loading`` entry).

    Named output:
        image: ``Image`` (2, X, Y, Z) float32, channel 0 moving, 1 fixed, with the fixed image's metadata.
    """

    def __init__(self, fragment: Fragment, *args, input_folder: Path, bundle_path: Path, **kwargs):
        self.input_folder = Path(input_folder)
        self.bundle_path = Path(bundle_path)
        super().__init__(fragment, *args, **kwargs)  # last: it calls setup

    def setup(self, spec: OperatorSpec):
        spec.output("image")

    def compute(self, op_input, op_output, context):
        folder = self.input_folder
        if not folder.is_dir():
            raise NotADirectoryError(f"{folder}: the input must be a folder holding fixed.* and moving.*.")
        pair = {"fixed": str(_find(folder, "fixed")), "moving": str(_find(folder, "moving")), "name": folder.name}
        loading = get_bundle_config(str(self.bundle_path), ["inference"]).get_parsed_content("loading")
        op_output.emit(_as_image(loading(pair)["image"]), "image")


class RegistrationBundleOperator(MonaiBundleInferenceOperator):
    """The SDK's bundle operator, with what a registration bundle needs on top of it.

    - ``pred`` (a displacement field in voxels, float) and ``warped`` go out as float ``Image`` objects with
      their metadata: the SDK's own output step casts every ``image`` output to uint8 and swaps its axes, as for
      a single-channel segmentation.
    - ``warped`` (made by the bundle's ``postprocessing``) is emitted as a second output.
    """

    def post_process(self, data, *args, **kwargs):
        outputs = super().post_process(data, *args, **kwargs)
        self._warped = outputs["warped"]
        return outputs

    def compute(self, op_input, op_output, context):
        super().compute(op_input, op_output, context)
        op_output.emit(_as_image(self._warped), "warped")

    def _send_output(self, value, name, metadata, op_output, context):
        op_output.emit(_as_image(value), name)


class RegistrationWriterOperator(Operator):
    """``<pair>_ddf.nii.gz`` (network grid) and ``<pair>_warped.nii.gz`` (fixed image's grid) in the output folder.

    Named inputs:
        pred, warped: ``Image`` objects with MONAI metadata (affine, file names).
    """

    def __init__(self, fragment: Fragment, *args, output_folder: Path, **kwargs):
        self.output_folder = Path(output_folder)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input("pred")
        spec.input("warped")

    def compute(self, op_input, op_output, context):
        from monai.data import MetaTensor
        from monai.transforms import SaveImage

        from rrn_lung_registration.training.data import pair_name_formatter

        images = {name: op_input.receive(name) for name in ("pred", "warped")}
        self.output_folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.output_folder, prefix=".staging-") as staging:
            for name, postfix in (("pred", "ddf"), ("warped", "warped")):
                image = images[name]
                value = MetaTensor(torch.as_tensor(np.asarray(image.asnumpy())), meta=dict(image.metadata()))
                SaveImage(
                    output_dir=staging,
                    output_postfix=postfix,
                    output_name_formatter=pair_name_formatter,
                    separate_folder=False,
                    resample=False,
                    print_log=False,
                )(value)
            for written in sorted(Path(staging).iterdir()):
                os.replace(written, self.output_folder / written.name)


class RRNRegistrationApp(Application):
    """Exhale-to-inhale lung CT registration with the RRN bundle (model.ts from ``ckpt_export``)."""

    def compose(self):
        app_context = Application.init_app_context(self.argv)
        loader = PairLoaderOperator(
            self, CountCondition(self, 1), input_folder=Path(app_context.input_path),
            bundle_path=model_path(app_context), name="pair_loader",
        )  # fmt: skip
        registration = RegistrationBundleOperator(
            self,
            input_mapping=[IOMapping("image", Image, IOType.IN_MEMORY)],
            output_mapping=[IOMapping("pred", Image, IOType.IN_MEMORY), IOMapping("warped", Image, IOType.IN_MEMORY)],
            app_context=app_context,
            name="registration",
        )
        writer = RegistrationWriterOperator(self, output_folder=Path(app_context.output_path), name="writer")
        self.add_flow(loader, registration, {("image", "image")})
        self.add_flow(registration, writer, {("pred", "pred"), ("warped", "warped")})


if __name__ == "__main__":
    RRNRegistrationApp().run()
