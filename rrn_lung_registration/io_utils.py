"""Small file-system helpers: every output of the package is written through :func:`atomic_write`.

:func:`atomic_write` is the project's one atomic-write helper, :func:`shared_ops.atomic.atomic_write`,
re-exported here so that ``from rrn_lung_registration.io_utils import atomic_write`` keeps working.
"""

from __future__ import annotations

from shared_ops.atomic import atomic_write

__all__ = ["atomic_write"]
