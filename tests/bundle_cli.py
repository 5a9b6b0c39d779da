"""Running a bundle's real configs through ``python -m monai.bundle`` in a subprocess, for the bundle tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT

TIMEOUT = 600


class BundleCLI:
    """Command lines for ``bundles/<name>``: ``config("train", "evaluate")`` merges config files in order."""

    def __init__(self, name: str) -> None:
        self.configs = REPO_ROOT / "bundles" / name / "configs"

    def config(self, *names: str) -> str:
        files = [str(self.configs / f"{name}.json") for name in names]
        return files[0] if len(files) == 1 else json.dumps(files)

    def command(self, config: str, root: Path, *extra: str, launcher: list[str] | None = None) -> list[str]:
        launcher = launcher or [sys.executable, "-m", "monai.bundle"]
        return [
            *launcher, "run",
            "--config_file", config,
            "--meta_file", str(self.configs / "metadata.json"),
            "--logging_file", str(self.configs / "logging.conf"),
            "--bundle_root", str(root),
            *extra,
        ]  # fmt: skip


def subprocess_env() -> dict[str, str]:
    """One thread per process (runs may share the two cores) and the repository on the path."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}


def run_checked(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run to completion; on failure the assertion shows the command and the end of its output."""
    result = subprocess.run(command, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result
