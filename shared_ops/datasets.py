"""MONAI's ``CacheDataset`` with a cache fill that stops cleanly on a bad item."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from monai.data import CacheDataset

__all__ = ["SafeCacheDataset"]


class SafeCacheDataset(CacheDataset):
    """``CacheDataset`` whose cache fill waits for the items still being loaded before an error propagates.

    MONAI fills the cache on a ``multiprocessing.pool.ThreadPool`` and terminates it when an item fails (a
    refused file, say) while its other threads are still inside native code reading the next items; the
    interpreter then exits under them and can abort (SIGABRT, "terminate called without an active
    exception") instead of exiting with the error. Here the pending items are cancelled and the running ones
    finish first, so the process ends with the item's error and exit code 1. The items, their order and the
    cache are MONAI's.
    """

    def _fill_cache(self, indices=None) -> list:
        if self.cache_num <= 0:
            return []
        indices = list(range(self.cache_num)) if indices is None else list(indices)
        pool = ThreadPoolExecutor(max_workers=self.num_workers)
        futures = [pool.submit(self._load_cache_item, index) for index in indices]
        if self.progress:
            from tqdm.auto import tqdm

            futures = tqdm(futures, desc="Loading dataset")
        try:
            items = [future.result() for future in futures]
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        return items
