"""Named numpy arrays <-> streams of TensorChunk messages (at most 1 MiB of data each)."""
from __future__ import annotations

import math
from typing import Callable, Iterable, Iterator

import numpy as np

from gradshard.v1 import gradshard_pb2 as pb

CHUNK_BYTES = 1 << 20
_TO_PB = {"float32": pb.FLOAT32, "float64": pb.FLOAT64, "int64": pb.INT64}
_FROM_PB = {v: np.dtype(k) for k, v in _TO_PB.items()}


def dtype_to_pb(dtype: np.dtype) -> int:
    """The wire dtype of an array dtype, whatever its byte order."""
    return _TO_PB[np.dtype(dtype).name]


def dtype_from_pb(value: int) -> np.dtype:
    if value not in _FROM_PB:
        raise ValueError(f"dtype must be FLOAT32 or FLOAT64, got {pb.DType.Name(value) if value in pb.DType.values() else value}")
    return _FROM_PB[value]


def encode(name: str, array: np.ndarray, chunk_bytes: int = CHUNK_BYTES) -> Iterator[pb.TensorChunk]:
    """Chunks of one tensor, in order; an empty tensor is one chunk with no data."""
    a = np.ascontiguousarray(array)
    a = a.astype(a.dtype.newbyteorder("<"), copy=False)
    raw = memoryview(a.reshape(-1)).cast("B")
    dtype, shape = dtype_to_pb(a.dtype), list(a.shape)
    for offset in range(0, max(len(raw), 1), chunk_bytes):
        yield pb.TensorChunk(name=name, dtype=dtype, shape=shape, offset=offset,
                             data=bytes(raw[offset: offset + chunk_bytes]))


def encode_all(tensors: dict[str, np.ndarray]) -> Iterator[pb.TensorChunk]:
    for name, array in tensors.items():
        yield from encode(name, array)


FirstChunkCheck = Callable[[str, tuple[int, ...], np.dtype], None]


def expect_shapes(shapes: dict[str, tuple[int, ...]], dtype: np.dtype) -> FirstChunkCheck:
    """A check that admits only the given names, each with its shape, all of one dtype."""
    def check(name: str, shape: tuple[int, ...], got: np.dtype) -> None:
        if name not in shapes:
            raise ValueError(f"unknown tensor {name!r}; expected one of {', '.join(shapes)}")
        if got != dtype:
            raise ValueError(f"tensor {name} has dtype {got}, the job uses {np.dtype(dtype)}")
        if shape != shapes[name]:
            raise ValueError(f"tensor {name} has shape {shape}, expected {shapes[name]}")
    return check


class TensorAssembler:
    """Collects chunks into arrays.

    A tensor's first chunk is checked by `check_first` (names, shapes, dtype, size
    budget) before anything is allocated, so a client cannot make the server allocate
    what it would refuse; later chunks must repeat the first one's dtype and shape.
    """

    def __init__(self, check_first: FirstChunkCheck) -> None:
        self.check_first = check_first
        self._arrays: dict[str, np.ndarray] = {}
        self._received: dict[str, int] = {}

    def add(self, chunk: pb.TensorChunk, data: bytes | memoryview | None = None) -> None:
        """Add a chunk; `data` is its data when read apart (service.chunkwire), else chunk.data."""
        name = chunk.name
        if data is None:
            data = chunk.data          # each read of the field is a new copy: read it once
        if len(data) > CHUNK_BYTES:
            raise ValueError(f"tensor {name}: a chunk holds at most {CHUNK_BYTES} bytes, got {len(data)}")
        dtype, shape = dtype_from_pb(chunk.dtype), tuple(chunk.shape)
        if name not in self._arrays:
            if any(n < 0 for n in shape):
                raise ValueError(f"tensor {name} has a negative dimension in shape {shape}")
            self.check_first(name, shape, dtype)
            self._arrays[name] = np.empty(shape, dtype)
            self._received[name] = 0
        array = self._arrays[name]
        if dtype != array.dtype or shape != array.shape:
            raise ValueError(f"tensor {name}: a chunk says {dtype} {shape}, the first said {array.dtype} "
                             f"{array.shape}")
        raw = array.reshape(-1).view(np.uint8)
        got = self._received[name]
        if chunk.offset != got:
            raise ValueError(f"tensor {name}: chunk at offset {chunk.offset}, expected {got} (send chunks in order)")
        if got + len(data) > raw.size:
            raise ValueError(f"tensor {name}: {got + len(data)} bytes is more than its {raw.size}")
        raw[got: got + len(data)] = np.frombuffer(data, np.uint8)
        self._received[name] = got + len(data)

    def finish(self) -> dict[str, np.ndarray]:
        """The complete arrays (native byte order); ValueError if one is incomplete."""
        for name, array in self._arrays.items():
            if self._received[name] != array.nbytes:
                raise ValueError(f"tensor {name} is incomplete: got {self._received[name]} of {array.nbytes} bytes")
        # Wire order is little-endian; reinterpret, then convert on a big-endian host.
        return {n: a.view(a.dtype.newbyteorder("<")).astype(a.dtype, copy=False) for n, a in self._arrays.items()}


def decode_stream(chunks: Iterable[pb.TensorChunk]) -> dict[str, np.ndarray]:
    """Decode chunks without a job to check against (the client's side); writable arrays."""
    # each read of the data field is a new copy: read it once
    return decode_parts((c, c.data) for c in chunks)


def decode_parts(parts: Iterable[tuple[pb.TensorChunk, bytes | memoryview]]) -> dict[str, np.ndarray]:
    """decode_stream for chunks given as (chunk's other fields, its data) (service.chunkwire.read_chunk)."""
    buffers: dict[str, tuple[np.ndarray, np.dtype, tuple[int, ...]]] = {}
    filled: dict[str, int] = {}
    for c, data in parts:
        if c.name not in buffers:
            dtype, shape = dtype_from_pb(c.dtype).newbyteorder("<"), tuple(c.shape)
            buffers[c.name] = (np.empty(math.prod(shape) * dtype.itemsize, np.uint8), dtype, shape)
            filled[c.name] = 0
        buf = buffers[c.name][0]
        if c.offset != filled[c.name] or c.offset + len(data) > len(buf):
            raise ValueError(f"tensor {c.name}: chunk at offset {c.offset} does not follow {filled[c.name]}")
        buf[c.offset: c.offset + len(data)] = np.frombuffer(data, np.uint8)
        filled[c.name] += len(data)
    out = {}
    for name, (buf, dtype, shape) in buffers.items():
        if filled[name] != len(buf):
            raise ValueError(f"tensor {name}: {filled[name]} bytes do not fill shape {shape}")
        out[name] = buf.view(dtype).reshape(shape).astype(dtype.newbyteorder("="), copy=False)
    return out
