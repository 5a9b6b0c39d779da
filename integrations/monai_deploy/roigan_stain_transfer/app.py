"""MONAI Deploy application: translate an H&E tile into virtual IHC with the RoI-GAN bundle's TorchScript model.

Written for the MONAI Deploy App SDK 0.5.x API (see README.md for why and for SDK >= 0.6). Three operators:

1. ``TileLoaderOperator`` reads one RGB tile (PNG, or any format Pillow reads; the input is the file, or a
   folder holding exactly one) as ``image`` ``(H, W, 3)`` uint8, the form the bundle's ``preprocessing`` takes.
2. ``StainTransferBundleOperator``, the SDK's ``MonaiBundleInferenceOperator``: the bundle's ``preprocessing``
   (channels first, ``[0, 255]`` -> ``[-1, 1]``), ``inferer`` (the H&E -> IHC generator) and ``postprocessing``
   (back to RGB ``(H, W, 3)`` uint8) on ``image``; ``pred`` is the virtual IHC tile.
3. ``TileWriterOperator`` writes ``<tile name>.png`` into the output folder, the file the bundle's
   ``inference.json`` writes.

Run: ``python app.py -i TILE_OR_FOLDER -o OUTPUT_FOLDER -m model.ts`` (or ``monai-deploy exec app.py ...``).
For many tiles, or whole slides, use the bundle itself (``inference.json``, ``infer_slides.json``).
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

TILE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


@md.input("", DataPath, IOType.DISK)
@md.output("image", Image, IOType.IN_MEMORY)
class TileLoaderOperator(md.Operator):
    """One RGB tile -> ``image`` ``(H, W, 3)`` uint8 with its file name in the metadata."""

    def compute(self, op_input: InputContext, op_output: OutputContext, context: ExecutionContext):
        from PIL import Image as PILImage

        path = op_input.get().path
        if path.is_dir():
            tiles = [p for p in sorted(path.iterdir()) if p.suffix.lower() in TILE_SUFFIXES]
            if len(tiles) != 1:
                raise FileNotFoundError(
                    f"{path}: expected one tile ({', '.join(TILE_SUFFIXES)}), found {len(tiles)}; this app translates "
                    "one tile per run (the bundle's inference.json translates folders of tiles)."
                )
            path = tiles[0]
        with PILImage.open(path) as tile:
            if tile.mode != "RGB":
                raise ValueError(f"{path}: expected an RGB tile, got mode {tile.mode}.")
            pixels = np.array(tile, dtype=np.uint8)
        op_output.set(Image(pixels, metadata={"filename_or_obj": str(path)}), "image")


class StainTransferBundleOperator(MonaiBundleInferenceOperator):
    """The SDK's bundle operator, sending the RGB tile as it is.

    - ``pred`` goes out as the ``(H, W, 3)`` uint8 tile of the bundle's ``postprocessing``: the SDK's own output
      step squeezes and transposes every ``image`` output as a single-channel 3-D segmentation.
    - SDK 0.5.x reads ``optional_packages_version`` from the metadata, a key MONAI's own parser (1.6) renames
      to ``required_packages_version`` on reading; it is given an empty one (the packages to install are in
      ``requirements.txt``).
    """

    def _init_config(self, config_names):
        original = bundle_operator.get_bundle_config

        def get_bundle_config(bundle_path, names):
            parser = original(bundle_path, names)
            parser.get("_meta_").setdefault("optional_packages_version", {})
            return parser

        bundle_operator.get_bundle_config = get_bundle_config
        try:
            super()._init_config(config_names)
        finally:
            bundle_operator.get_bundle_config = original

    def _send_output(self, value, name, metadata, op_output, context):
        pixels = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        op_output.set(Image(pixels, metadata=dict(metadata or {})), name)


@md.input("pred", Image, IOType.IN_MEMORY)
@md.output("", DataPath, IOType.DISK)
class TileWriterOperator(md.Operator):
    """``<tile name>.png`` in the output folder."""

    def compute(self, op_input: InputContext, op_output: OutputContext, context: ExecutionContext):
        from PIL import Image as PILImage

        image = op_input.get("pred")
        pixels = np.asarray(image.asnumpy())
        if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[-1] != 3:
            raise ValueError(
                f"expected an RGB uint8 tile (H, W, 3) from the bundle, got {pixels.dtype} {pixels.shape}."
            )
        name = Path(str(image.metadata().get("filename_or_obj") or "tile.png")).stem
        folder = op_output.get().path
        folder.mkdir(parents=True, exist_ok=True)
        PILImage.fromarray(pixels).save(folder / f"{name}.png")


@md.resource(cpu=1, memory="4Gi")
@md.env(pip_packages=str(Path(__file__).with_name("requirements.txt")))
class RoIGANStainTransferApp(Application):
    """H&E -> virtual IHC for one tile with the RoI-GAN bundle (model.ts from ``ckpt_export``)."""

    name = "roigan_stain_transfer"
    description = "H&E to virtual IHC stain transfer of one tile (region-guided CycleGAN, MONAI bundle)."
    version = "0.3.0"

    def compose(self):
        loader = TileLoaderOperator()
        translation = StainTransferBundleOperator(
            input_mapping=[IOMapping("image", Image, IOType.IN_MEMORY)],
            output_mapping=[IOMapping("pred", Image, IOType.IN_MEMORY)],
        )
        writer = TileWriterOperator()
        self.add_flow(loader, translation, {"image": "image"})
        self.add_flow(translation, writer, {"pred": "pred"})


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    RoIGANStainTransferApp(do_run=True)
