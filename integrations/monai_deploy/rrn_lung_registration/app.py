"""MONAI Deploy application: register an exhale CT to an inhale CT with the RRN bundle's TorchScript model.

Written for the MONAI Deploy App SDK 0.5.x API (see README.md for why and for SDK >= 0.6). Three operators:

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

Run: ``python app.py -i INPUT_FOLDER -o OUTPUT_FOLDER -m model.ts`` (or ``monai-deploy exec app.py ...``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import monai.deploy.core as md
import numpy as np
import torch
from monai.deploy.core import Application, DataPath, ExecutionContext, Image, InputContext, IOType, OutputContext
from monai.deploy.operators import monai_bundle_inference_operator as bundle_operator
from monai.deploy.operators.monai_bundle_inference_operator import IOMapping, MonaiBundleInferenceOperator

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")


def _meta_dict(value) -> dict:
    """The metadata of a MONAI ``MetaTensor`` as a plain dict for an SDK ``Image`` (affine as a numpy array)."""
    meta = dict(getattr(value, "meta", {}) or {})
    for key in ("affine", "original_affine"):
        if isinstance(meta.get(key), torch.Tensor):
            meta[key] = meta[key].detach().cpu().numpy()
    return meta


def _find(folder: Path, stem: str) -> Path:
    found = [p for p in sorted(folder.iterdir()) if p.name.startswith(stem) and p.name.endswith(IMAGE_SUFFIXES)]
    if len(found) != 1:
        raise FileNotFoundError(
            f"{folder}: expected one {stem}.* image ({', '.join(IMAGE_SUFFIXES)}), found {[p.name for p in found]}."
        )
    return found[0]


@md.input("", DataPath, IOType.DISK)
@md.output("image", Image, IOType.IN_MEMORY)
class PairLoaderOperator(md.Operator):
    """``fixed.*`` and ``moving.*`` of the input folder -> the 2-channel ``image`` (bundle ``loading`` entry)."""

    def compute(self, op_input: InputContext, op_output: OutputContext, context: ExecutionContext):
        folder = op_input.get().path
        if not folder.is_dir():
            raise NotADirectoryError(f"{folder}: the input must be a folder holding fixed.* and moving.*.")
        pair = {"fixed": str(_find(folder, "fixed")), "moving": str(_find(folder, "moving")), "name": folder.name}
        model = context.models.get()
        loading = bundle_operator.get_bundle_config(str(model.path), ["inference"]).get_parsed_content("loading")
        image = loading(pair)["image"]
        op_output.set(Image(image.detach().cpu().numpy(), metadata=_meta_dict(image)), "image")


class RegistrationBundleOperator(MonaiBundleInferenceOperator):
    """The SDK's bundle operator, with what a registration bundle needs on top of it.

    - ``pred`` (a displacement field in voxels, float) and ``warped`` go out as float ``Image`` objects with
      their metadata: the SDK's own output step squeezes and casts every ``image`` output to uint8, as for
      segmentations.
    - ``warped`` (from the bundle's ``postprocessing``) is sent as a second output.
    - SDK 0.5.x reads ``optional_packages_version`` from the metadata, a key MONAI's own parser (1.6) renames
      to ``required_packages_version`` on reading; it is given an empty one (the packages to install are in
      ``requirements.txt``).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._extra_outputs: dict = {}

    def _init_config(self, config_names):
        original = bundle_operator.get_bundle_config

        def get_bundle_config(bundle_path, names):
            parser = original(bundle_path, names)
            meta = parser.get("_meta_")
            meta.setdefault("optional_packages_version", {})
            return parser

        bundle_operator.get_bundle_config = get_bundle_config
        try:
            super()._init_config(config_names)
        finally:
            bundle_operator.get_bundle_config = original

    def post_process(self, data, *args, **kwargs):
        outputs = super().post_process(data, *args, **kwargs)
        self._extra_outputs = {"warped": outputs["warped"]} if isinstance(outputs, dict) else {}
        return outputs

    def compute(self, op_input: InputContext, op_output: OutputContext, context: ExecutionContext):
        super().compute(op_input, op_output, context)
        for name, value in self._extra_outputs.items():
            op_output.set(Image(value.detach().cpu().numpy(), metadata=_meta_dict(value)), name)

    def _send_output(self, value, name, metadata, op_output, context):
        op_output.set(Image(value.detach().cpu().numpy(), metadata=_meta_dict(value)), name)


@md.input("pred", Image, IOType.IN_MEMORY)
@md.input("warped", Image, IOType.IN_MEMORY)
@md.output("", DataPath, IOType.DISK)
class RegistrationWriterOperator(md.Operator):
    """``<pair>_ddf.nii.gz`` (network grid) and ``<pair>_warped.nii.gz`` (fixed image's grid) in the output folder."""

    def compute(self, op_input: InputContext, op_output: OutputContext, context: ExecutionContext):
        from monai.data import MetaTensor
        from monai.transforms import SaveImage

        from rrn_lung_registration.training.data import pair_name_formatter

        folder = op_output.get().path
        folder.mkdir(parents=True, exist_ok=True)
        for name, postfix in (("pred", "ddf"), ("warped", "warped")):
            image = op_input.get(name)
            value = MetaTensor(torch.as_tensor(np.asarray(image.asnumpy())), meta=dict(image.metadata()))
            SaveImage(
                output_dir=str(folder),
                output_postfix=postfix,
                output_name_formatter=pair_name_formatter,
                separate_folder=False,
                resample=False,
                print_log=False,
            )(value)


@md.resource(cpu=1, memory="8Gi")
@md.env(pip_packages=str(Path(__file__).with_name("requirements.txt")))
class RRNRegistrationApp(Application):
    """Exhale-to-inhale lung CT registration with the RRN bundle (model.ts from ``ckpt_export``)."""

    name = "rrn_lung_registration"
    description = "Deformable exhale-to-inhale lung CT registration (Recursive Refinement Network, MONAI bundle)."
    version = "0.2.0"

    def compose(self):
        loader = PairLoaderOperator()
        registration = RegistrationBundleOperator(
            input_mapping=[IOMapping("image", Image, IOType.IN_MEMORY)],
            output_mapping=[IOMapping("pred", Image, IOType.IN_MEMORY), IOMapping("warped", Image, IOType.IN_MEMORY)],
        )
        writer = RegistrationWriterOperator()
        self.add_flow(loader, registration, {"image": "image"})
        self.add_flow(registration, writer, {"pred": "pred", "warped": "warped"})


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    RRNRegistrationApp(do_run=True)
