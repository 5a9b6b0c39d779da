"""`make bundles`: write one zip per bundle folder into dist/, ready for `monai.bundle download`.

Each zip holds a top folder named exactly like the bundle, with its configs, docs, LICENSE and
large_files.json, plus a copy of the project packages its configs import (``shared_ops``,
``rrn_lung_registration``, ``roigan_stain_transfer``), so that the unpacked bundle runs from its own
folder in an environment holding only the bundle's declared requirements.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import zipfile
from pathlib import Path

from shared_ops.atomic import atomic_write

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("shared_ops", "rrn_lung_registration", "roigan_stain_transfer")
PACKAGE_DEPENDENCIES = {"rrn_lung_registration": ("shared_ops",), "roigan_stain_transfer": ("shared_ops",)}
SKIP_PARTS = {"__pycache__", "models", "eval", "logs", ".pytest_cache"}
SKIP_SUFFIXES = {".pyc", ".so", ".tmp"}


def _is_partial(path: Path) -> bool:
    """A temporary file left by an interrupted atomic write (``shared_ops.atomic.temporary_sibling``)."""
    return path.name.startswith(".") and ".partial" in path.name


def packages_used(bundle: Path) -> list[str]:
    text = "".join(p.read_text() for p in (bundle / "configs").glob("*.json"))
    used = {name for name in PACKAGES if re.search(rf"\b{name}\b", text)}
    for name in list(used):
        used.update(PACKAGE_DEPENDENCIES.get(name, ()))
    return sorted(used)


def pack(bundle: Path, out_dir: Path) -> Path:
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    name = bundle.name
    target = out_dir / f"{name}_v{metadata['version']}.zip"

    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(bundle.rglob("*")):
                rel = path.relative_to(bundle)
                if path.is_file() and not SKIP_PARTS.intersection(rel.parts) and not _is_partial(path):
                    archive.write(path, f"{name}/{rel.as_posix()}")
            for package in packages_used(bundle):
                for path in sorted((ROOT / package).rglob("*")):
                    if (
                        path.is_file()
                        and "__pycache__" not in path.parts
                        and path.suffix not in SKIP_SUFFIXES
                        and not _is_partial(path)
                    ):
                        archive.write(path, f"{name}/{path.relative_to(ROOT).as_posix()}")

    return atomic_write(target, write)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="dist", type=Path)
    args = parser.parse_args()
    bundles = sorted(p.parent.parent for p in (ROOT / "bundles").glob("*/configs/metadata.json"))
    if not bundles:
        print("no bundle folders with configs/metadata.json under bundles/: nothing to pack")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for bundle in bundles:
        print(f"wrote {pack(bundle, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
