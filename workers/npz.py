"""Header-only inspection and memory-mapped column reads of .npz data files."""
from __future__ import annotations

import functools
import operator
import struct
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np
from numpy.lib import format as npformat

# Local file header: signature, version, flags, method, time, date, crc,
# compressed size, uncompressed size, filename length, extra field length.
_LOCAL_HEADER = struct.Struct("<4s5H3I2H")
_LOCAL_MAGIC = b"PK\x03\x04"
_HEADER_READERS = {(1, 0): npformat.read_array_header_1_0, (2, 0): npformat.read_array_header_2_0}


@dataclass(frozen=True)
class NpzArrayInfo:
    """Shape, dtype and storage layout of one array inside an .npz file."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    compressed: bool


def _readable(fn):
    """Turn the many ways a damaged file fails (zlib, zip, I/O) into one ValueError naming the file."""
    @functools.wraps(fn)
    def wrapper(path, *args, **kwargs):
        try:
            return fn(path, *args, **kwargs)
        except ValueError:
            raise
        except (OSError, EOFError, zlib.error, zipfile.BadZipFile) as exc:
            raise ValueError(f"npz file {path} cannot be read: {type(exc).__name__}: {exc}") from None
    return wrapper


def _open_zip(path: str) -> zipfile.ZipFile:
    """Open path as a zip archive, turning 'not a zip' into a ValueError."""
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise ValueError(f"{path} is not an npz (zip) file: {exc}") from None


def _read_header(fp, path: str, name: str) -> tuple[tuple[int, ...], np.dtype, bool]:
    """Parse the .npy magic and header from fp, leaving fp at the array data."""
    try:
        version = npformat.read_magic(fp)
        reader = _HEADER_READERS.get(version)
        if reader is None:
            raise ValueError(f"unsupported .npy format version {version}")
        shape, fortran_order, dtype = reader(fp)
    except ValueError as exc:
        raise ValueError(f"npz file {path}: bad header for array '{name}': {exc}") from None
    return tuple(shape), np.dtype(dtype), bool(fortran_order)


def _npy_members(zf: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    """Map array name (member name without '.npy') to its zip entry."""
    return {i.filename[:-4]: i for i in zf.infolist() if i.filename.endswith(".npy")}


@_readable
def describe(path: str) -> dict[str, NpzArrayInfo]:
    """Return every array's header info without reading any array data."""
    with _open_zip(path) as zf:
        out = {}
        for name, info in _npy_members(zf).items():
            # zf.open streams (and inflates) lazily, so only the header bytes are read.
            with zf.open(info) as fp:
                shape, dtype, fortran = _read_header(fp, path, name)
            compressed = info.compress_type != zipfile.ZIP_STORED
            out[name] = NpzArrayInfo(name, shape, dtype, fortran, compressed)
        return out


@_readable
def open_array(path: str, name: str) -> np.ndarray:
    """Return a read-only memmap of a stored member, else load it (compressed)."""
    with _open_zip(path) as zf:
        members = _npy_members(zf)
        if name not in members:
            has = ", ".join(sorted(members)) or "none"
            raise ValueError(f"npz file {path} has no array '{name}' (has: {has})")
        info = members[name]
        with zf.open(info) as fp:
            shape, dtype, fortran = _read_header(fp, path, name)
        if dtype.hasobject:
            raise ValueError(f"npz file {path}: array '{name}' has object dtype (not supported)")
        # Encrypted members are not mappable either; np.load reports that properly.
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
            with np.load(path) as npz:
                return npz[name]
        fp = zf.fp  # the raw archive file; ZipFile keeps it open until the with ends
        fp.seek(info.header_offset)
        fields = _LOCAL_HEADER.unpack(fp.read(_LOCAL_HEADER.size))
        if fields[0] != _LOCAL_MAGIC:
            raise ValueError(f"npz file {path}: corrupt local header for array '{name}'")
        # The local extra field can differ from the central directory's (numpy
        # writes zip64 extras only locally), so use the lengths stored here.
        member_start = info.header_offset + _LOCAL_HEADER.size + fields[-2] + fields[-1]
        fp.seek(member_start)
        _read_header(fp, path, name)  # the stored bytes are the .npy file verbatim
        data_offset = fp.tell()
    count = int(np.prod(shape, dtype=np.int64))
    if data_offset + count * dtype.itemsize > member_start + info.compress_size:
        raise ValueError(f"npz file {path}: array '{name}' is truncated")
    if count == 0:
        # mmap cannot map zero bytes; an empty read-only array is equivalent.
        empty = np.empty(shape, dtype=dtype, order="F" if fortran else "C")
        empty.flags.writeable = False
        return empty
    return np.memmap(path, dtype=dtype, mode="r", offset=data_offset, shape=shape,
                     order="F" if fortran else "C")


@_readable
def read_columns(path: str, name: str, begin: int, end: int, dtype) -> np.ndarray:
    """Return a C-contiguous copy of arr[:, begin:end] cast to dtype."""
    arr = open_array(path, name)
    if arr.ndim != 2:
        raise ValueError(f"npz file {path}: array '{name}' is {arr.ndim}-D, expected 2-D")
    begin, end = operator.index(begin), operator.index(end)
    n_cols = arr.shape[1]
    if not 0 <= begin <= end <= n_cols:
        raise ValueError(f"npz file {path}: column range [{begin}, {end}) invalid for "
                         f"array '{name}' with {n_cols} columns")
    # Copying from the mapped view allocates only the block, never all of X.
    return np.array(arr[:, begin:end], dtype=np.dtype(dtype), order="C", copy=True)
