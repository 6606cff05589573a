"""TensorChunk messages written and read around their data, without copying it more than once.

protobuf's Python runtime copies a `bytes` field on every step: `bytes(view)` to fill the
message, `SerializeToString` to write it, `FromString` to read it and each read of
`chunk.data`. For the 1 MiB chunks of a 4 MB gradient those copies were a third of the
fetch (W4 in bench/RESULTS.md). So, on both ends and in both directions:

- `encode_pieces` writes each message itself, in one `b"".join` of the small fields
  (serialized by protobuf) and the data straight from the arrays' memory, optionally
  wrapped as the chunk field of an enclosing message. protobuf writes fields in
  field-number order and `data` is TensorChunk's last field, so the bytes are exactly
  those of `SerializeToString` (the tests compare them): any peer parses them.
- `read_chunk`, `read_gradient_response` and `chunk_reader` find the data by walking the
  messages' top-level fields (the wire format's keys and lengths), parse the rest with
  protobuf and return the data as a view of the received bytes. Anything unexpected (a
  field twice, a group, a truncated message) is left to protobuf's own parser, which is
  always right.

`register` adds a generated service to a server with serializers that send prepared bytes
as they are, and with such readers for the methods that receive chunks.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator, NamedTuple, Sequence

import grpc
import numpy as np

from gradshard.v1 import gradshard_pb2 as pb
from service.tensors import CHUNK_BYTES, dtype_to_pb


def field_number(message: type, name: str) -> int:
    return message.DESCRIPTOR.fields_by_name[name].number


_DATA_FIELD = field_number(pb.TensorChunk, "data")
GRADIENT_RESPONSE_CHUNK = field_number(pb.GradientResponse, "chunk")
GRADIENT_REQUEST_PARAMETERS = field_number(pb.GradientRequest, "parameters")
SET_PARAMETERS_CHUNK = field_number(pb.SetParametersRequest, "chunk")
UPLOAD_DATASET_CHUNK = field_number(pb.UploadDatasetRequest, "chunk")
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


def encode_pieces(name: str, pieces: Sequence[np.ndarray], shape: Sequence[int] | None = None,
                  field: int | None = None, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """Serialized TensorChunks of the tensor whose data is `pieces` laid end to end.

    The pieces (at least one, all of one dtype, C order) are never concatenated, for
    example the shards' slices of a flat vector: each message copies its share of them
    once. `shape` defaults to the 1-D length of all of them. With `field`, each chunk is
    wrapped as that field of an enclosing message (GradientResponse.chunk,
    SetParametersRequest.chunk, ...), as protobuf serializes that message with only the
    chunk set. An empty tensor is one chunk with no data, as `tensors.encode` sends it.
    """
    wtypes = {dtype_to_pb(p.dtype) for p in pieces}          # <f8 and >f8 are both FLOAT64
    if len(wtypes) != 1:
        raise ValueError(f"tensor {name} needs at least one piece, all of one dtype; got "
                         f"{[str(p.dtype) for p in pieces]}")
    wtype = wtypes.pop()
    size = sum(p.size for p in pieces)
    shape = [size] if shape is None else list(shape)
    if math.prod(shape) != size:
        raise ValueError(f"tensor {name}: shape {tuple(shape)} does not hold its {size} elements")
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
        nbytes = sum(len(p) for p in parts)
        message = [head, _key(_DATA_FIELD), _varint(nbytes), *parts] if nbytes else [head]
        if field is not None:
            message = [_key(field), _varint(sum(len(m) for m in message)), *message]
        yield b"".join(message)


def encode_tensors(tensors: dict[str, np.ndarray], field: int | None = None) -> Iterator[bytes]:
    """encode_pieces of each named array, in order, with its shape."""
    for name, array in tensors.items():
        a = np.ascontiguousarray(array)
        yield from encode_pieces(name, [a.reshape(-1)], a.shape, field)


def passthrough(serializer: Callable[[object], bytes]) -> Callable[[object], bytes]:
    """A serializer that sends prepared bytes as they are and serializes messages."""
    def serialize(message: object) -> bytes:
        return message if type(message) is bytes else serializer(message)
    return serialize


class Malformed(NamedTuple):
    """What a request deserializer gives for bytes protobuf refuses, in place of raising: gRPC
    would answer INTERNAL, and the fault is the client's (the servicer answers INVALID_ARGUMENT)."""
    reason: str


def tolerant(deserializer: Callable[[bytes], object], type_name: str) -> Callable[[bytes], object]:
    def read(raw: bytes) -> object:
        try:
            return deserializer(raw)
        except Exception as exc:         # noqa: BLE001 - DecodeError, or UnicodeDecodeError from pure-Python protobuf
            return Malformed(f"the request is not a valid {type_name}: {exc}")
    return read


def register(add_to_server: Callable, servicer: object, server: grpc.Server,
             request_readers: dict[str, Callable[[bytes], object]] | None = None) -> None:
    """Add a generated service (its `add_XServicer_to_server`) to `server`: every response
    serializer a `passthrough`, `request_readers` in place of the named methods' request
    deserializers, and every request deserializer `tolerant` (a Malformed request reaches
    the servicer)."""
    class Recorder:
        def add_generic_rpc_handlers(self, handlers):
            pass

        def add_registered_method_handlers(self, name, handlers):
            self.name, self.handlers = name, handlers

    recorder = Recorder()
    add_to_server(servicer, recorder)
    if not hasattr(recorder, "handlers"):
        raise RuntimeError(f"{add_to_server.__name__} does not register its handlers by method (stubs generated by "
                           "grpcio-tools older than 1.62?): regenerate them with `make protos`")
    readers = request_readers or {}
    handlers = {}
    for method, h in recorder.handlers.items():
        message_type = getattr(h.request_deserializer, "__self__", None)   # the generated X.FromString
        type_name = message_type.DESCRIPTOR.name if hasattr(message_type, "DESCRIPTOR") else f"{method} request"
        h = h._replace(response_serializer=passthrough(h.response_serializer),
                       request_deserializer=tolerant(readers.get(method, h.request_deserializer), type_name))
        handlers[method] = h
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(recorder.name, handlers),))
    server.add_registered_method_handlers(recorder.name, handlers)


# --- reading ----------------------------------------------------------------------------

class _Unusual(Exception):
    """A message this reader leaves to protobuf."""


def _read_varint(buf: memoryview, i: int, max_bytes: int = 10) -> tuple[int, int]:
    """A varint of at most `max_bytes`, in its shortest form (anything else: _Unusual)."""
    shift = value = 0
    for n in range(max_bytes):
        if i >= len(buf):
            raise _Unusual
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if byte == 0 and n:
                raise _Unusual         # padded: protobuf may refuse it; let it decide
            return value, i
        shift += 7
    raise _Unusual


def _read_size(buf: memoryview, i: int) -> tuple[int, int]:
    """A key or a length: protobuf reads those as 32-bit varints."""
    value, i = _read_varint(buf, i, max_bytes=5)
    if value >= 1 << 32:
        raise _Unusual
    return value, i


def _cut_field(buf: memoryview, number: int) -> tuple[bytes, memoryview | None]:
    """(the message without field `number`, that field's value) for a length-delimited field
    present at most once among the top-level fields."""
    i, found = 0, None
    while i < len(buf):
        start = i
        key, i = _read_size(buf, i)
        wire_type = key & 7
        if wire_type == 0:
            _, i = _read_varint(buf, i)
        elif wire_type == 1:
            i += 8
        elif wire_type == 5:
            i += 4
        elif wire_type == _LENGTH_DELIMITED:
            length, i = _read_size(buf, i)
            if key >> 3 == number:
                if found is not None:
                    raise _Unusual     # given twice: protobuf's rules (last wins, or merge) apply
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


def read_chunk(raw: bytes | memoryview) -> tuple[pb.TensorChunk, memoryview]:
    """A serialized TensorChunk as (its fields but data, a view of its data)."""
    try:
        rest, data = _cut_field(memoryview(raw), _DATA_FIELD)
    except _Unusual:
        chunk = pb.TensorChunk.FromString(bytes(raw))
        return chunk, memoryview(chunk.data)
    return pb.TensorChunk.FromString(rest), data if data is not None else memoryview(b"")


def read_gradient_response(raw: bytes) -> pb.GradientSummary | tuple[pb.TensorChunk, memoryview]:
    """A serialized GradientResponse: its summary, or its chunk as `read_chunk` gives it."""
    try:
        rest, inner = _cut_field(memoryview(raw), GRADIENT_RESPONSE_CHUNK)
    except _Unusual:
        inner = None
    if inner is None or rest:          # a summary, or anything beside the chunk: protobuf decides
        response = pb.GradientResponse.FromString(raw)
        if response.WhichOneof("item") == "chunk":
            return response.chunk, memoryview(response.chunk.data)
        return response.summary
    return read_chunk(inner)


class WithChunk(NamedTuple):
    """A request whose TensorChunk field was read apart: the rest of the message (without
    that chunk), the chunk's fields but data (None if the field is absent) and its data."""
    message: object
    chunk: pb.TensorChunk | None
    data: memoryview


def chunk_reader(message_type: type, field: str) -> Callable[[bytes], WithChunk]:
    """A request deserializer for messages of `message_type` whose `field` is a TensorChunk."""
    number = field_number(message_type, field)
    if message_type.DESCRIPTOR.fields_by_name[field].containing_oneof is not None:
        # cutting a oneof member out would change which member protobuf keeps
        raise ValueError(f"{message_type.__name__}.{field} is in a oneof; read such messages with protobuf")

    def read(raw: bytes) -> WithChunk:
        try:
            rest, inner = _cut_field(memoryview(raw), number)
        except _Unusual:
            message = message_type.FromString(raw)
            if not message.HasField(field):
                return WithChunk(message, None, memoryview(b""))
            chunk = pb.TensorChunk()
            chunk.CopyFrom(getattr(message, field))
            message.ClearField(field)
            return WithChunk(message, chunk, memoryview(chunk.data))
        message = message_type.FromString(rest)
        if inner is None:
            return WithChunk(message, None, memoryview(b""))
        return WithChunk(message, *read_chunk(inner))
    return read
