"""Streaming assembly of translated tiles into finished rows of the output slide.

:class:`BandBlender` takes tiles in the grid's row-major order (tiles that were not run, e.g. background, are
simply not given) and hands out finished rows top to bottom as soon as no later tile can touch them. Each
output pixel is

    background + sum_i w_i * (tile_i - background) / sum_all w

where the first sum runs over the tiles given and the second over every grid position, with the separable
blending window ``w`` of :mod:`roigan_stain_transfer.wsi.tiling`. Tiles that are not given therefore count as
background, so the background stays exactly white, and tiles that repeat the input reproduce it exactly: the
stitching adds nothing of its own. Memory: one ``(tile_size, W, 3)`` float32 accumulator.

:class:`RowReducer` shrinks a stream of row bands by an integer factor (area mean), for thumbnails and heat
maps that must not hold the full-resolution slide.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from roigan_stain_transfer.wsi.tiling import TileGrid

__all__ = ["BandBlender", "RowReducer", "seam_step", "spans"]

RowsCallback = Callable[[int, np.ndarray], None]


class BandBlender:
    """Blends tiles ``(tile_size, tile_size, C)`` (values 0..255, any float or uint8) given in row-major grid order.

    Args:
        grid: the tile grid over the output ``(H, W)``.
        emit: called as ``emit(top_row, rows)`` with finished ``rows`` ``(h, W, C)`` uint8, top to bottom, each
            row exactly once.
        channels: ``C``.
        background: value of the background (255: white glass).
    """

    def __init__(self, grid: TileGrid, emit: RowsCallback, channels: int = 3, background: float = 255.0) -> None:
        self.grid = grid
        self.emit = emit
        self.background = float(background)
        height, width = grid.shape
        self._window = grid.window()[..., None]
        row_sums, col_sums = grid.weight_sums()
        self._row_sums = row_sums
        self._col_sums = col_sums[None, :, None]
        self._acc = np.zeros((grid.tile_size, width, channels), dtype=np.float32)
        self._touched = np.zeros((grid.tile_size, width), dtype=bool)  # where self._acc may be non-zero
        self._top = 0  # output row held by self._acc[0]
        self._next_tile = 0  # flat index the next tile must have at least
        self._tile_row = 0  # grid row currently being accumulated
        self._done = False

    @property
    def finished_rows(self) -> int:
        """Output rows emitted so far."""
        return self._top

    def _flush_until(self, row: int) -> None:
        """Emit output rows ``[top, row)`` and slide the accumulator down to start at ``row``."""
        count = row - self._top
        if count <= 0:
            return
        rows = np.full((count, self._acc.shape[1], self._acc.shape[2]), self.background, dtype=np.float32)
        for left, right in spans(self._touched[:count].any(axis=0)):  # columns no tile reached stay background
            weights = self._row_sums[self._top : row, None, None] * self._col_sums[:, left:right]
            rows[:, left:right] += self._acc[:count, left:right] / weights
        np.rint(rows, out=rows)
        self.emit(self._top, np.clip(rows, 0, 255, out=rows).astype(np.uint8))
        for array in (self._acc, self._touched):
            array[: len(array) - count] = array[count:].copy()
            array[len(array) - count :] = 0
        self._top = row

    def _advance_to_row(self, tile_row: int) -> None:
        while self._tile_row < tile_row:
            self._tile_row += 1
            self._flush_until(int(self.grid.rows[self._tile_row]))

    def add(self, index: int, tile: np.ndarray) -> None:
        """Add the tile with flat grid index ``index`` (row-major); indices must increase."""
        if self._done:
            raise RuntimeError("BandBlender: tile added after close()")
        if index < self._next_tile or index >= len(self.grid):
            raise ValueError(
                f"BandBlender: tile {index} out of order (next allowed {self._next_tile}, {len(self.grid)} tiles)"
            )
        size = self.grid.tile_size
        if tile.shape[:2] != (size, size) or tile.shape[2] != self._acc.shape[2]:
            raise ValueError(f"BandBlender: expected a tile ({size}, {size}, {self._acc.shape[2]}), got {tile.shape}")
        tile_row, tile_col = divmod(int(index), len(self.grid.cols))
        self._advance_to_row(tile_row)
        top = int(self.grid.rows[tile_row]) - self._top
        left = int(self.grid.cols[tile_col])
        region = self._acc[top : top + size, left : left + size]
        region += self._window * (np.asarray(tile, dtype=np.float32) - self.background)
        self._touched[top : top + size, left : left + size] = True
        self._next_tile = int(index) + 1

    def close(self) -> None:
        """Emit every remaining row (call once, after the last tile)."""
        if not self._done:
            self._advance_to_row(len(self.grid.rows) - 1)
            self._flush_until(self.grid.shape[0])
            self._done = True


def spans(flags: np.ndarray) -> list[tuple[int, int]]:
    """``[start, stop)`` of the runs of True in a 1-D bool array."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flags.astype(np.int8), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


class RowReducer:
    """Area-mean reduction by an integer ``factor`` of an image streamed as row bands ``(h, W, C)``.

    Output rows ``(ceil(H / factor), ceil(W / factor), C)`` float32 are collected in :attr:`image`; the last row
    and column average the pixels present. ``transform`` (optional) maps each incoming band to the values that
    are reduced (e.g. a stain channel), ``(h, W, C) uint8 -> (h, W, C') float``.
    """

    def __init__(
        self,
        height: int,
        width: int,
        channels: int,
        factor: int,
        transform: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        if factor < 1:
            raise ValueError(f"RowReducer: factor must be >= 1, got {factor}")
        self.factor = int(factor)
        self.height, self.width = int(height), int(width)
        self.transform = transform
        out_w = -(-self.width // self.factor)
        self.image = np.zeros((-(-self.height // self.factor), out_w, channels), dtype=np.float32)
        counts = np.full(out_w, self.factor, dtype=np.float32)
        counts[-1] = self.width - (out_w - 1) * self.factor
        self._col_counts = counts[None, :, None]
        self._rows = 0

    def add(self, rows: np.ndarray) -> None:
        """Add the next band of rows ``(h, W, C)``."""
        values = self.transform(rows) if self.transform is not None else rows
        values = np.asarray(values)
        if values.ndim == 2:
            values = values[..., None]
        start = self._rows
        self._rows += len(values)
        if self._rows > self.height:
            raise ValueError(f"RowReducer: {self._rows} rows given for an image of {self.height}")
        # rows first (contiguous, shrinks the data by the factor), then columns
        first_out, last_out = start // self.factor, (self._rows - 1) // self.factor
        bounds = [max(start, r * self.factor) - start for r in range(first_out, last_out + 2)]
        bounds[-1] = len(values)
        row_sums = np.stack(
            [values[a:b].sum(axis=0, dtype=np.float32) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        )
        out_w = self.image.shape[1]
        pad = out_w * self.factor - self.width
        if pad:
            row_sums = np.concatenate([row_sums, np.zeros((len(row_sums), pad, row_sums.shape[2]), np.float32)], axis=1)
        sums = row_sums.reshape(len(row_sums), out_w, self.factor, -1).sum(axis=2)
        self.image[first_out : last_out + 1] += sums / self._col_counts

    def result(self) -> np.ndarray:
        """The reduced image ``(h', w', C)`` float32, area means (call after the last band)."""
        if self._rows != self.height:
            raise ValueError(f"RowReducer: {self._rows} of {self.height} rows given")
        counts = np.full(self.image.shape[0], self.factor, dtype=np.float32)
        counts[-1] = self.height - (self.image.shape[0] - 1) * self.factor
        return self.image / counts[:, None, None]


def _border_lines(origins: np.ndarray, tile_size: int) -> tuple[list[int], list[int]]:
    """Positions along one axis of the tile borders (the middle of each overlap) and of the tile centres."""
    borders = [int(round((origins[j + 1] + origins[j] + tile_size) / 2)) for j in range(len(origins) - 1)]
    centres = [int(o + tile_size // 2) for o in origins]
    return borders, centres


def _line_steps(
    image: np.ndarray, lines: list[int], width: int, gap: int, segment: int, background: int
) -> list[float]:
    """Colour steps across vertical ``lines`` of ``image`` ``(H, W, 3)``: for each segment of ``segment`` rows, the
    mean absolute difference (over RGB) between the mean colours of the ``width`` px on either side, leaving
    ``gap`` px around the line out. Segments touching background (every channel above ``background``) are left
    out."""
    steps = []
    height = image.shape[0] - image.shape[0] % segment
    half = gap // 2
    for x in lines:
        if x - half - width < 0 or x + half + width > image.shape[1]:
            continue
        sides = []
        for block in (image[:height, x - half - width : x - half], image[:height, x + half : x + half + width]):
            block = block.reshape(height // segment, segment * width, -1)
            sides.append((block.astype(np.float64).mean(axis=1), (block.min(axis=-1) > background).any(axis=1)))
        (left, left_bg), (right, right_bg) = sides
        keep = ~(left_bg | right_bg)
        steps += np.abs(left - right).mean(axis=1)[keep].tolist()
    return steps


def seam_step(
    image: np.ndarray, grid: TileGrid, width: int = 16, segment: int = 32, background: int = 230
) -> dict[str, float]:
    """How visible the tile grid is in a stitched RGB image ``(H, W, 3)`` made on ``grid``.

    ``seam``: mean colour step between neighbouring tiles: the difference of the mean colours of the ``width`` px
    on either side of each tile border, outside the blended overlap (which a smooth ramp would otherwise hide
    from the measure), over segments of ``segment`` px along the border; ``within``: the same across lines
    through the tile centres (the tissue's own colour changes over that distance); ``ratio`` = seam / within
    (1: the tile grid cannot be told from any other line). Borders in both directions count; segments touching
    background are left out.
    """
    gap = grid.overlap
    rows_b, rows_c = _border_lines(grid.rows, grid.tile_size)
    cols_b, cols_c = _border_lines(grid.cols, grid.tile_size)
    transposed = np.ascontiguousarray(np.swapaxes(image, 0, 1))

    def steps(lines_cols: list[int], lines_rows: list[int]) -> list[float]:
        return _line_steps(image, lines_cols, width, gap, segment, background) + _line_steps(
            transposed, lines_rows, width, gap, segment, background
        )

    seam, within = steps(cols_b, rows_b), steps(cols_c, rows_c)
    seam_mean = float(np.mean(seam)) if seam else float("nan")
    within_mean = float(np.mean(within)) if within else float("nan")
    return {
        "seam": seam_mean,
        "within": within_mean,
        "ratio": seam_mean / within_mean if within_mean else float("nan"),
        "segments": len(seam),
    }
