"""`make bundles`: write one zip per bundle folder into dist/, ready for `monai.bundle download`.

Each zip holds a top folder named exactly like the bundle (MONAI's ``download`` requires it) with its configs,
docs, LICENSE and large_files.json, and MONAI's metadata schema under ``schema/`` so that ``verify_metadata``
runs offline (``--filepath schema/meta_schema_20240725.json``).

The zips hold no package code: a bundle's configs import the project's packages (``rrn_lung_registration``,
``roigan_stain_transfer``, ``shared_ops``), which must be installed (``pip install`` of this repository, or of
the wheel ``--wheel`` writes next to the zips). One installed copy of the code serves every bundle and every
working directory; ``metadata.json`` names the project under ``project_package``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import zipfile
from pathlib import Path

from shared_ops.atomic import atomic_write

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "bundles" / "schema" / "meta_schema_20240725.json"
SCHEMA_IN_ZIP = "schema/meta_schema_20240725.json"
SKIP_PARTS = {"__pycache__", "models", "eval", "logs", ".pytest_cache"}
SKIP_SUFFIXES = {".pyc", ".tmp"}


def _is_partial(path: Path) -> bool:
    """A temporary file left by an interrupted atomic write (``shared_ops.atomic.temporary_sibling``)."""
    return path.name.startswith(".") and ".partial" in path.name


def bundle_files(bundle: Path) -> list[tuple[Path, str]]:
    """``(file, name in the zip)`` for every file the zip of ``bundle`` holds, in zip order."""
    name = bundle.name
    files = []
    for path in sorted(bundle.rglob("*")):
        rel = path.relative_to(bundle)
        if (
            path.is_file()
            and not SKIP_PARTS.intersection(rel.parts)
            and path.suffix not in SKIP_SUFFIXES
            and not _is_partial(path)
        ):
            files.append((path, f"{name}/{rel.as_posix()}"))
    files.append((SCHEMA, f"{name}/{SCHEMA_IN_ZIP}"))
    return files


def pack(bundle: Path, out_dir: Path) -> Path:
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    target = out_dir / f"{bundle.name}_v{metadata['version']}.zip"

    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
            for path, arcname in bundle_files(bundle):
                archive.write(path, arcname)

    return atomic_write(target, write)


def build_wheel(out_dir: Path) -> Path:
    """The project's wheel (``pip wheel --no-deps``) in ``out_dir``, for installing the code the bundles import."""
    before = set(out_dir.glob("*.whl"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(out_dir),
         str(ROOT)],
        check=True,
    )  # fmt: skip
    wheels = sorted(set(out_dir.glob("monai_rrn_roigan-*.whl")) - before) or sorted(out_dir.glob("monai_rrn_roigan-*"))
    return wheels[-1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="dist", type=Path)
    parser.add_argument("--wheel", action="store_true", help="also build the project's wheel into --out")
    args = parser.parse_args()
    bundles = sorted(p.parent.parent for p in (ROOT / "bundles").glob("*/configs/metadata.json"))
    if not bundles:
        print("no bundle folders with configs/metadata.json under bundles/: nothing to pack")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for bundle in bundles:
        print(f"wrote {pack(bundle, args.out)}")
    if args.wheel:
        print(f"wrote {build_wheel(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
