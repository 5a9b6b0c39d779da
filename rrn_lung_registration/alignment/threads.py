"""How many threads the optimisers' steps run on."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["few_threads"]


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
