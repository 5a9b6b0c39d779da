"""Command line: ``python -m rrn_lung_registration register --fixed F --moving M --output DIR [options]``.

``register`` registers one pair of lung CT scans (DICOM series folders, NIfTI, MHA, NRRD or DIR-Lab
``.img``) and writes the warped moving image, the ITK displacement field, the Jacobian determinant map,
a PNG overview and, with landmark files, the TRE report, all in the fixed image's physical space (see
:mod:`rrn_lung_registration.pipeline`). Without ``--weights`` it registers by instance optimisation alone.
``warp`` applies a displacement field written by ``register`` (or any ITK displacement field) to an image.

Everything that can be checked is checked before any work (:mod:`rrn_lung_registration.io.preflight`), and a
refusal is one line ``error: <file>: <problem>`` on stderr. Exit codes: 0 done (warnings, if any, are in the
log and in ``registration.json``), 1 an input, output folder or setting refused, 2 a command line that does
not parse (an unknown command or option, an option without its value, extra arguments).
"""

from __future__ import annotations

import difflib
import inspect
import logging
import re
import sys
from collections.abc import Callable
from pathlib import Path

import fire

from rrn_lung_registration.pipeline import RegistrationSettings, apply_displacement_field, register_files, summary_line

__all__ = ["check_options", "main", "register", "warp"]


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
    overwrite: bool = False,
) -> None:
    """Register MOVING (exhale) to FIXED (inhale) and write the outputs into OUTPUT.

    Args:
        fixed, moving: CT scans: a DICOM series folder, NIfTI, MHA, NRRD or DIR-Lab .img.
        output: folder for the outputs (created). A folder holding an earlier registration's outputs is
            refused unless --overwrite.
        fixed_landmarks, moving_landmarks: corresponding landmark files (CSV in LPS mm, DIR-Lab text,
            elastix point sets) for the TRE report.
        weights: trained RRN weights (bundle checkpoint or state dict); without them the pair is
            registered by the deformable optimisation (multi-level B-spline on MIND-SSC features).
        grid_size: the network's grid size with weights (a multiple of 16).
        margin_mm: margin around the fixed lungs' box.
        prealign: "affine", "rigid" or "none".
        instance_steps: without weights, at most this many optimisation steps per level (default: until
            converged; 0: pre-alignment only); with weights, instance-optimisation steps (default 0).
        instance_mode: "field" (optimise the field) or "network" (fine-tune the weights).
        device: "cpu" or "cuda" (default: CUDA when available).
        overwrite: replace the earlier outputs in OUTPUT (the whole set: no earlier file survives).
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
    summary = register_files(
        fixed, moving, output, fixed_landmarks, moving_landmarks, settings, overwrite=overwrite, progress=True
    )
    print(summary_line(summary))
    print(f"details: {Path(output) / 'registration.json'}")


def warp(image: str, field: str, output: str, fill_hu: float = -1000.0) -> None:
    """Resample IMAGE through the ITK displacement FIELD onto the field's grid and write OUTPUT.

    Args:
        image: the moving image (any format ``register`` reads).
        field: an ITK displacement field (LPS mm), e.g. ``displacement_field.nii`` from ``register``.
        output: the warped image (.nii.gz, .nii, .mha or .nrrd).
        fill_hu: value of points mapped outside the image.
    """
    print(apply_displacement_field(image, field, output, fill_hu))


COMMANDS: dict[str, Callable[..., None]] = {"register": register, "warp": warp}


def _is_flag(token: str) -> bool:
    """A flag as fire sees one: ``--name``, ``-name`` or ``-n`` (``-5`` is a negative number)."""
    return token.startswith("--") or re.match(r"^-[a-zA-Z]", token) is not None


def _takes_bool(parameter: inspect.Parameter) -> bool:
    return parameter.annotation in (bool, "bool") or isinstance(parameter.default, bool)


def check_options(argv: list[str], commands: dict[str, Callable[..., None]] = COMMANDS) -> str | None:
    """An error message for a command line ``argv`` (without the program name), or ``None`` when it parses.

    Checked as fire would read it, but strictly: the command exists; every ``--option`` (``-`` and ``_``
    alike, ``--name=value`` or ``--name value``; ``-x`` when ``x`` starts one option only) is a parameter of
    the command; an option that is not a flag has its value; there are no more positional arguments than
    parameters left. Fire itself would run the command with defaults and complain only afterwards.
    """
    if not argv or argv[0] in ("-h", "--help"):
        return None
    name = argv[0]
    command = commands.get(name)
    if command is None:
        return f"unknown command {name!r}; expected one of {', '.join(commands)}"
    parameters = inspect.signature(command).parameters
    valid = ", ".join(f"--{key}" for key in parameters)
    named: set[str] = set()
    positional: list[str] = []
    tokens = argv[1:]
    index = 0
    while index < len(tokens):
        token = tokens[index]
        index += 1
        if token == "--":  # fire's own flags follow
            break
        if token in ("-h", "--help"):
            return None  # fire shows the command's help
        if not _is_flag(token):
            positional.append(token)
            continue
        option, has_value = token.split("=", 1)[0], "=" in token
        key = option.lstrip("-").replace("-", "_")
        alone = not has_value and (index == len(tokens) or _is_flag(tokens[index]))
        if key not in parameters and key.startswith("no") and alone and key[2:] in parameters:
            key = key[2:]
            if not _takes_bool(parameters[key]):
                return f"{name}: --{key} is not a flag; give it a value (--{key} VALUE)"
        elif key not in parameters and len(key) == 1:
            matches = [candidate for candidate in parameters if candidate.startswith(key)]
            if len(matches) > 1:
                return f"{name}: {option} is ambiguous ({', '.join(f'--{m}' for m in matches)})"
            key = matches[0] if matches else key
        if key not in parameters:
            close = difflib.get_close_matches(key, list(parameters), n=1)
            hint = f" (did you mean --{close[0]}?)" if close else ""
            return f"{name}: unknown option {option}{hint}; valid options: {valid}"
        if alone and not _takes_bool(parameters[key]):
            return f"{name}: option --{key} needs a value (--{key} VALUE)"
        named.add(key)
        if not has_value and not alone:
            index += 1  # the option's value
    free = [key for key in parameters if key not in named]
    if len(positional) > len(free):
        extra = " ".join(positional[len(free) :])
        return f"{name}: unexpected argument(s) {extra!r}; {name} takes {', '.join(free) or 'no more arguments'}"
    return None


def main(argv: list[str] | None = None) -> None:
    """Run a command; exit 2 for a command line that does not parse, 1 for a refused input (one line)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    problem = check_options(argv)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        raise SystemExit(2)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        fire.Fire(COMMANDS, command=argv)
    except (ValueError, OSError) as error:  # the library's refusals: each names the file at fault
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
