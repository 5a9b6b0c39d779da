"""Is an image file complete? Checked from its own header before trusting what ITK read from it.

ITK's NIfTI reader fills the missing part of a truncated file (a ``.nii.gz`` whose gzip stream was cut, a
``.nii`` cut short) with zeros without a word, and reads NaN / infinite NIfTI voxels as 0; its MetaImage and
NRRD readers do fail on a short file, but with messages that do not say so ("No such file or directory").
:func:`verify_image_file` parses the header itself, reads or decompresses the voxel data to its end and
compares its length with the header's, so that a damaged file is refused as ``"<file>: truncated or
corrupt (...)"``; the CRC of a gzip stream catches damage that keeps the length. For floating-point files it
also counts the non-finite stored values (ITK's NIfTI reader hides them).

Checked: NIfTI (``.nii``, ``.nii.gz``, ``.hdr`` / ``.img`` pairs; the header through nibabel), MetaImage
(``.mha``, ``.mhd`` with its ``.raw`` / ``.zraw``, zlib-compressed or not) and NRRD (``.nrrd``, ``.nhdr`` with
its data file; raw, gzip or bzip2). Not checked here: DICOM (GDCM reads every slice itself), DIR-Lab
``.img`` (:class:`~rrn_lung_registration.io.ct_io.DirLabReader` checks the size), ASCII NRRD, MetaImage slice
lists and headers this module does not understand (ITK's reading is then the only check).
"""

from __future__ import annotations

import bz2
import gzip
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["verify_image_file"]

_CHUNK = 1 << 24  # bytes read or decompressed at a time
_HEADER_BYTES = 1 << 16  # MetaImage / NRRD text headers are far shorter

_METAIMAGE_TYPES = {
    "MET_CHAR": "i1",
    "MET_UCHAR": "u1",
    "MET_SHORT": "i2",
    "MET_USHORT": "u2",
    "MET_INT": "i4",
    "MET_UINT": "u4",
    "MET_LONG": "i4",  # MetaIO's "long" is 4 bytes
    "MET_ULONG": "u4",
    "MET_LONG_LONG": "i8",
    "MET_ULONG_LONG": "u8",
    "MET_FLOAT": "f4",
    "MET_DOUBLE": "f8",
}

_NRRD_TYPES = {
    "i1": ("signed char", "int8", "int8_t"),
    "u1": ("uchar", "unsigned char", "uint8", "uint8_t"),
    "i2": ("short", "short int", "signed short", "signed short int", "int16", "int16_t"),
    "u2": ("ushort", "unsigned short", "unsigned short int", "uint16", "uint16_t"),
    "i4": ("int", "signed int", "int32", "int32_t"),
    "u4": ("uint", "unsigned int", "uint32", "uint32_t"),
    "i8": ("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64", "int64_t"),
    "u8": ("ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t"),
    "f4": ("float",),
    "f8": ("double",),
}
_NRRD_DTYPES = {name: code for code, names in _NRRD_TYPES.items() for name in names}
_NRRD_ENCODINGS = {"raw": "raw", "gzip": "gzip", "gz": "gzip", "bzip2": "bzip2", "bz2": "bzip2"}


@dataclass(frozen=True)
class _VoxelData:
    """Where a file's voxels are and how many bytes the header announces.

    ``file_offset``: bytes of ``file`` before the (possibly compressed) voxel stream; ``stream_offset``: bytes
    of the decompressed stream before the voxels; ``at_end``: raw voxels at the very end of the file (their
    start is not stated); ``compressed_size``: the stream's length when the header states it.
    """

    file: Path
    nbytes: int
    dtype: np.dtype
    encoding: str = "raw"
    file_offset: int = 0
    stream_offset: int = 0
    at_end: bool = False
    compressed_size: int | None = None


class _Damaged(Exception):
    """The file is truncated or corrupt; the message says how."""


def verify_image_file(path: str | os.PathLike) -> int | None:
    """Check that ``path`` holds every voxel its header announces; return its number of non-finite values.

    Returns:
        the number of NaN / infinite stored values (0 for integer types), or ``None`` when the format is not
        one this module checks (see the module notes).

    Raises:
        ValueError: ``"<file>: truncated or corrupt (<what is wrong>)."``
    """
    path = Path(path)
    try:
        data = _locate(path)
        return None if data is None else _scan(path, data)
    except _Damaged as damage:
        raise ValueError(f"{path}: truncated or corrupt ({damage}).") from None


def _name(path: Path) -> str:
    return path.name.lower()


def _locate(path: Path) -> _VoxelData | None:
    name = _name(path)
    if name.endswith((".nii", ".nii.gz", ".hdr", ".hdr.gz")):
        return _nifti(path)
    if name.endswith((".img", ".img.gz")):
        stem = path.name[: -len(".img.gz")] if name.endswith(".gz") else path.stem
        has_header = any((path.parent / f"{stem}{suffix}").exists() for suffix in (".hdr", ".HDR", ".hdr.gz"))
        return _nifti(path) if has_header else None
    if name.endswith((".mha", ".mhd")):
        return _metaimage(path)
    if name.endswith((".nrrd", ".nhdr")):
        return _nrrd(path)
    return None


# ------------------------------------------------------------------------------------------------ headers


def _nifti(path: Path) -> _VoxelData | None:
    import nibabel as nib
    from nibabel.arrayproxy import ArrayProxy

    try:
        image = nib.load(str(path))
    except (EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise _Damaged(f"the header cannot be read: {error}") from None
    except Exception:  # not something nibabel reads: ITK's reading is the judge
        return None
    proxy = image.dataobj
    if not isinstance(proxy, ArrayProxy):
        return None
    data_file = Path(image.file_map["image"].filename)
    dtype = np.dtype(proxy.dtype)
    nbytes = int(np.prod(proxy.shape, dtype=np.int64)) * dtype.itemsize
    offset = int(proxy.offset)
    if _name(data_file).endswith(".gz"):
        return _VoxelData(data_file, nbytes, dtype, "gzip", stream_offset=offset)
    return _VoxelData(data_file, nbytes, dtype, "raw", file_offset=offset)


def _header_lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(offset after the line, text)`` of the first lines of a file with a text header."""
    with open(path, "rb") as handle:
        head = handle.read(_HEADER_BYTES)
    position = 0
    for raw in head.splitlines(keepends=True):
        position += len(raw)
        if not raw.endswith((b"\n", b"\r")) and position == len(head) == _HEADER_BYTES:
            return  # a line cut by the read: not a header line
        yield position, raw.decode("latin-1").rstrip("\r\n")


def _integers(text: str) -> list[int]:
    return [int(value) for value in text.split()]


def _metaimage(path: Path) -> _VoxelData | None:
    fields: dict[str, str] = {}
    data_start = None
    for position, line in _header_lines(path):
        key, equals, value = line.partition("=")
        if not equals:
            continue
        fields[key.strip().lower()] = value.strip()
        if key.strip().lower() == "elementdatafile":
            data_start = position
            break
    if data_start is None:
        return None  # no complete header: ITK's reading is the judge
    try:
        sizes = _integers(fields["dimsize"])
        channels = int(fields.get("elementnumberofchannels", "1"))
        code = _METAIMAGE_TYPES[fields["elementtype"].upper()]
        header_size = int(fields.get("headersize", "0"))
        compressed_size = int(fields["compresseddatasize"]) if "compresseddatasize" in fields else None
    except (KeyError, ValueError):
        return None
    big = fields.get("binarydatabyteordermsb", fields.get("elementbyteordermsb", "false")).lower() == "true"
    dtype = np.dtype(code).newbyteorder(">" if big else "<")
    nbytes = int(np.prod(sizes, dtype=np.int64)) * channels * dtype.itemsize
    compressed = fields.get("compresseddata", "false").lower() == "true"
    location = fields["elementdatafile"]
    if location.upper() == "LOCAL":
        data_file, offset = path, data_start
    elif location.upper().startswith("LIST") or "%" in location or len(location.split()) != 1:
        return None  # one file per slice
    else:
        data_file, offset = path.parent / location, max(header_size, 0)
        if not data_file.is_file():
            raise _Damaged(f"its data file {data_file.name} is missing")
    if compressed:
        return _VoxelData(data_file, nbytes, dtype, "zlib", file_offset=offset, compressed_size=compressed_size)
    return _VoxelData(data_file, nbytes, dtype, "raw", file_offset=offset, at_end=header_size == -1)


def _nrrd(path: Path) -> _VoxelData | None:
    lines = _header_lines(path)
    first = next(lines, (0, ""))[1]
    if not first.startswith("NRRD"):
        return None
    fields: dict[str, str] = {}
    data_start = None
    for position, line in lines:
        if not line.strip():
            data_start = position
            break
        if line.startswith("#") or ":=" in line:
            continue
        key, colon, value = line.partition(":")
        if colon:
            fields[key.strip().lower()] = value.strip()
    location = fields.get("data file", fields.get("datafile"))
    try:
        sizes = _integers(fields["sizes"])
        code = _NRRD_DTYPES[fields["type"].lower()]
        encoding = _NRRD_ENCODINGS[fields.get("encoding", "raw").lower()]
        byte_skip = int(fields.get("byte skip", fields.get("byteskip", "0")))
        line_skip = int(fields.get("line skip", fields.get("lineskip", "0")))
    except (KeyError, ValueError):
        return None  # ASCII or unknown encodings, unusual types: ITK's reading is the judge
    if line_skip:
        return None
    big = fields.get("endian", "little").lower() == "big"
    dtype = np.dtype(code).newbyteorder(">" if big else "<")
    nbytes = int(np.prod(sizes, dtype=np.int64)) * dtype.itemsize
    if location is None:
        if data_start is None:
            raise _Damaged("the header ends before the voxel data starts")
        data_file, file_offset = path, data_start
    elif location.upper().startswith("LIST") or len(location.split()) != 1:
        return None  # one file per slice
    else:
        data_file, file_offset = path.parent / location, 0
        if not data_file.is_file():
            raise _Damaged(f"its data file {data_file.name} is missing")
    if encoding == "raw":
        return _VoxelData(data_file, nbytes, dtype, "raw", file_offset=file_offset + max(byte_skip, 0),
                          at_end=byte_skip == -1)  # fmt: skip
    return _VoxelData(data_file, nbytes, dtype, encoding, file_offset=file_offset, stream_offset=max(byte_skip, 0))


# ------------------------------------------------------------------------------------------------- voxels


def _count_nonfinite(values: np.ndarray) -> int:
    return int(values.size - np.count_nonzero(np.isfinite(values)))


def _scan(path: Path, data: _VoxelData) -> int:
    """Check the voxel data's length (and stream integrity); return its number of non-finite values."""
    if data.encoding == "raw":
        return _scan_raw(path, data)
    chunks = _decompressed(data)
    total, nonfinite = 0, 0
    start, stop = data.stream_offset, data.stream_offset + data.nbytes
    floating = data.dtype.kind == "f"
    carry = b""
    for chunk in chunks:
        begin, total = total, total + len(chunk)
        if not floating or total <= start or begin >= stop:
            continue
        piece = carry + chunk[max(start - begin, 0) : min(stop - begin, len(chunk))]
        usable = len(piece) - len(piece) % data.dtype.itemsize
        nonfinite += _count_nonfinite(np.frombuffer(piece[:usable], dtype=data.dtype))
        carry = piece[usable:]
    if total < stop:
        raise _Damaged(
            f"the voxel data ends after {max(total - start, 0)} of the {data.nbytes} bytes the header announces"
        )
    return nonfinite


def _scan_raw(path: Path, data: _VoxelData) -> int:
    size = data.file.stat().st_size
    start = size - data.nbytes if data.at_end else data.file_offset
    available = size - start
    if start < 0 or available < data.nbytes:
        where = "the file" if data.file == path else f"its data file {data.file.name}"
        raise _Damaged(f"{where} holds {max(available, 0)} bytes of voxel data, the header announces {data.nbytes}")
    if data.dtype.kind != "f" or data.nbytes == 0:
        return 0
    count = data.nbytes // data.dtype.itemsize
    values = np.memmap(data.file, dtype=data.dtype, mode="r", offset=start, shape=(count,))
    step = max(1, _CHUNK // data.dtype.itemsize)
    try:
        return sum(_count_nonfinite(values[i : i + step]) for i in range(0, count, step))
    finally:
        del values


def _decompressed(data: _VoxelData) -> Iterator[bytes]:
    """The decompressed stream, chunk by chunk; a cut or damaged stream raises :class:`_Damaged`."""
    with open(data.file, "rb") as handle:
        handle.seek(data.file_offset)
        if data.compressed_size is not None:
            available = os.fstat(handle.fileno()).st_size - data.file_offset
            if available < data.compressed_size:
                raise _Damaged(
                    f"{available} bytes of compressed voxel data, the header announces {data.compressed_size}"
                )
        try:
            if data.encoding == "bzip2":
                with bz2.BZ2File(handle, mode="rb") as stream:
                    while chunk := stream.read(_CHUNK):
                        yield chunk
            else:
                yield from _inflate(handle, gzip_members=data.encoding == "gzip")
        except EOFError as error:
            raise _Damaged(f"the {data.encoding} stream ends early: {error}") from None
        except (OSError, zlib.error) as error:
            raise _Damaged(f"the {data.encoding} stream is damaged: {error}") from None


def _inflate(handle, gzip_members: bool) -> Iterator[bytes]:
    """Inflate a zlib stream, or gzip members one after the other (zlib checks each member's CRC and length).

    Bytes after the last gzip member are ignored, as zlib-based readers ignore them.
    """
    inflater = zlib.decompressobj(31 if gzip_members else 15)
    pending = b""
    while pending := pending or handle.read(_CHUNK):
        yield inflater.decompress(pending, _CHUNK)  # bounded output: a zero-filled volume inflates ~1000-fold
        pending = inflater.unconsumed_tail
        if inflater.eof:
            rest = inflater.unused_data or handle.read(_CHUNK)
            if not (gzip_members and rest.startswith(b"\x1f\x8b")):
                return
            inflater, pending = zlib.decompressobj(31), rest
    yield inflater.flush()
    if not inflater.eof:
        raise EOFError("the end-of-stream marker is missing")
