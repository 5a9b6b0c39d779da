"""Test configuration shared by every test folder.

Real data (CT, landmarks, whole-slide images, tiles) lives outside the repository. Tests find it through
the environment variable ``RRN_ROIGAN_DATA`` (default: ``../shared/data`` next to the repository) and skip,
with the reason, when it is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_ENV = "RRN_ROIGAN_DATA"


def data_root() -> Path:
    return Path(os.environ.get(DATA_ENV, REPO_ROOT.parent / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Folder of the real test data; skips the test when it is missing."""
    root = data_root()
    if not root.is_dir():
        pytest.skip(f"real test data not found at {root} (set {DATA_ENV} to its folder)")
    return root


def require_data(relative: str) -> Path:
    """Path of one file or folder of the real data, skipping the calling test when it is missing."""
    path = data_root() / relative
    if not path.exists():
        pytest.skip(f"real test data {relative!r} not found under {data_root()} (set {DATA_ENV})")
    return path


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
