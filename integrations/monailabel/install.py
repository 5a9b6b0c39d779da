"""Install MONAI Label 0.8.5 for the apps in this folder into the running Python environment, without torchvision.

monailabel 0.8.5 declares torchvision and sam2 as requirements (installing them would replace the CPU build of torch)
and many packages its server never imports. This script installs monailabel and pydicom-seg with ``--no-deps`` and
the packages the server does import from ``requirements.txt``. Every ``pip install`` goes through the project's
``constraints.txt`` (torch pinned) and a snapshot of the environment (``pip freeze``), so that nothing already
installed is upgraded, downgraded or replaced: a requirement that would need that makes the install fail instead.

    python integrations/monailabel/install.py           # install (nothing to do when the server already imports)
    python integrations/monailabel/install.py --check   # exit status 0 when the server imports, 1 otherwise

The apps avoid the few monailabel modules that import torchvision (``monailabel.transform.post``,
``monailabel.deepedit``) and the SAM2 tasks.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
REQUIREMENTS = HERE / "requirements.txt"
CONSTRAINTS = REPO_ROOT / "constraints.txt"
#: Installed with --no-deps (see the module notes).
NO_DEPS = ("monailabel==0.8.5", "pydicom-seg==0.4.1")
#: What ``monailabel start_server`` imports: the FastAPI app with every endpoint and the base app class.
SERVER_MODULE = "monailabel.app"


def server_imports(python: str = sys.executable, timeout: float = 300) -> tuple[bool, str]:
    """Whether ``python`` can import the MONAI Label server; ``(ok, last lines of the error)``."""
    with tempfile.TemporaryDirectory() as folder:  # away from any .env file, which MONAI Label's settings would read
        done = subprocess.run(
            [python, "-c", f"import {SERVER_MODULE}"], cwd=folder, capture_output=True, text=True, timeout=timeout
        )
    return done.returncode == 0, "\n".join((done.stdout + done.stderr).strip().splitlines()[-5:])


def frozen_constraints(python: str, path: Path) -> Path:
    """Write the installed distributions of ``python`` as ``name==version`` constraints to ``path``."""
    listing = subprocess.run(
        [python, "-m", "pip", "freeze", "--exclude-editable"], capture_output=True, text=True, check=True
    ).stdout
    pins = [line for line in listing.splitlines() if "==" in line and " @ " not in line and not line.startswith("-")]
    path.write_text("\n".join(pins) + "\n")
    return path


def _pip(python: str, *args: str, constraints: Path) -> None:
    env = {**os.environ, "PIP_CONSTRAINT": str(CONSTRAINTS)}
    command = [python, "-m", "pip", "install", "--quiet", "-c", str(CONSTRAINTS), "-c", str(constraints), *args]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, env=env, check=True)


def install(python: str = sys.executable) -> None:
    """Install monailabel (no deps) and the server's imports into ``python``'s environment; a no-op when it imports.

    Raises:
        subprocess.CalledProcessError: pip failed (for example a requirement that would replace an installed package).
        RuntimeError: the installs finished but the server still does not import (the message says why).
    """
    if server_imports(python)[0]:
        return
    with tempfile.TemporaryDirectory() as folder:
        frozen = frozen_constraints(python, Path(folder) / "installed.txt")
        _pip(python, "-r", str(REQUIREMENTS), constraints=frozen)
        _pip(python, "--no-deps", *NO_DEPS, constraints=frozen)
    ok, detail = server_imports(python)
    if not ok:
        raise RuntimeError(f"MONAI Label was installed but its server does not import:\n{detail}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check that the server imports")
    parser.add_argument("--python", default=sys.executable, help="interpreter of the environment (default: this one)")
    args = parser.parse_args()
    if args.check:
        ok, detail = server_imports(args.python)
        print("MONAI Label server imports" if ok else f"MONAI Label server does not import:\n{detail}")
        return 0 if ok else 1
    try:
        install(args.python)
    except (subprocess.CalledProcessError, RuntimeError) as error:
        print(f"install failed: {error}", file=sys.stderr)
        return 1
    print("MONAI Label server imports")
    return 0


if __name__ == "__main__":
    sys.exit(main())
