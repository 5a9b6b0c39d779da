"""MONAI Deploy application: translate an H&E tile into virtual IHC with the RoI-GAN bundle's TorchScript model.

Written for the MONAI Deploy App SDK 4.x API (Holoscan operators; see ``../README.md`` for the SDK versions).
Three operators:

1. ``TileLoaderOperator`` reads one RGB tile (PNG, or any format Pillow reads; the input is the file, or a
   folder holding exactly one) as ``image`` ``(H, W, 3)`` uint8, the form the bundle's ``preprocessing`` takes.
2. ``StainTransferBundleOperator``, the SDK's ``MonaiBundleInferenceOperator``: the bundle's ``preprocessing``
   (channels first, ``[0, 255]`` -> ``[-1, 1]``), ``inferer`` (the H&E -> IHC generator) and ``postprocessing``
   (back to RGB ``(H, W, 3)`` uint8) on ``image``; ``pred`` is the virtual IHC tile.
3. ``TileWriterOperator`` writes ``<tile name>.png`` into the output folder, the file the bundle's
   ``inference.json`` writes.

Run: ``python app.py -i TILE_OR_FOLDER -o OUTPUT_FOLDER -m model.ts`` (or the folder: ``python . -i ...``).
A failure in any operator ends the run with a non-zero exit code. For many tiles, or whole slides, use the bundle
itself (``inference.json``, ``infer_slides.json``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from monai.deploy.conditions import CountCondition
from monai.deploy.core import Application, Fragment, Image, IOType, Operator, OperatorSpec
from monai.deploy.operators.monai_bundle_inference_operator import IOMapping, MonaiBundleInferenceOperator

TILE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
#: Tile height and width must be multiples of this: the generator halves them twice and doubles them back
#: (``roigan_stain_transfer.networks.GENERATOR_MULTIPLE``; the TorchScript model refuses other sizes too).
GENERATOR_MULTIPLE = 4


def _tile_path(path: Path) -> Path:
    if not path.is_dir():
        return path
    tiles = [p for p in sorted(path.iterdir()) if p.suffix.lower() in TILE_SUFFIXES]
    if len(tiles) != 1:
        raise FileNotFoundError(
            f"{path}: expected one tile ({', '.join(TILE_SUFFIXES)}), found {len(tiles)}; this app translates "
            "one tile per run (the bundle's inference.json translates folders of tiles)."
        )
    return tiles[0]


class TileLoaderOperator(Operator):
    """One RGB tile, height and width multiples of 4 -> ``image``.

    Named output:
        image: ``Image`` ``(H, W, 3)`` uint8 with the tile's file name (``filename_or_obj``) in its metadata.
    """

    def __init__(self, fragment: Fragment, *args, input_path: Path, **kwargs):
        self.input_path = Path(input_path)
        super().__init__(fragment, *args, **kwargs)  # last: it calls setup

    def setup(self, spec: OperatorSpec):
        spec.output("image")

    def compute(self, op_input, op_output, context):
        from PIL import Image as PILImage

        path = _tile_path(self.input_path)
        with PILImage.open(path) as tile:
            if tile.mode != "RGB":
                raise ValueError(f"{path}: expected an RGB tile, got mode {tile.mode}.")
            pixels = np.array(tile, dtype=np.uint8)
        height, width = pixels.shape[:2]
        if height % GENERATOR_MULTIPLE or width % GENERATOR_MULTIPLE:
            raise ValueError(
                f"{path}: tile height and width must be multiples of {GENERATOR_MULTIPLE} (the generator halves them "
                f"twice), got {height} x {width}; crop or pad the tile."
            )
        op_output.emit(Image(pixels, metadata={"filename_or_obj": str(path)}), "image")


class StainTransferBundleOperator(MonaiBundleInferenceOperator):
    """The SDK's bundle operator, emitting the RGB tile as it is: ``pred`` is the ``(H, W, 3)`` uint8 tile of the
    bundle's ``postprocessing`` (the SDK's own output step squeezes and swaps the axes of every ``image`` output as
    for a single-channel segmentation)."""

    def _send_output(self, value, name, metadata, op_output, context):
        pixels = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        op_output.emit(Image(pixels, metadata=dict(metadata or {})), name)


class TileWriterOperator(Operator):
    """``<tile name>.png`` in the output folder (written to a temporary file, then renamed).

    Named input:
        pred: ``Image`` ``(H, W, 3)`` uint8.
    """

    def __init__(self, fragment: Fragment, *args, output_folder: Path, **kwargs):
        self.output_folder = Path(output_folder)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input("pred")

    def compute(self, op_input, op_output, context):
        from PIL import Image as PILImage

        image = op_input.receive("pred")
        pixels = np.asarray(image.asnumpy())
        if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[-1] != 3:
            raise ValueError(
                f"expected an RGB uint8 tile (H, W, 3) from the bundle, got {pixels.dtype} {pixels.shape}."
            )
        name = Path(str(image.metadata().get("filename_or_obj") or "tile.png")).stem
        self.output_folder.mkdir(parents=True, exist_ok=True)
        staged = self.output_folder / f".staging-{os.getpid()}-{name}.png"  # created with the umask's permissions
        try:
            PILImage.fromarray(pixels).save(staged, format="PNG")
            os.replace(staged, self.output_folder / f"{name}.png")
        except BaseException:
            staged.unlink(missing_ok=True)
            raise


class RoIGANStainTransferApp(Application):
    """H&E -> virtual IHC for one tile with the RoI-GAN bundle (model.ts from ``ckpt_export``)."""

    def compose(self):
        app_context = Application.init_app_context(self.argv)
        loader = TileLoaderOperator(
            self, CountCondition(self, 1), input_path=Path(app_context.input_path), name="tile_loader"
        )
        translation = StainTransferBundleOperator(
            self,
            input_mapping=[IOMapping("image", Image, IOType.IN_MEMORY)],
            output_mapping=[IOMapping("pred", Image, IOType.IN_MEMORY)],
            app_context=app_context,
            name="stain_transfer",
        )
        writer = TileWriterOperator(self, output_folder=Path(app_context.output_path), name="writer")
        self.add_flow(loader, translation, {("image", "image")})
        self.add_flow(translation, writer, {("pred", "pred")})


if __name__ == "__main__":
    RoIGANStainTransferApp().run()
