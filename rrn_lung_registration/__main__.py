"""Command line: ``python -m rrn_lung_registration register --fixed F --moving M --output DIR [options]``.

``register`` registers one pair of lung CT scans (DICOM series folders, NIfTI, MHA, NRRD or DIR-Lab
``.img``) and writes the warped moving image, the ITK displacement field, the Jacobian determinant map,
a PNG overview and, with landmark files, the TRE report, all in the fixed image's physical space (see
:mod:`rrn_lung_registration.pipeline`). Without ``--weights`` it registers by instance optimisation alone.
``warp`` applies a displacement field written by ``register`` (or any ITK displacement field) to an image.
"""

from __future__ import annotations

import json

import fire

from rrn_lung_registration.pipeline import RegistrationSettings, apply_displacement_field, register_files


def register(
    fixed: str,
    moving: str,
    output: str,
    fixed_landmarks: str | None = None,
    moving_landmarks: str | None = None,
    weights: str | None = None,
    grid_size: int = 256,
    margin_mm: float = 10.0,
    prealign: str = "affine",
    instance_steps: int | None = None,
    instance_mode: str = "field",
    device: str | None = None,
) -> None:
    """Register MOVING (exhale) to FIXED (inhale) and write the outputs into OUTPUT.

    Args:
        fixed, moving: CT scans: a DICOM series folder, NIfTI, MHA, NRRD or DIR-Lab .img.
        output: folder for the outputs (created; existing files of the same names are replaced).
        fixed_landmarks, moving_landmarks: corresponding landmark files (CSV in LPS mm, DIR-Lab text,
            elastix point sets) for the TRE report.
        weights: trained RRN weights (bundle checkpoint or state dict); without them the pair is
            registered by instance optimisation alone.
        grid_size: network grid size (a multiple of 16).
        margin_mm: margin around the fixed lungs' box.
        prealign: "affine", "rigid" or "none".
        instance_steps: optimisation steps per level (default: 100 without weights, 0 with).
        instance_mode: "field" (optimise the field) or "network" (fine-tune the weights).
        device: "cpu" or "cuda" (default: CUDA when available).
    """
    settings = RegistrationSettings(
        grid_size=grid_size,
        margin_mm=margin_mm,
        prealign=prealign,
        weights=weights,
        instance_steps=instance_steps,
        instance_mode=instance_mode,
        device=device,
    )
    summary = register_files(fixed, moving, output, fixed_landmarks, moving_landmarks, settings)
    print(json.dumps({key: summary[key] for key in ("timings_s", "jacobian", "tre_mm") if key in summary}, indent=2))


def warp(image: str, field: str, output: str, fill_hu: float = -1000.0) -> None:
    """Resample IMAGE through the ITK displacement FIELD onto the field's grid and write OUTPUT.

    Args:
        image: the moving image (any format ``register`` reads).
        field: an ITK displacement field (LPS mm), e.g. ``displacement_field.nii.gz`` from ``register``.
        output: the warped image (.nii.gz, .nii, .mha or .nrrd).
        fill_hu: value of points mapped outside the image.
    """
    print(apply_displacement_field(image, field, output, fill_hu))


def main() -> None:
    fire.Fire({"register": register, "warp": warp})


if __name__ == "__main__":
    main()
