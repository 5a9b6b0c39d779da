"""Make MONAI Deploy App SDK 0.5.1 importable next to this project's MONAI without installing it into the venv.

Why not ``pip install monai-deploy-app-sdk`` into the project's environment:

- releases from 0.6 on require Holoscan (``holoscan``, later ``holoscan-cu12`` / ``holoscan-cu13``, with CUDA
  libraries), which cannot run on this project's CPU-only environment;
- 0.5.1, the last release without Holoscan, installs cleanly next to torch 2.13 (its requirements are numpy,
  networkx, colorama and typeguard), but it puts its code into MONAI's own package folder (``monai/deploy``),
  and ``import monai`` (MONAI 1.6) then imports every module under it. Those modules need ``pkg_resources``
  (setuptools < 81; this venv has a newer setuptools), ``pydicom`` and ``highdicom`` at import: without them
  ``import monai`` itself fails, for every user of the environment.

So this script installs the SDK and those three packages (``--no-deps``, pinned) into a folder of their own, and
builds beside it a ``monai`` package made of links to the installed MONAI's files plus the SDK's ``deploy``
folder. A process started with ``PYTHONPATH=<the two folders>`` (what :func:`pythonpath` returns) sees MONAI
with the SDK inside it, exactly as a normal install of the SDK would lay it out; every other process keeps the
environment unchanged.

    python integrations/monai_deploy/sdk_overlay.py ~/.cache/monai-rrn-roigan/deploy-sdk-0.5.1
    PYTHONPATH=$(python integrations/monai_deploy/sdk_overlay.py ~/.cache/...) python integrations/monai_deploy/...

pip reads the package registry for the first run only; the folder is reused afterwards.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

#: What the SDK 0.5.1 import needs next to MONAI 1.6 and torch 2.13, as measured here (all installed --no-deps).
PACKAGES = (
    "monai-deploy-app-sdk==0.5.1",
    "typeguard==4.6.1",
    "colorama==0.4.6",
    "setuptools==80.10.2",  # pkg_resources
    "pydicom==2.4.5",
    "highdicom==0.22.0",
)


def _installed_monai() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("monai")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("MONAI is not installed in this environment.")
    return Path(next(iter(spec.submodule_search_locations)))


def build(folder: str | os.PathLike, python: str = sys.executable) -> list[Path]:
    """Install the SDK into ``folder`` (once) and return the PYTHONPATH entries that make it importable.

    Raises:
        subprocess.CalledProcessError: pip could not install the packages (e.g. no registry access).
    """
    folder = Path(folder).expanduser().resolve()
    site, overlay = folder / "site", folder / "monai_overlay"
    if not (site / "monai" / "deploy" / "__init__.py").is_file():
        env = dict(os.environ)
        constraints = Path(__file__).resolve().parents[2] / "constraints.txt"
        if constraints.is_file():
            env.setdefault("PIP_CONSTRAINT", str(constraints))
        subprocess.run(
            [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps", "--upgrade",
             "--target", str(site), *PACKAGES],
            check=True, env=env, stdout=subprocess.DEVNULL,
        )  # fmt: skip
    package = overlay / "monai"
    package.mkdir(parents=True, exist_ok=True)
    monai_dir = _installed_monai()
    wanted = {entry.name: entry for entry in monai_dir.iterdir() if entry.name != "deploy"}
    wanted["deploy"] = site / "monai" / "deploy"
    for name, source in wanted.items():
        link = package / name
        if link.is_symlink() and Path(os.readlink(link)) == source:
            continue
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(source, target_is_directory=source.is_dir())
    return [overlay, site]


def pythonpath(folder: str | os.PathLike) -> str:
    """``PYTHONPATH`` value for a process that should import the SDK (builds the folder when needed)."""
    return os.pathsep.join(str(p) for p in build(folder))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="where to install the SDK (reused when it is there)")
    args = parser.parse_args()
    print(pythonpath(args.folder))
    return 0


if __name__ == "__main__":
    sys.exit(main())
