"""Streaming writer of tiled, pyramidal BigTIFF slides that OpenSlide (and so QuPath) opens.

File layout (one BigTIFF, written by ``tifffile``):

* **Pages.** Page ``k`` of the main IFD chain holds pyramid level ``k``: page 0 the full-resolution image
  (``NewSubfileType`` 0), pages 1, 2, ... the reduced levels (``NewSubfileType`` 1, reduced-resolution image),
  level ``k + 1`` being ``ceil(h_k / 2) x ceil(w_k / 2)`` down to the first level whose larger side is at most
  ``min_level_size``. The levels are separate pages of the main chain, not SubIFDs of page 0, because OpenSlide's
  *generic-tiff* reader builds its pyramid from the tiled pages of the main IFD chain (sorted by size) and
  ignores SubIFDs; QuPath opens such files through OpenSlide or Bio-Formats alike.
* **Tiles.** Every page is tiled ``tile_size x tile_size`` (a multiple of 16, as JPEG with 2x2 chroma
  subsampling requires) in row-major tile order; tiles crossing the right or bottom edge are full-size, padded
  with ``background``. Compression is JPEG (RGB only; ``tifffile`` stores it as YCbCr with 2x2 subsampling,
  ``PhotometricInterpretation`` 6, each tile a complete JPEG stream), Adobe deflate with horizontal predictor
  (lossless, grey or RGB) or none.
* **Resolution.** ``XResolution = YResolution = 1e4 / (mpp * 2**k)`` pixels per centimetre with
  ``ResolutionUnit`` CENTIMETER on page ``k`` (level ``k`` pixel = ``2**k`` level-0 pixels), from which OpenSlide
  derives ``openslide.mpp-x`` / ``openslide.mpp-y``. An optional ``description`` string (e.g. JSON) goes into the
  ``ImageDescription`` of page 0 (OpenSlide shows it as ``openslide.comment``); no ``tifffile`` metadata is
  written.

Streaming and memory: the image arrives as consecutive bands of rows of any height
(:meth:`PyramidalTiffWriter.write_rows`). Each level keeps one band of ``tile_size`` rows; a full band (or the
last partial one) is cut into tiles at once. Level-0 tiles go through a bounded :class:`queue.Queue` to a
background :class:`threading.Thread` running ``TiffWriter.write`` on an iterator of them (the encoding, itself
spread over a few ``tifffile`` worker threads, overlaps the caller's work; an error there is re-raised in the
caller at the next ``write_rows`` or ``close``). The rows of each reduced level are 2x2 means of the rows of the
level above (rounded half up; at odd right/bottom edges the mean of the pixels present), computed as the rows
arrive; their finished tiles are spooled, zlib-compressed (level 1), to a temporary file next to the output,
and once page 0 is complete each reduced level is written as the next page from that spool. Memory is thus
``O(width * tile_size * levels)`` whatever the height (about 70 MB for a 20000-pixel-wide RGB slide: a band and
a queue of tiles at level 0, halving temporaries, smaller bands below); only the tile offsets grow with the
image.

The output is written to a temporary sibling (:func:`shared_ops.atomic.temporary_sibling`) renamed over ``path``
by :meth:`PyramidalTiffWriter.close`; until then a previous file at ``path`` is untouched, and
:meth:`PyramidalTiffWriter.abort` (or an exception in a ``with`` block) leaves neither output nor temporary files.

Shapes: images and bands of rows are ``(H, W, C)`` ``uint8`` (``C`` = 3 for RGB, 1 for grey, where ``(H, W)`` is
accepted too); levels are ``(height, width)``.
"""

from __future__ import annotations

import math
import numbers
import os
import queue
import threading
import zlib
from array import array
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from shared_ops.atomic import file_mode, temporary_sibling

__all__ = ["COMPRESSIONS", "PyramidalTiffWriter", "halve_rows", "pyramid_levels", "write_pyramidal_tiff"]

#: Supported values of the ``compression`` argument.
COMPRESSIONS = ("jpeg", "deflate", "none")

_POLL_S = 0.05  # how often blocked queue operations look for an error or an abort
_SPOOL_ZLIB_LEVEL = 1


class _Aborted(Exception):
    """Raised inside the background writer's tile iterator to stop ``TiffWriter.write`` on abort."""


# ----------------------------------------------------------------------------------------------------------------
# Pyramid geometry and downsampling
# ----------------------------------------------------------------------------------------------------------------


def pyramid_levels(height: int, width: int, min_level_size: int = 512) -> list[tuple[int, int]]:
    """The ``(height, width)`` of every level: level 0 is the image, level ``k + 1`` is ``ceil(level k / 2)``
    in each axis, ending with the first level whose larger side is ``<= min_level_size`` (at least one level)."""
    levels = [(int(height), int(width))]
    while max(levels[-1]) > min_level_size:
        h, w = levels[-1]
        levels.append(((h + 1) // 2, (w + 1) // 2))
    return levels


def halve_rows(rows: np.ndarray) -> np.ndarray:
    """2x2 means ``(ceil(h / 2), ceil(w / 2), C)`` uint8 of ``rows`` ``(h, w, C)`` uint8, rounded half up.

    An odd last row or column is averaged over the pixels present (it is replicated before the 2x2 sum, which
    gives exactly that mean), so bands of an even number of rows can be halved independently.
    """
    if rows.shape[0] % 2:
        rows = np.concatenate([rows, rows[-1:]], axis=0)
    sums = rows[0::2].astype(np.uint16)  # (m, w, C) sums of vertical pairs, contiguous
    sums += rows[1::2]
    if sums.shape[1] % 2:
        sums = np.concatenate([sums, sums[:, -1:]], axis=1)
    pairs = sums.reshape(sums.shape[0], sums.shape[1] // 2, 2, sums.shape[2])
    out = pairs[:, :, 0] + pairs[:, :, 1]  # a new contiguous array: fast in-place rounding below
    out += 2
    out >>= 2
    return out.astype(np.uint8)


class _Halver:
    """Turns the rows of a level of ``parent_height`` rows, arriving in bands of any height, into rows of the
    next level; an unpaired row waits (copied) for the next band, or is halved alone when it is the last."""

    def __init__(self, parent_height: int) -> None:
        self._parent_height = parent_height
        self._seen = 0
        self._carry: np.ndarray | None = None

    def __call__(self, rows: np.ndarray) -> np.ndarray | None:
        """Rows ``(m, ceil(w / 2), C)`` of the next level made available by ``rows`` ``(h, w, C)``, or None."""
        self._seen += rows.shape[0]
        if self._carry is not None:
            rows = np.concatenate([self._carry, rows], axis=0)
            self._carry = None
        usable = rows.shape[0] if self._seen == self._parent_height else rows.shape[0] // 2 * 2
        if usable < rows.shape[0]:
            self._carry = rows[usable:].copy()  # the caller may reuse its buffer
        return halve_rows(rows[:usable]) if usable else None


# ----------------------------------------------------------------------------------------------------------------
# Bands of rows cut into tiles, and the spool of reduced-level tiles
# ----------------------------------------------------------------------------------------------------------------


class _TileBand:
    """Collects the rows of one level ``(height, width)`` into a band of ``tile_size`` rows; each full band, and
    the last partial one, is cut into its row of ``(tile_size, tile_size, C)`` tiles (contiguous copies, padded
    with ``background``) handed to ``emit``. The band buffer is reused, so memory is one band per level."""

    def __init__(
        self,
        shape: tuple[int, int],
        channels: int,
        tile_size: int,
        background: int,
        emit: Callable[[list[np.ndarray]], None],
    ) -> None:
        self.height, self.width = shape
        self._tile_size = tile_size
        self._background = background
        self._emit = emit
        self._tiles_across = -(-self.width // tile_size)
        self._band = np.full((tile_size, self._tiles_across * tile_size, channels), background, dtype=np.uint8)
        self._rows_done = 0
        self._filled = 0

    def add(self, rows: np.ndarray) -> None:
        """Append ``rows`` ``(h, width, C)``, emitting the tiles of every band they complete."""
        start = 0
        while start < rows.shape[0]:
            count = min(rows.shape[0] - start, self._tile_size - self._filled)
            self._band[self._filled : self._filled + count, : self.width] = rows[start : start + count]
            self._filled += count
            self._rows_done += count
            start += count
            if self._filled == self._tile_size or self._rows_done == self.height:
                self._flush()

    def _flush(self) -> None:
        band, size = self._band, self._tile_size
        band[self._filled :] = self._background  # below the image in the last band (earlier rows are stale)
        self._emit([band[:, j * size : (j + 1) * size].copy() for j in range(self._tiles_across)])
        self._filled = 0


class _TileSpool:
    """Temporary file of zlib-compressed raw tiles of the reduced levels, with an in-memory index of offsets."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "w+b")  # closed by discard()
        self._offsets: dict[int, array] = {}
        self._lengths: dict[int, array] = {}

    def append(self, level: int, tile: np.ndarray) -> None:
        """Store ``tile`` as the next tile of ``level``."""
        data = zlib.compress(np.ascontiguousarray(tile), _SPOOL_ZLIB_LEVEL)
        self._file.seek(0, os.SEEK_END)
        self._offsets.setdefault(level, array("q")).append(self._file.tell())
        self._lengths.setdefault(level, array("q")).append(len(data))
        self._file.write(data)

    def tiles(self, level: int, shape: tuple[int, ...]) -> Iterator[np.ndarray]:
        """The tiles of ``level`` in the order stored, each decompressed to ``shape``."""
        for offset, length in zip(self._offsets.get(level, ()), self._lengths.get(level, ()), strict=True):
            self._file.seek(offset)
            yield np.frombuffer(zlib.decompress(self._file.read(length)), dtype=np.uint8).reshape(shape)

    def discard(self) -> None:
        """Close and delete the spool file."""
        self._file.close()
        self.path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------------------
# Argument validation
# ----------------------------------------------------------------------------------------------------------------


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _validate_mpp(mpp: Any) -> float:
    if isinstance(mpp, bool) or not isinstance(mpp, numbers.Real) or not math.isfinite(mpp) or mpp <= 0:
        raise ValueError(f"mpp (microns per pixel) must be a finite number > 0, got {mpp!r}")
    return float(mpp)


def _validate_options(compression: Any, channels: int, quality: Any, background: Any, tile_size: int) -> None:
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")
    if compression == "jpeg" and channels != 3:
        raise ValueError(f"jpeg compression needs RGB (channels=3), got channels={channels}; use 'deflate'")
    if isinstance(quality, bool) or not isinstance(quality, numbers.Integral) or not 1 <= quality <= 100:
        raise ValueError(f"quality must be an integer in 1..100, got {quality!r}")
    if isinstance(background, bool) or not isinstance(background, numbers.Integral) or not 0 <= background <= 255:
        raise ValueError(f"background must be an integer grey level in 0..255, got {background!r}")
    if tile_size % 16:
        raise ValueError(f"tile_size must be a multiple of 16, got {tile_size}")


def _validate_description(description: Any) -> str | None:
    """TIFF ASCII tags hold 7-bit text without NUL (JSON from ``json.dumps`` with ``ensure_ascii`` qualifies)."""
    if description is None:
        return None
    if not isinstance(description, str):
        raise ValueError(f"description must be a string or None, got {type(description).__name__}")
    if not description.isascii() or "\0" in description:
        raise ValueError("description must be 7-bit ASCII without NUL (escape other characters, e.g. json.dumps)")
    return description


def _encoder_threads() -> int:
    """Threads ``tifffile`` may use to encode tiles of one page."""
    return max(1, min(4, os.cpu_count() or 1))


# ----------------------------------------------------------------------------------------------------------------
# The writer
# ----------------------------------------------------------------------------------------------------------------


class PyramidalTiffWriter:
    """Streams an image of (height, width, channels) uint8, given as consecutive bands of rows top to bottom,
    into a tiled pyramidal BigTIFF at `path`.

    Args:
        path: output file (``.tif``/``.tiff``); its folder is created if missing. Written only by :meth:`close`.
        height, width: image size in pixels.
        mpp: microns per pixel of level 0 (finite, > 0).
        channels: 3 (RGB) or 1 (grey).
        tile_size: tile side in pixels, a multiple of 16.
        compression: ``"jpeg"`` (RGB only), ``"deflate"`` (lossless) or ``"none"``.
        quality: JPEG quality 1..100 (ignored otherwise).
        background: grey level 0..255 padding the edge tiles.
        min_level_size: the pyramid stops at the first level whose larger side is at most this.
        description: ``ImageDescription`` of page 0 (e.g. JSON), or None.

    Use as a context manager: leaving the block normally calls :meth:`close`, an exception calls :meth:`abort`.
    Rows passed to :meth:`write_rows` are copied; the caller may reuse its buffer. Not thread-safe: write from
    one thread.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        height: int,
        width: int,
        mpp: float,
        channels: int = 3,
        tile_size: int = 256,
        compression: str = "jpeg",
        quality: int = 90,
        background: int = 255,
        min_level_size: int = 512,
        description: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.height = _positive_int(height, "height")
        self.width = _positive_int(width, "width")
        self.mpp = _validate_mpp(mpp)
        self.channels = _positive_int(channels, "channels")
        self.tile_size = _positive_int(tile_size, "tile_size")
        self.min_level_size = _positive_int(min_level_size, "min_level_size")
        _validate_options(compression, self.channels, quality, background, self.tile_size)
        self.compression, self.quality, self.background = compression, int(quality), int(background)
        self.description = _validate_description(description)
        self._levels = pyramid_levels(self.height, self.width, self.min_level_size)
        self._rows_written = 0
        self._state = "open"
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._open_files()
        try:
            self._build_pipeline()
            self._thread = threading.Thread(target=self._write_base, name=f"pyramid-{self.path.name}", daemon=True)
            self._thread.start()
        except BaseException:
            self._discard_files()
            raise

    def _open_files(self) -> None:
        self._tmp = temporary_sibling(self.path)
        self._spool: _TileSpool | None = None
        try:
            self._tiff = tifffile.TiffWriter(self._tmp, bigtiff=True)
            if len(self._levels) > 1:
                self._spool = _TileSpool(temporary_sibling(self.path.with_name(self.path.name + ".spool")))
        except BaseException:
            self._discard_files()
            raise

    def _build_pipeline(self) -> None:
        """One :class:`_TileBand` per level (level 0 feeding the queue, the others the spool) and one
        :class:`_Halver` between consecutive levels."""
        tiles_across = -(-self.width // self.tile_size)
        self._queue: queue.Queue = queue.Queue(maxsize=tiles_across)  # one band of tiles waiting at most
        self._bands = [self._band(0, self._enqueue)]
        for k in range(1, len(self._levels)):
            self._bands.append(self._band(k, self._spooler(k)))
        self._halvers = [_Halver(h) for h, _ in self._levels[:-1]]

    def _band(self, level: int, emit: Callable[[list[np.ndarray]], None]) -> _TileBand:
        return _TileBand(self._levels[level], self.channels, self.tile_size, self.background, emit)

    # -- public API ----------------------------------------------------------------------------------------------

    @property
    def levels(self) -> list[tuple[int, int]]:
        """``(height, width)`` of each pyramid level, level 0 first."""
        return list(self._levels)

    @property
    def rows_written(self) -> int:
        """Number of level-0 rows received so far."""
        return self._rows_written

    def write_rows(self, rows: np.ndarray) -> None:
        """Append ``rows`` ``(h, width, channels)`` uint8 (``h >= 1``; ``(h, width)`` for grey) below the previous
        rows. Raises ValueError for a wrong shape or dtype or rows beyond ``height``, and re-raises an error of the
        background writer (after aborting)."""
        self._check_open()
        self._raise_background_error()
        rows = self._validate_rows(rows)
        if self._rows_written + rows.shape[0] > self.height:
            remaining = self.height - self._rows_written
            raise ValueError(f"got {rows.shape[0]} rows but only {remaining} of the {self.height} rows remain")
        self._rows_written += rows.shape[0]
        for level, band in enumerate(self._bands):
            if level:
                rows = self._halvers[level - 1](rows)
                if rows is None:
                    break
            band.add(rows)

    def close(self) -> Path:
        """Finish the file and rename it to ``path``; returns ``path``.

        All ``height`` rows must have been written, else the writer is aborted and ValueError says how many are
        missing. Calling it again after success returns ``path``.
        """
        if self._state == "closed":
            return self.path
        self._check_open()
        missing = self.height - self._rows_written
        if missing:
            self.abort()
            raise ValueError(f"{missing} of the {self.height} rows are missing; nothing was written to {self.path}")
        try:
            self._thread.join()
            self._raise_background_error()
            for level in range(1, len(self._levels)):
                self._tiff.write(self._spool.tiles(level, self._tile_shape()), **self._page_args(level))
            self._tiff.close()
            self._spool_discard()
            os.chmod(self._tmp, file_mode())
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        self._state = "closed"
        return self.path

    def abort(self) -> None:
        """Stop writing and delete the temporary and spool files; nothing is written to ``path``. A no-op once
        closed or aborted."""
        if self._state != "open":
            return
        self._state = "aborted"
        self._stop.set()
        self._thread.join()
        self._discard_files()

    def __enter__(self) -> PyramidalTiffWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # -- rows and state ------------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._state != "open":
            raise ValueError(f"the writer of {self.path} is {self._state}")

    def _validate_rows(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows)
        if rows.ndim == 2 and self.channels == 1:
            rows = rows[:, :, None]
        expected = f"(h, {self.width}, {self.channels}) uint8 with h >= 1"
        if rows.ndim != 3 or rows.shape[0] < 1 or rows.shape[1:] != (self.width, self.channels):
            raise ValueError(f"rows must have shape {expected}, got {rows.shape}")
        if rows.dtype != np.uint8:
            raise ValueError(f"rows must have shape {expected}, got dtype {rows.dtype}")
        return rows

    def _raise_background_error(self) -> None:
        if self._error is not None:
            error = self._error
            self.abort()
            raise error
        if not self._thread.is_alive() and self._rows_written < self.height:
            self.abort()
            raise RuntimeError(f"the background writer of {self.path} stopped unexpectedly")

    def _discard_files(self) -> None:
        tiff = getattr(self, "_tiff", None)
        if tiff is not None:
            try:
                tiff.close()
            except Exception:  # the partial file is deleted anyway
                pass
        self._spool_discard()
        self._tmp.unlink(missing_ok=True)

    def _spool_discard(self) -> None:
        if self._spool is not None:
            self._spool.discard()
            self._spool = None

    # -- level 0: queue and background thread --------------------------------------------------------------------

    def _tile_shape(self) -> tuple[int, ...]:
        size = self.tile_size
        return (size, size) if self.channels == 1 else (size, size, self.channels)

    def _enqueue(self, tiles: list[np.ndarray]) -> None:
        """Hand level-0 tiles to the background thread, waiting while the queue is full."""
        shape = self._tile_shape()
        for tile in tiles:
            tile = tile.reshape(shape)
            while True:
                self._raise_background_error()
                try:
                    self._queue.put(tile, timeout=_POLL_S)
                    break
                except queue.Full:
                    continue

    def _queued_tiles(self) -> Iterator[np.ndarray]:
        """The level-0 tiles from the queue, in order (runs in the background thread)."""
        rows, cols = (-(-n // self.tile_size) for n in self._levels[0])
        for _ in range(rows * cols):
            while True:
                if self._stop.is_set():
                    raise _Aborted
                try:
                    tile = self._queue.get(timeout=_POLL_S)
                    break
                except queue.Empty:
                    continue
            yield tile
            del tile

    def _write_base(self) -> None:
        """Body of the background thread: write page 0 from the queued tiles."""
        try:
            self._tiff.write(self._queued_tiles(), **self._page_args(0))
        except _Aborted:
            pass
        except BaseException as error:  # re-raised in the caller's thread
            self._error = error

    # -- reduced levels and page tags ----------------------------------------------------------------------------

    def _spooler(self, level: int) -> Callable[[list[np.ndarray]], None]:
        def emit(tiles: list[np.ndarray]) -> None:
            for tile in tiles:
                self._spool.append(level, tile)

        return emit

    def _page_args(self, level: int) -> dict[str, Any]:
        """Keyword arguments of ``TiffWriter.write`` for the page of ``level``."""
        height, width = self._levels[level]
        pixels_per_cm = 1e4 / (self.mpp * 2**level)
        workers = _encoder_threads()
        tile_bytes = self.tile_size * self.tile_size * self.channels
        args: dict[str, Any] = {
            "shape": (height, width) if self.channels == 1 else (height, width, self.channels),
            "dtype": np.uint8,
            "tile": (self.tile_size, self.tile_size),
            "photometric": "minisblack" if self.channels == 1 else "rgb",
            "resolution": (pixels_per_cm, pixels_per_cm),
            "resolutionunit": "CENTIMETER",
            "subfiletype": 1 if level else 0,
            "description": self.description if level == 0 else None,
            "metadata": None,
            "maxworkers": workers,
            "buffersize": 4 * workers * tile_bytes,  # tifffile pulls this much ahead of the encoders
        }
        if self.compression == "jpeg":
            args.update(compression="jpeg", compressionargs={"level": self.quality}, subsampling=(2, 2))
        elif self.compression == "deflate":
            args.update(compression="adobe_deflate", predictor="horizontal")
        return args


def write_pyramidal_tiff(path: str | os.PathLike, image: np.ndarray, mpp: float, **kwargs: Any) -> Path:
    """Write an in-memory ``image`` ``(H, W, C)`` or ``(H, W)`` uint8 as a pyramidal TIFF at ``path``.

    ``kwargs`` are those of :class:`PyramidalTiffWriter` except ``channels`` (taken from ``image``). Returns
    ``path``.
    """
    image = np.asarray(image)
    if image.ndim not in (2, 3) or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, C) or (H, W) uint8, got {image.shape} {image.dtype}")
    channels = 1 if image.ndim == 2 else image.shape[2]
    with PyramidalTiffWriter(path, image.shape[0], image.shape[1], mpp, channels=channels, **kwargs) as writer:
        for start in range(0, image.shape[0], writer.tile_size):
            writer.write_rows(image[start : start + writer.tile_size])
    return writer.path
