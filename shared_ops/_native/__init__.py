"""Native CPU kernels of the shared layers, compiled from C on first use and loaded with ctypes.

The C sources ship next to this file (package data). The first call that needs a kernel compiles its
source with the system C compiler into a shared library in a per-user cache directory and loads it; later
calls, and later processes, reuse that library. Nothing is compiled at install time and there is no
build dependency beyond a C compiler at run time. Sources: ``correlation.c`` (the 3-D local cost
correlation, :class:`CorrelationKernels`), ``roi_align.c`` (RoIAlign, :class:`RoIAlignKernels`) and
``conv3d.c`` (3x3x3 convolutions on channels-last volumes: Winograd transforms and small convolutions,
:class:`Conv3dKernels`), one library each.

Where the library lives: ``$SHARED_OPS_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/monai-rrn-roigan/native``,
else ``~/.cache/monai-rrn-roigan/native``. Its file name carries a hash of the source, the compiler (its
resolved path, size and modification time), the flags and the CPU (``-march=native`` code must not be
reused on another processor), so a changed source or compiler gets a fresh build and stale builds are
never loaded. A build goes to a private temporary file next to the library (named by
:func:`shared_ops.atomic.temporary_sibling`) that is then renamed into place, so processes that build at the
same time do not see each other's half-written files; the last rename wins, and both results are identical.

Compiler: ``$CC`` if set, else the first of ``cc``, ``gcc``, ``clang`` on ``PATH``. Flag sets are tried in
order, from ``-O3 -march=native -fopenmp`` down to plain ``-O3`` (a compiler without OpenMP gives a
single-threaded build). The OpenMP build takes its thread count from each call (the layers pass
``torch.get_num_threads()``); built by GCC it links ``libgomp.so.1``, the soname of the runtime bundled
with PyTorch's Linux wheels, so the process keeps a single OpenMP runtime.

Switches: ``SHARED_OPS_NATIVE=0`` (or ``false``, ``no``, ``off``) disables the native kernels, read at
every call; the layers then run their PyTorch implementation. When no compiler is found or every build
fails, one :class:`RuntimeWarning` per library says so and the layers fall back the same way for the rest
of the process; the compiler's output is logged at debug level on the ``shared_ops._native`` logger.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from shared_ops.atomic import temporary_sibling

__all__ = [
    "ENV_CACHE_DIR",
    "ENV_ENABLE",
    "Conv3dKernels",
    "CorrelationKernels",
    "NativeBuildError",
    "RoIAlignKernels",
    "build_library",
    "cache_dir",
    "conv3d_kernels",
    "correlation_kernels",
    "enabled",
    "load_error",
    "roi_align_kernels",
]

logger = logging.getLogger(__name__)

ENV_ENABLE = "SHARED_OPS_NATIVE"
ENV_CACHE_DIR = "SHARED_OPS_CACHE_DIR"
_FALSE = {"0", "false", "no", "off"}

SOURCE_DIR = Path(__file__).resolve().parent
# Tried in order until one compiles; every set is combined with _COMMON_FLAGS.
FLAG_SETS: tuple[tuple[str, ...], ...] = (
    ("-O3", "-march=native", "-fopenmp"),
    ("-O3", "-fopenmp"),
    ("-O3",),
)
_COMMON_FLAGS = ("-std=gnu11", "-shared", "-fPIC")
_BUILD_TIMEOUT_S = 300

_lock = threading.Lock()
# source name -> (its bound library, None) or, once building, loading or binding failed in this process,
# (None, why).
_loaded: dict[str, tuple[Any, str | None]] = {}
T = TypeVar("T")


class NativeBuildError(RuntimeError):
    """No compiler was found, or every flag set failed to compile or load the source."""


def _check_abi(name: str, version: int, expected: int) -> None:
    """Refuse a library whose interface version is not the one its bindings were written for."""
    if version != expected:
        raise NativeBuildError(f"{name} library has interface version {version}, expected {expected}")


def enabled() -> bool:
    """Whether native kernels may be used (``SHARED_OPS_NATIVE`` is not set to a false value)."""
    return os.environ.get(ENV_ENABLE, "1").strip().lower() not in _FALSE


def cache_dir() -> Path:
    """Directory of the compiled libraries (see the module docstring for the lookup order)."""
    explicit = os.environ.get(ENV_CACHE_DIR)
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "monai-rrn-roigan" / "native"


def _compiler() -> list[str]:
    """Compiler command (``$CC`` split shell-style, or the first of cc, gcc, clang on PATH)."""
    from_env = os.environ.get("CC", "").strip()
    candidates = [shlex.split(from_env)] if from_env else [["cc"], ["gcc"], ["clang"]]
    for command in candidates:
        path = shutil.which(command[0])
        if path is not None:
            return [path, *command[1:]]
    raise NativeBuildError(f"no C compiler found (tried {', '.join(c[0] for c in candidates)})")


def _cpu_identity() -> str:
    """Model and feature flags of this CPU, so that -march=native builds are not shared across CPUs."""
    lines = []
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith(("model name", "flags", "Features", "CPU part")):
                    lines.append(line.strip())
                if line.strip() == "":  # the first processor's block is enough
                    break
    except OSError:
        pass
    return "\n".join([platform.machine(), platform.processor(), *lines])


def _build_key(source: bytes, compiler: list[str]) -> str:
    """Hash of everything that determines the built library."""
    digest = hashlib.sha256(source)
    real = os.path.realpath(compiler[0])
    stat = os.stat(real)
    parts = [*compiler, real, str(stat.st_size), str(stat.st_mtime_ns)]
    parts += [" ".join(flags) for flags in FLAG_SETS] + list(_COMMON_FLAGS) + [_cpu_identity()]
    for part in parts:
        digest.update(b"\0" + part.encode())
    return digest.hexdigest()[:20]


def build_library(name: str, directory: Path | None = None) -> Path:
    """Path of the compiled library of ``<name>.c``, compiling it first if it is not in the cache.

    Raises :class:`NativeBuildError` when there is no compiler or no flag set compiles.
    """
    source_path = SOURCE_DIR / f"{name}.c"
    source = source_path.read_bytes()
    compiler = _compiler()
    directory = cache_dir() if directory is None else Path(directory)
    target = directory / f"{name}-{_build_key(source, compiler)}.so"
    if target.exists():
        return target
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise NativeBuildError(f"cannot create the cache directory {directory}: {error}") from error
    failures = []
    for flags in FLAG_SETS:
        # The shared temporary name (:func:`shared_ops.atomic.temporary_sibling`), but not ``atomic_write``: the
        # library is made 0o755 before the rename, and a failed flag set is not an exception.
        tmp = temporary_sibling(target)
        command = [*compiler, *flags, *_COMMON_FLAGS, str(source_path), "-o", str(tmp)]
        logger.debug("compiling %s: %s", name, shlex.join(command))
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S, check=False)
            if proc.returncode == 0:
                tmp.chmod(0o755)  # mkstemp made it private; the library holds no secrets
                os.replace(tmp, target)  # atomic: other processes see either no file or a complete one
                logger.debug("built %s with %s", target, " ".join(flags))
                return target
            failures.append(f"{' '.join(flags)}: exit {proc.returncode}")
            logger.debug("compiler output for %s:\n%s%s", " ".join(flags), proc.stdout, proc.stderr)
        except (OSError, subprocess.SubprocessError) as error:
            failures.append(f"{' '.join(flags)}: {error}")
        finally:
            tmp.unlink(missing_ok=True)
    raise NativeBuildError(f"{compiler[0]} failed to compile {source_path.name} ({'; '.join(failures)})")


def load_error(name: str) -> str | None:
    """Why the library of ``<name>.c`` failed to build or load in this process, or None if it has not failed."""
    return _loaded.get(name, (None, None))[1]


def _load(name: str, bind: Callable[[ctypes.CDLL], T]) -> T | None:
    """``bind(library)`` for the library of ``<name>.c``, built and loaded once per process.

    Returns None, after one :class:`RuntimeWarning` per process, when the library cannot be built, loaded
    or bound; the failure is remembered, so later calls return None at once.
    """
    with _lock:
        if name in _loaded:
            return _loaded[name][0]
        error_text = None
        try:
            path = build_library(name)
            bound = bind(ctypes.CDLL(str(path)))
        except (NativeBuildError, OSError, AttributeError) as error:
            error_text = str(error)
            warnings.warn(
                f"shared_ops: native CPU kernels unavailable ({error}); using the slower PyTorch implementation. "
                f"Set {ENV_ENABLE}=0 to skip the native build and this warning.",
                RuntimeWarning,
                stacklevel=4,
            )
            bound = None
        else:
            logger.debug("loaded %s", path)
        _loaded[name] = (bound, error_text)
        return bound


# --------------------------------------------------------------------------------------------------
# Local cost correlation (correlation.c).

_CORRELATION_ABI = 1
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
# Multiply-adds per thread below which fewer threads are used (about 50 us of work): waking a thread
# costs more than it saves on tiny volumes, and far more on a busy machine, where every extra thread of
# a parallel region may wait for a time slice.
_GRAIN = 1 << 19


def _num_threads(work: int) -> int:
    """Threads for a kernel call of ``work`` multiply-adds: ``torch.get_num_threads()`` or fewer."""
    return max(1, min(torch.get_num_threads(), work // _GRAIN))


class CorrelationKernels:
    """ctypes bindings of ``correlation.c``: raw correlation and its input gradients on contiguous CPU tensors.

    Both methods take ``(B, C, D, H, W)`` inputs of one dtype (float32 or float64, see :attr:`DTYPES`),
    contiguous and on the CPU; outputs are new tensors, ``(B, (2r + 1) ** 3, D, H, W)`` for the forward
    pass and input-shaped for the gradients. They run on ``torch.get_num_threads()`` threads (fewer on
    volumes too small to share out) and release the GIL while they run.
    """

    DTYPES = tuple(_SUFFIX)

    def __init__(self, library: ctypes.CDLL) -> None:
        _check_abi("correlation", library.corr_abi_version(), _CORRELATION_ABI)
        ptr, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        self._forward, self._backward = {}, {}
        for dtype, suffix in _SUFFIX.items():
            forward = getattr(library, f"corr_forward_{suffix}")
            forward.argtypes = [ptr] * 3 + [i64] * 6 + [c_int]
            forward.restype = c_int
            backward = getattr(library, f"corr_backward_{suffix}")
            backward.argtypes = [ptr] * 5 + [i64] * 6 + [c_int]
            backward.restype = c_int
            self._forward[dtype], self._backward[dtype] = forward, backward
        self.threaded = bool(library.corr_has_openmp())

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor, radius: int) -> torch.Tensor:
        """``out[b, k, x] = mean_c fixed[b, c, x] * moving[b, c, x + d_k]``, zero outside the volume."""
        _check_operands(fixed, moving)
        batch, channels, depth, height, width = fixed.shape
        out = fixed.new_empty(batch, (2 * radius + 1) ** 3, depth, height, width)  # the kernel writes every value
        if out.numel():
            threads = _num_threads(out.numel() * channels)
            status = self._forward[fixed.dtype](
                fixed.data_ptr(), moving.data_ptr(), out.data_ptr(), *fixed.shape, radius, threads
            )
            _check_status(status)
        return out

    def backward(
        self,
        grad_out: torch.Tensor,
        fixed: torch.Tensor,
        moving: torch.Tensor,
        radius: int,
        need_fixed: bool = True,
        need_moving: bool = True,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Gradients of :meth:`forward` with respect to ``fixed`` and ``moving`` (None where not needed)."""
        _check_operands(fixed, moving, grad_out)
        grad_fixed = torch.empty_like(fixed) if need_fixed else None
        grad_moving = torch.empty_like(moving) if need_moving else None
        if fixed.numel() and (need_fixed or need_moving):
            status = self._backward[fixed.dtype](
                grad_out.data_ptr(),
                fixed.data_ptr(),
                moving.data_ptr(),
                None if grad_fixed is None else grad_fixed.data_ptr(),
                None if grad_moving is None else grad_moving.data_ptr(),
                *fixed.shape,
                radius,
                _num_threads(grad_out.numel() * fixed.shape[1] * (int(need_fixed) + int(need_moving))),
            )
            _check_status(status)
        return grad_fixed, grad_moving


def _check_operands(*tensors: torch.Tensor) -> None:
    dtype = tensors[0].dtype
    for x in tensors:
        if x.device.type != "cpu" or x.dtype != dtype or dtype not in _SUFFIX or not x.is_contiguous():
            raise ValueError(
                "native correlation kernels need contiguous CPU tensors of one dtype, float32 or float64; got "
                f"{x.dtype} on {x.device}, contiguous={x.is_contiguous()}."
            )


def _check_status(status: int) -> None:
    if status != 0:
        raise MemoryError("native correlation kernel could not allocate its per-thread buffers.")


def correlation_kernels() -> CorrelationKernels | None:
    """The correlation kernels, or None when disabled (``SHARED_OPS_NATIVE=0``) or not buildable here."""
    if not enabled():
        return None
    return _load("correlation", CorrelationKernels)


# --------------------------------------------------------------------------------------------------
# RoIAlign (roi_align.c).

_ROI_ALIGN_ABI = 1
# Multiply-adds assumed per pooled value when choosing the thread count (a bin of a few samples).
_ROI_WORK_PER_VALUE = 16
_ROI_STATUS = {
    1: (MemoryError, "native RoIAlign kernel could not allocate its per-thread buffers."),
    2: (ValueError, "native RoIAlign kernel: a box has a batch index outside [0, N)."),
}


class RoIAlignKernels:
    """ctypes bindings of ``roi_align.c``: RoIAlign and its gradient with respect to the feature map.

    Feature maps are ``(N, C, H, W)`` and pooled values ``(K, C, PH, PW)``, one dtype (float32 or float64,
    see :attr:`DTYPES`), contiguous and on the CPU; ``rois`` is a contiguous float64 CPU ``Tensor[K, 5]`` of
    ``(batch index, x1, y1, x2, y2)`` whose batch indices are integers in ``[0, N)``. Outputs are new
    tensors. The kernels run on ``torch.get_num_threads()`` threads (fewer on small problems) and release
    the GIL while they run.
    """

    DTYPES = tuple(_SUFFIX)

    def __init__(self, library: ctypes.CDLL) -> None:
        _check_abi("roi_align", library.roi_abi_version(), _ROI_ALIGN_ABI)
        ptr, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        self._forward, self._backward = {}, {}
        for dtype, suffix in _SUFFIX.items():
            for table, name in ((self._forward, "roi_forward"), (self._backward, "roi_backward")):
                kernel = getattr(library, f"{name}_{suffix}")
                kernel.argtypes = [ptr] * 3 + [i64] * 7 + [ctypes.c_double, i64, c_int, c_int]
                kernel.restype = c_int
                table[dtype] = kernel
        self.threaded = bool(library.roi_has_openmp())

    def forward(
        self,
        input: torch.Tensor,
        rois: torch.Tensor,
        output_size: tuple[int, int],
        spatial_scale: float,
        sampling_ratio: int,
        aligned: bool,
    ) -> torch.Tensor:
        """RoIAlign of ``input (N, C, H, W)`` over ``rois (K, 5)``: ``(K, C, PH, PW)``."""
        _check_roi_operands(rois, input)
        pooled_h, pooled_w = output_size
        out = input.new_empty(rois.shape[0], input.shape[1], pooled_h, pooled_w)  # the kernel writes every value
        if out.numel():
            status = self._forward[input.dtype](
                input.data_ptr(),
                rois.data_ptr(),
                out.data_ptr(),
                *input.shape,
                rois.shape[0],
                pooled_h,
                pooled_w,
                spatial_scale,
                sampling_ratio,
                int(aligned),
                _num_threads(out.numel() * _ROI_WORK_PER_VALUE),
            )
            _check_roi_status(status)
        return out

    def backward(
        self,
        grad_out: torch.Tensor,
        rois: torch.Tensor,
        input_shape: tuple[int, int, int, int],
        spatial_scale: float,
        sampling_ratio: int,
        aligned: bool,
    ) -> torch.Tensor:
        """Gradient ``(N, C, H, W)`` of :meth:`forward` for ``grad_out (K, C, PH, PW)`` (its adjoint)."""
        _check_roi_operands(rois, grad_out)
        if grad_out.ndim != 4 or grad_out.shape[:2] != (rois.shape[0], input_shape[1]):
            raise ValueError(
                f"grad_out: expected ({rois.shape[0]}, {input_shape[1]}, PH, PW), got {tuple(grad_out.shape)}."
            )
        grad_input = grad_out.new_empty(input_shape)  # the kernel writes every value
        if grad_input.numel():
            status = self._backward[grad_out.dtype](
                grad_out.data_ptr(),
                rois.data_ptr(),
                grad_input.data_ptr(),
                *input_shape,
                rois.shape[0],
                *grad_out.shape[2:],
                spatial_scale,
                sampling_ratio,
                int(aligned),
                _num_threads(max(grad_out.numel() * _ROI_WORK_PER_VALUE, grad_input.numel())),
            )
            _check_roi_status(status)
        return grad_input


def _check_roi_operands(rois: torch.Tensor, features: torch.Tensor) -> None:
    if features.device.type != "cpu" or features.dtype not in _SUFFIX or not features.is_contiguous():
        raise ValueError(
            "native RoIAlign kernels need a contiguous CPU tensor of float32 or float64; got "
            f"{features.dtype} on {features.device}, contiguous={features.is_contiguous()}."
        )
    if rois.device.type != "cpu" or rois.dtype != torch.float64 or not rois.is_contiguous() or rois.ndim != 2:
        raise ValueError(
            "native RoIAlign kernels need boxes as a contiguous float64 CPU Tensor[K, 5]; got "
            f"{rois.dtype} {tuple(rois.shape)} on {rois.device}, contiguous={rois.is_contiguous()}."
        )
    if rois.shape[1] != 5:
        raise ValueError(f"rois: expected a Tensor[K, 5], got shape {tuple(rois.shape)}.")


def _check_roi_status(status: int) -> None:
    if status != 0:
        error, message = _ROI_STATUS.get(status, (RuntimeError, f"native RoIAlign kernel failed (status {status})."))
        raise error(message)


def roi_align_kernels() -> RoIAlignKernels | None:
    """The RoIAlign kernels, or None when disabled (``SHARED_OPS_NATIVE=0``) or not buildable here."""
    if not enabled():
        return None
    return _load("roi_align", RoIAlignKernels)


# --------------------------------------------------------------------------------------------------
# 3x3x3 convolutions (conv3d.c): Winograd F(4x4x4, 3x3x3) transforms and small convolutions.

_CONV3D_ABI = 1


class Conv3dKernels:
    """ctypes bindings of ``conv3d.c``: pieces of 3x3x3 convolutions on channels-last CPU volumes.

    :meth:`input_transform` and :meth:`output_transform` are the two transforms of a Winograd convolution
    whose products are batched matrix products; :meth:`convolution` is a whole Winograd convolution for few
    channels; :meth:`single_channel` a direct strided convolution of one input channel. Float32 only.

    The Winograd calls handle one slab of tiles, ``rows`` tile rows along D of ``tiles_h x tiles_w`` tiles
    per residue, with dilation ``d`` (a tile spans ``6 d`` input and ``4 d`` output voxels along each
    axis). Activations are (D, H, W, C) views with channels contiguous (``stride(-1) == 1``), starting at
    the slab's first input (or output) voxel; transformed tiles are row-major (216, tiles, C) views with
    ``stride(-1) == 1``, tiles ordered (row, q_h, r_h, q_w, r_w). See the C source for the maths.
    """

    def __init__(self, library: ctypes.CDLL) -> None:
        _check_abi("conv3d", library.conv3d_abi_version(), _CONV3D_ABI)
        ptr, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        self._input = library.wino_input_f32
        self._input.argtypes = [ptr, i64, i64, i64, ptr] + [i64] * 7 + [ptr, c_int]
        self._input.restype = None
        self._output = library.wino_output_f32
        self._output.argtypes = [ptr, i64, i64, ptr, ctypes.c_float, c_int, ptr] + [i64] * 8 + [c_int]
        self._output.restype = None
        self._conv = library.wino_conv_f32
        self._conv.argtypes = [ptr, i64, i64, i64, i64, ptr, ptr, ctypes.c_float, c_int, ptr] + [i64] * 8 + [ptr, c_int]
        self._conv.restype = None
        self._single = library.conv_single_f32
        self._single.argtypes = [ptr, i64, i64, i64, ptr, ptr, ctypes.c_float, c_int, ptr] + [i64] * 8 + [c_int]
        self._single.restype = None
        self.threaded = bool(library.conv3d_has_openmp())

    def input_transform(self, x: torch.Tensor, v: torch.Tensor, tiles_h: int, tiles_w: int, dilation: int) -> None:
        """``v[:, t] = B^T x_t B`` for every tile ``t`` of the slab starting at ``x[0, 0, 0]``."""
        rows = _slab_rows(v, tiles_h, tiles_w, dilation)
        # the slab's origin carries the residue along D; the kernel adds those along H and W
        step = 4 * dilation
        _check_slab(
            "input",
            x,
            v,
            [step * (rows - 1) + 5 * dilation + 1, step * tiles_h + 2 * dilation, step * tiles_w + 2 * dilation],
        )
        threads = _num_threads(v.numel() * 8)
        scratch = x.new_empty(threads * 216 * _lanes(x.shape[3]))  # a tile's transform per thread
        self._input(
            x.data_ptr(), *x.stride()[:3], v.data_ptr(), v.stride(0), v.stride(1), rows, tiles_h, tiles_w, dilation,
            x.shape[3], scratch.data_ptr(), threads,
        )  # fmt: skip

    def output_transform(
        self,
        m: torch.Tensor,
        y: torch.Tensor,
        tiles_h: int,
        tiles_w: int,
        dilation: int,
        bias: torch.Tensor | None = None,
        slope: float | None = None,
    ) -> None:
        """``y_t = leaky_relu(A^T m_t A + bias, slope)`` (each step where given) for every tile of the slab."""
        rows = _slab_rows(m, tiles_h, tiles_w, dilation)
        step = 4 * dilation
        _check_slab("output", y, m, [step * (rows - 1) + 3 * dilation + 1, step * tiles_h, step * tiles_w])
        _check_bias(bias, m.shape[2])
        self._output(
            m.data_ptr(), m.stride(0), m.stride(1), None if bias is None else bias.data_ptr(),
            0.0 if slope is None else slope, int(slope is not None), y.data_ptr(), *y.stride()[:3], rows, tiles_h,
            tiles_w, dilation, m.shape[2], _num_threads(m.numel() * 8),
        )  # fmt: skip

    def convolution(
        self,
        x: torch.Tensor,
        u: torch.Tensor,
        y: torch.Tensor,
        rows: int,
        tiles_h: int,
        tiles_w: int,
        dilation: int,
        bias: torch.Tensor | None = None,
        slope: float | None = None,
    ) -> None:
        """The whole convolution of a slab, tile by tile, for few channels: ``y = leaky_relu(conv(x) + bias)``.

        ``u`` holds the transformed weights (216, C_in, C_out rounded up to 16, the extra columns zero),
        contiguous; ``x`` and ``y`` start at the slab's first input and output voxel.
        """
        out_channels = y.shape[-1]
        width = -(-out_channels // 16) * 16
        if u.dtype != torch.float32 or not u.is_contiguous() or u.shape != (216, x.shape[-1], width):
            raise ValueError(
                f"transformed weights: expected contiguous float32 (216, {x.shape[-1]}, {width}), got {u.shape}."
            )
        step = 4 * dilation
        _check_volume(
            "convolution",
            x,
            x.shape[-1],
            [step * (rows - 1) + 5 * dilation + 1, step * tiles_h + 2 * dilation, step * tiles_w + 2 * dilation],
        )
        _check_volume(
            "convolution", y, out_channels, [step * (rows - 1) + 3 * dilation + 1, step * tiles_h, step * tiles_w]
        )
        _check_bias(bias, out_channels)
        threads = _num_threads(rows * tiles_h * tiles_w * dilation**2 * 216 * x.shape[-1] * width)
        scratch = x.new_empty(threads * 216 * (_lanes(x.shape[-1]) + width))  # a tile's transform and products
        self._conv(
            x.data_ptr(), *x.stride()[:3], x.shape[-1], u.data_ptr(), None if bias is None else bias.data_ptr(),
            0.0 if slope is None else slope, int(slope is not None), y.data_ptr(), *y.stride()[:3], out_channels,
            rows, tiles_h, tiles_w, dilation, scratch.data_ptr(), threads,
        )  # fmt: skip

    def single_channel(
        self,
        x: torch.Tensor,
        w: torch.Tensor,
        y: torch.Tensor,
        stride: int,
        bias: torch.Tensor | None = None,
        slope: float | None = None,
    ) -> None:
        """``y = leaky_relu(conv3d(x, w, stride) + bias)``, 3x3x3, one input channel, direct.

        ``x`` (D, H, W, 1) is read from its first voxel with no padding of its own (a padded buffer's border
        is the padding); ``y`` (D', H', W', C) with contiguous channels; ``w`` the weights as a contiguous
        (27, C rounded up to 8) float32 tensor, taps ordered (k_d, k_h, k_w), the extra columns zero.
        """
        out_channels = y.shape[-1]
        width = _lanes(out_channels)
        if w.dtype != torch.float32 or not w.is_contiguous() or w.shape != (27, width):
            raise ValueError(f"weights: expected contiguous float32 (27, {width}), got {w.dtype} {tuple(w.shape)}.")
        _check_volume("single-channel convolution", x, 1, [stride * (n - 1) + 3 for n in y.shape[:3]])
        _check_volume("single-channel convolution", y, out_channels, list(y.shape[:3]))
        _check_bias(bias, out_channels)
        self._single(
            x.data_ptr(), *x.stride()[:3], w.data_ptr(), None if bias is None else bias.data_ptr(),
            0.0 if slope is None else slope, int(slope is not None), y.data_ptr(), *y.stride()[:3], out_channels,
            *y.shape[:3], stride, _num_threads(y.numel() * 27),
        )  # fmt: skip


def _lanes(channels: int) -> int:
    """``channels`` rounded up to whole vectors of 8 floats (the kernels' scratch rows)."""
    return -(-channels // 8) * 8


def _check_bias(bias: torch.Tensor | None, channels: int) -> None:
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous() or bias.numel() != channels):
        raise ValueError(f"bias: expected a contiguous float32 tensor of {channels} values, got {tuple(bias.shape)}.")


def _slab_rows(transformed: torch.Tensor, tiles_h: int, tiles_w: int, dilation: int) -> int:
    per_row = tiles_h * tiles_w * dilation**2
    if transformed.ndim != 3 or transformed.shape[0] != 216 or transformed.shape[1] % per_row:
        raise ValueError(
            f"transformed tiles: expected (216, a multiple of {per_row} tiles, C), got {tuple(transformed.shape)}."
        )
    return transformed.shape[1] // per_row


def _check_slab(kind: str, volume: torch.Tensor, transformed: torch.Tensor, extent: list[int]) -> None:
    """Dtype, device, layout and extent checks of one transform call (the kernels trust every stride)."""
    channels = transformed.shape[2]
    if transformed.device.type != "cpu" or transformed.dtype != torch.float32:
        raise ValueError(f"native Winograd {kind} transform: transformed tiles must be float32 on the CPU.")
    plane, step, one = transformed.stride()
    if one != 1 or step < channels or plane < transformed.shape[1] * step:
        raise ValueError(
            f"native Winograd {kind} transform: transformed tiles (216, T, C) need strides (>= T s, s >= C, 1), "
            f"got {transformed.stride()}."
        )
    _check_volume(f"{kind} transform", volume, channels, extent)


def _check_volume(kind: str, volume: torch.Tensor, channels: int, extent: list[int]) -> None:
    if volume.device.type != "cpu" or volume.dtype != torch.float32:
        raise ValueError(f"native Winograd {kind}: activations must be float32 on the CPU, got {volume.dtype}.")
    if volume.ndim != 4 or volume.stride(3) != 1 or min(volume.stride()) < 0 or volume.shape[3] != channels:
        raise ValueError(
            f"native Winograd {kind}: activations must be (D, H, W, {channels}) with contiguous channels, "
            f"got shape {tuple(volume.shape)} strides {volume.stride()}."
        )
    if any(size < need for size, need in zip(volume.shape[:3], extent, strict=True)):
        raise ValueError(f"native Winograd {kind}: activations {tuple(volume.shape[:3])} < slab {extent}.")


def conv3d_kernels() -> Conv3dKernels | None:
    """The 3x3x3 convolution kernels, or None when disabled (``SHARED_OPS_NATIVE=0``) or not buildable here."""
    if not enabled():
        return None
    return _load("conv3d", Conv3dKernels)
