"""Make MONAI Deploy App SDK 4.0.0 importable next to this project's MONAI without installing it into the venv.

Why not ``pip install monai-deploy-app-sdk`` into the project's environment: the SDK puts its code into MONAI's
own package folder (``monai/deploy``), and ``import monai`` (MONAI 1.6) then imports every module under it. In
4.0.0 those modules need, at import, Holoscan (``holoscan-cu13``), Triton's client (``tritonclient`` with its
HTTP and gRPC stacks), ``pydicom`` 3 and ``highdicom``; the project's environment holds ``pydicom`` 2 (MONAI
Label's server needs it). Installed there, the SDK would change what ``import monai`` does for every user of the
environment.

So this script installs the SDK and exactly the packages its import needs (``--no-deps``, pinned, measured here;
none of them is torch) into a folder of their own, and builds beside it a ``monai`` package made of links to the
installed MONAI's files plus the SDK's ``deploy`` folder. A process started with ``PYTHONPATH=<the two folders>``
(what :func:`pythonpath` returns) sees MONAI with the SDK inside it, exactly as a normal install of the SDK lays
it out; every other process keeps the environment unchanged.

``holoscan-cu13`` is an "axle" wheel: its shared libraries' version links (``libholoscan_core.so.4`` ->
``libholoscan_core.so.4.6.0``) are listed in ``<dist-info>/symlinks.txt`` and made by a ``.pth`` hook on first
import from a site directory. A ``PYTHONPATH`` entry is not a site directory, so :func:`build` makes them.

Holoscan runs here without a GPU: it warns that the CUDA driver is missing and handles data on the CPU. It also
asks for a main-thread stack of at least 32 MiB (``ulimit -s 32768``) and warns below that.

    python integrations/monai_deploy/sdk_overlay.py ~/.cache/monai-rrn-roigan/deploy-sdk-4.0.0
    PYTHONPATH=$(python integrations/monai_deploy/sdk_overlay.py ~/.cache/...) python integrations/monai_deploy/...

pip reads the package registry for the first run only (about 220 MB); the folder is reused afterwards.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

SDK_VERSION = "4.0.0"
#: What the SDK 4.0.0 import needs next to MONAI 1.6 and torch 2.13, as measured here (all installed --no-deps).
PACKAGES = (
    f"monai-deploy-app-sdk=={SDK_VERSION}",
    "typeguard==4.6.1",
    "colorama==0.4.6",
    # Holoscan, the SDK's application framework
    "holoscan-cu13==4.6.0",
    "cloudpickle==3.1.3",
    # tritonclient (monai.deploy.core.models imports its HTTP and gRPC clients)
    "tritonclient==2.73.0",
    "ml-dtypes==0.5.4",
    "python-rapidjson==1.25",
    "geventhttpclient==2.6.1",
    "gevent==26.9.0",
    "greenlet==3.3.2",
    "zope.event==6.2",
    "zope.interface==8.7",
    "brotli==1.2.1",
    "grpcio==1.85.3",
    # the SDK's DICOM operators (imported with monai.deploy.operators)
    "pydicom==3.0.1",
    "highdicom==0.28.2",
)
MARKER = f"monai_deploy_app_sdk-{SDK_VERSION}.dist-info"


def _installed_monai() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("monai")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("MONAI is not installed in this environment.")
    return Path(next(iter(spec.submodule_search_locations)))


def _relink(link: Path, source: Path) -> None:
    """Make ``link`` a symbolic link to ``source`` (replacing whatever is there)."""
    if link.is_symlink() and Path(os.readlink(link)) == source:
        return
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(source, target_is_directory=source.is_dir())


def make_axle_links(site: Path) -> int:
    """Create the links that axle wheels in ``site`` list in ``<dist-info>/symlinks.txt``; return how many.

    Each line is ``<name>.data/<scheme>/<path>,<target>,<flag>``: ``<path>`` (relative to the install folder) is
    to become a link to ``<target>`` (relative to the link's folder). Links that would leave ``site`` are refused.
    """
    made = 0
    root = site.resolve()
    for listing in sorted(site.glob("*.dist-info/symlinks.txt")):
        for number, line in enumerate(listing.read_text().splitlines(), 1):
            if not line.strip():
                continue
            path, target, *_ = line.split(",")
            parts = Path(path).parts
            relative = Path(*parts[2:]) if len(parts) > 2 and parts[0].endswith(".data") else Path(path)
            link = site / relative
            if not (link.parent / target).resolve().is_relative_to(root) or not link.resolve().is_relative_to(root):
                raise ValueError(f"{listing}:{number}: link {path} -> {target} leaves {site}")
            if not link.is_symlink() and not link.exists():
                link.symlink_to(target)
                made += 1
    return made


def build(folder: str | os.PathLike, python: str = sys.executable) -> list[Path]:
    """Install the SDK into ``folder`` (once) and return the PYTHONPATH entries that make it importable.

    Raises:
        subprocess.CalledProcessError: pip could not install the packages (e.g. no registry access).
    """
    folder = Path(folder).expanduser().resolve()
    site, overlay = folder / "site", folder / "monai_overlay"
    if not (site / MARKER).is_dir():
        env = dict(os.environ)
        constraints = Path(__file__).resolve().parents[2] / "constraints.txt"
        if constraints.is_file():
            env.setdefault("PIP_CONSTRAINT", str(constraints))
        subprocess.run(
            [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps", "--upgrade",
             "--target", str(site), *PACKAGES],
            check=True, env=env, stdout=subprocess.DEVNULL,
        )  # fmt: skip
    make_axle_links(site)
    package = overlay / "monai"
    package.mkdir(parents=True, exist_ok=True)
    wanted = {entry.name: entry for entry in _installed_monai().iterdir() if entry.name != "deploy"}
    wanted["deploy"] = site / "monai" / "deploy"
    for name, source in wanted.items():
        _relink(package / name, source)
    for stale in [entry for entry in package.iterdir() if entry.name not in wanted]:  # e.g. after a MONAI upgrade
        stale.unlink()
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
