"""TensorChunk messages written and read around their data, without copying it more than once.

protobuf's Python runtime copies a `bytes` field on every step: `bytes(view)` to fill the
message, `SerializeToString` to write it, `FromString` to read it and each read of
`chunk.data`. For the 1 MiB chunks of a 4 MB gradient those copies were a third of the
fetch (W4 in bench/RESULTS.md). So:

- `encode_flat` writes each message itself, in one `b"".join` of the small fields
  (serialized by protobuf) and the data straight from the arrays' memory. protobuf writes
  fields in field-number order and `data` is TensorChunk's last field, so the bytes are
  exactly those of `SerializeToString` (the tests compare them): any client parses them.
- `read_chunk` and `read_gradient_response` find the data field by walking the message's
  top-level fields (the wire format's keys and lengths), parse the rest with protobuf and
  return the data as a view of the received bytes. Anything unexpected (the field twice,
  a group, a truncated message) is left to protobuf's own parser, which is always right.

The server registers its handlers with `passthrough` serializers so that a servicer may
yield such prepared bytes as well as messages.
"""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

import grpc
import numpy as np

from gradshard.v1 import gradshard_pb2 as pb
from service.tensors import CHUNK_BYTES, dtype_to_pb

_DATA_FIELD = pb.TensorChunk.DESCRIPTOR.fields_by_name["data"].number
_CHUNK_FIELD = pb.GradientResponse.DESCRIPTOR.fields_by_name["chunk"].number
_LENGTH_DELIMITED = 2


def _key(number: int) -> bytes:
    return _varint(number << 3 | _LENGTH_DELIMITED)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


# --- writing ----------------------------------------------------------------------------

def _byte_views(pieces: Sequence[np.ndarray]) -> list[memoryview]:
    """Each piece's bytes, little-endian; pieces are 1-D arrays of one dtype laid end to end."""
    views = []
    for p in pieces:
        p = np.ascontiguousarray(p).reshape(-1)
        p = p.astype(p.dtype.newbyteorder("<"), copy=False)
        views.append(memoryview(p).cast("B"))
    return views


def encode_flat(name: str, pieces: Sequence[np.ndarray], in_gradient_response: bool = False,
                chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """Serialized TensorChunks (or GradientResponses holding them) of the 1-D tensor made of `pieces`.

    The pieces (at least one, all of one dtype) are the tensor's data in order, for example
    the shards' slices of a flat vector: they are never concatenated, each message copies
    its share of them once. An empty tensor is one chunk with no data, as `tensors.encode`
    sends it.
    """
    dtypes = {np.dtype(p.dtype) for p in pieces}
    if len(dtypes) != 1:
        raise ValueError(f"the pieces of tensor {name} must share one dtype, got {sorted(map(str, dtypes))}")
    wtype, shape = dtype_to_pb(dtypes.pop()), [sum(p.size for p in pieces)]
    views = _byte_views(pieces)
    total = sum(len(v) for v in views)
    piece, at = 0, 0                    # the next byte to send: views[piece][at]
    for offset in range(0, max(total, 1), chunk_bytes):
        head = pb.TensorChunk(name=name, dtype=wtype, shape=shape, offset=offset).SerializeToString()
        parts, need = [], min(chunk_bytes, total - offset)
        while need:
            take = min(need, len(views[piece]) - at)
            parts.append(views[piece][at: at + take])
            need -= take
            at += take
            if at == len(views[piece]):
                piece, at = piece + 1, 0
        size = sum(len(p) for p in parts)
        data_field = [_key(_DATA_FIELD), _varint(size), *parts] if size else []
        message = [head, *data_field]
        if in_gradient_response:
            inner = len(head) + (len(data_field[0]) + len(data_field[1]) + size if size else 0)
            message = [_key(_CHUNK_FIELD), _varint(inner), *message]
        yield b"".join(message)


def passthrough(serializer: Callable[[object], bytes]) -> Callable[[object], bytes]:
    """A response serializer that sends prepared bytes as they are and serializes messages."""
    def serialize(message: object) -> bytes:
        return message if type(message) is bytes else serializer(message)
    return serialize


def with_passthrough(add_to_server: Callable, servicer: object, server: grpc.Server) -> None:
    """Register a generated service (its `add_XServicer_to_server`) with `passthrough` serializers."""
    class Recorder:
        def add_generic_rpc_handlers(self, handlers):
            pass

        def add_registered_method_handlers(self, name, handlers):
            self.name, self.handlers = name, handlers

    recorder = Recorder()
    add_to_server(servicer, recorder)
    handlers = {method: h._replace(response_serializer=passthrough(h.response_serializer))
                for method, h in recorder.handlers.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(recorder.name, handlers),))
    server.add_registered_method_handlers(recorder.name, handlers)


# --- reading ----------------------------------------------------------------------------

class _Unusual(Exception):
    """A message this reader leaves to protobuf."""


def _read_varint(buf: memoryview, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise _Unusual
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i
        shift += 7


def _cut_field(buf: memoryview, number: int) -> tuple[bytes, memoryview | None]:
    """(the message without field `number`, that field's value) for a length-delimited field
    present at most once among the top-level fields."""
    i, found = 0, None
    while i < len(buf):
        start = i
        key, i = _read_varint(buf, i)
        wire_type = key & 7
        if wire_type == 0:
            _, i = _read_varint(buf, i)
        elif wire_type == 1:
            i += 8
        elif wire_type == 5:
            i += 4
        elif wire_type == _LENGTH_DELIMITED:
            length, i = _read_varint(buf, i)
            if key >> 3 == number:
                if found is not None:
                    raise _Unusual     # repeated: protobuf's rules (last wins, or merge) apply
                found = (start, i, i + length)
            i += length
        else:
            raise _Unusual             # groups
        if i > len(buf):
            raise _Unusual             # truncated
    if found is None:
        return bytes(buf), None
    start, value, end = found
    return bytes(buf[:start]) + bytes(buf[end:]), buf[value:end]


def read_chunk(raw: bytes) -> tuple[pb.TensorChunk, memoryview]:
    """A serialized TensorChunk as (its fields but data, a view of its data)."""
    buf = memoryview(raw)
    try:
        rest, data = _cut_field(buf, _DATA_FIELD)
    except _Unusual:
        chunk = pb.TensorChunk.FromString(bytes(raw))
        return chunk, memoryview(chunk.data)
    return pb.TensorChunk.FromString(rest), data if data is not None else memoryview(b"")


def read_gradient_response(raw: bytes) -> pb.GradientSummary | tuple[pb.TensorChunk, memoryview]:
    """A serialized GradientResponse: its summary, or its chunk as `read_chunk` gives it."""
    try:
        rest, inner = _cut_field(memoryview(raw), _CHUNK_FIELD)
    except _Unusual:
        inner = None
    if inner is None or rest:          # a summary, or anything beside the chunk: protobuf decides
        response = pb.GradientResponse.FromString(raw)
        if response.WhichOneof("item") == "chunk":
            return response.chunk, memoryview(response.chunk.data)
        return response.summary
    return read_chunk(inner)
