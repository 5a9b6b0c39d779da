"""The CPU resources of the optimisers: how many threads their steps run on, and freed memory handed back."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import sys
from collections.abc import Iterator

import torch

__all__ = ["few_threads", "release_freed_memory"]


@contextlib.contextmanager
def few_threads(count: int = 1) -> Iterator[None]:
    """Run the block on ``count`` intra-op threads (CPU), then restore the setting.

    The optimisers' steps work on a few thousand points or a coarse grid: more threads only add
    synchronisation, and on a busy machine they spin against each other (measured on a loaded 2-core
    machine: 30 ms a step on one thread, several hundred on two). The large one-off operations (features,
    resampling, outputs) keep every thread.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def release_freed_memory() -> None:
    """Hand the memory the registration freed back to the system (glibc's ``malloc_trim``; nothing elsewhere).

    Freed tensors otherwise stay in the process's heap, and the outputs' own allocations land on top of them:
    measured on a one-lung pair, the outputs' peak resident size fell by 0.2 GB.
    """
    gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
