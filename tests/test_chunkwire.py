"""Chunks written and read around their data (service.chunkwire): the bytes are protobuf's own."""
import random

import grpc
import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings, strategies as st

from gradshard.v1 import gradshard_pb2 as pb
from gradshard.v1 import gradshard_pb2_grpc as pb_grpc
from service.chunkwire import (GRADIENT_RESPONSE_CHUNK, WithChunk, chunk_reader, encode_pieces, encode_tensors,
                               read_chunk, read_gradient_response)
from service.tensors import CHUNK_BYTES, decode_parts, decode_stream, encode, encode_all


def _same_chunk(head: pb.TensorChunk, data, expected: pb.TensorChunk) -> None:
    got = pb.TensorChunk()
    got.CopyFrom(head)
    got.data = bytes(data)
    assert got == expected


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("sizes,chunk_bytes", [
    ([0], 16),                      # an empty tensor: one chunk without data
    ([1], 16),
    ([4], 16),                      # exactly one chunk
    ([5], 16),                      # one more element than a chunk
    ([3, 7, 1, 9], 16),             # pieces that start and end inside chunks
    ([8, 8], 32),                   # pieces that end on chunk boundaries
    ([500_000, 500_010], CHUNK_BYTES),
])
def test_prepared_chunks_are_byte_for_byte_what_protobuf_writes(dtype, sizes, chunk_bytes):
    rng = np.random.default_rng(len(sizes))
    pieces = [rng.standard_normal(n).astype(dtype) for n in sizes]
    whole = np.concatenate(pieces)
    expected = list(encode("flat", whole, chunk_bytes=chunk_bytes))
    prepared = list(encode_pieces("flat", pieces, chunk_bytes=chunk_bytes))
    assert prepared == [c.SerializeToString() for c in expected]
    wrapped = list(encode_pieces("flat", pieces, field=GRADIENT_RESPONSE_CHUNK, chunk_bytes=chunk_bytes))
    assert wrapped == [pb.GradientResponse(chunk=c).SerializeToString() for c in expected]
    # and read back without protobuf copying the data
    np.testing.assert_array_equal(decode_parts(read_chunk(raw) for raw in prepared)["flat"], whole)
    np.testing.assert_array_equal(decode_parts(read_gradient_response(raw) for raw in wrapped)["flat"], whole)


def test_named_tensors_in_request_messages_are_protobufs_own_bytes():
    tensors = {"W1": np.arange(12.0).reshape(3, 4).T, "b1": np.array([1.5, -2.0]), "e": np.zeros((0, 3)),
               "big": np.random.default_rng(0).standard_normal(300_000)}          # 3 chunks
    expected = list(encode_all(tensors))
    for message, field in [(pb.SetParametersRequest, "chunk"), (pb.GradientRequest, "parameters"),
                           (pb.UploadDatasetRequest, "chunk")]:
        number = message.DESCRIPTOR.fields_by_name[field].number
        prepared = list(encode_tensors(tensors, field=number))
        assert prepared == [message(**{field: c}).SerializeToString() for c in expected]
        read = chunk_reader(message, field)
        parts = [read(raw) for raw in prepared]
        assert all(p.message == message() for p in parts)
        out = decode_parts((p.chunk, p.data) for p in parts)
        for name, a in tensors.items():
            np.testing.assert_array_equal(out[name], a)


@settings(max_examples=200, deadline=None)
@given(chunk=st.none() | st.builds(pb.TensorChunk, name=st.text(max_size=5), offset=st.integers(0, 99),
                                   data=st.binary(max_size=50)),
       job_id=st.text(max_size=5), rows=st.lists(st.integers(0, 99), max_size=3), flat=st.booleans(),
       seed=st.integers(0, 2 ** 32), twice=st.booleans())
def test_any_encoding_of_a_request_reads_as_protobuf_reads_it(chunk, job_id, rows, flat, seed, twice):
    """A GradientRequest's fields in any order, the parameters chunk absent, present or given twice (merged)."""
    parts = [pb.GradientRequest(job_id=job_id).SerializeToString(),
             pb.GradientRequest(batch=pb.Batch(rows=rows)).SerializeToString(),
             pb.GradientRequest(flat=flat).SerializeToString()]
    if chunk is not None:
        parts.append(pb.GradientRequest(parameters=chunk).SerializeToString())
        if twice:
            parts.append(pb.GradientRequest(parameters=pb.TensorChunk(dtype=pb.FLOAT64)).SerializeToString())
    random.Random(seed).shuffle(parts)
    raw = b"".join(parts)
    expected = pb.GradientRequest.FromString(raw)
    got = chunk_reader(pb.GradientRequest, "parameters")(raw)
    assert isinstance(got, WithChunk)
    if expected.HasField("parameters"):
        _same_chunk(got.chunk, got.data, expected.parameters)
        expected.ClearField("parameters")
    else:
        assert got.chunk is None and len(got.data) == 0
    assert got.message == expected and not got.message.HasField("parameters")


def test_big_endian_pieces_go_out_little_endian():
    pieces = [np.arange(3, dtype=">f8"), np.arange(3, 5, dtype=">f8")]
    (raw,) = encode_pieces("flat", pieces)
    assert pb.TensorChunk.FromString(raw).data == np.arange(5, dtype="<f8").tobytes()


def test_pieces_of_different_dtypes_are_refused():
    with pytest.raises(ValueError, match="one dtype"):
        list(encode_pieces("flat", [np.zeros(2, np.float32), np.zeros(2, np.float64)]))
    with pytest.raises(ValueError, match="one dtype"):
        list(encode_pieces("flat", [np.zeros(2, np.float32), np.zeros(2, np.int64)]))


def _fields(chunk: pb.TensorChunk) -> list[bytes]:
    """Each set field of a chunk serialized on its own (concatenated, in any order, they parse to it)."""
    out = []
    for field, value in chunk.ListFields():
        one = pb.TensorChunk()
        if field.is_repeated:
            getattr(one, field.name).extend(value)
        else:
            setattr(one, field.name, value)
        out.append(one.SerializeToString())
    return out


chunks = st.builds(
    pb.TensorChunk, name=st.text(max_size=8), dtype=st.sampled_from([pb.FLOAT32, pb.FLOAT64, pb.INT64]),
    shape=st.lists(st.integers(-3, 2 ** 40), max_size=3), offset=st.integers(0, 2 ** 40),
    data=st.binary(max_size=300))


@settings(max_examples=300, deadline=None)
@given(chunk=chunks, seed=st.integers(0, 2 ** 32), extra=st.sampled_from(["none", "unknown", "data twice"]))
def test_any_encoding_of_a_chunk_reads_as_protobuf_reads_it(chunk, seed, extra):
    """Fields in any order, unknown fields and a repeated data field (the last one wins)."""
    parts = _fields(chunk)
    random.Random(seed).shuffle(parts)
    if extra == "unknown":
        parts.insert(seed % (len(parts) + 1), b"\x98\x06\x07" + b"\xa2\x06\x02hi")   # fields 99 (varint), 100 (bytes)
    elif extra == "data twice":
        parts.insert(0, pb.TensorChunk(data=b"first").SerializeToString())
    raw = b"".join(parts)
    expected = pb.TensorChunk.FromString(raw)
    head, data = read_chunk(raw)
    _same_chunk(head, data, expected)
    wrapped = pb.GradientResponse(chunk=expected).SerializeToString()
    head, data = read_gradient_response(wrapped)
    _same_chunk(head, data, expected)


def _reads_as_protobuf(raw: bytes) -> bool:
    """read_chunk(raw) gives protobuf's chunk, or refuses it as protobuf does; True if refused."""
    try:
        expected = pb.TensorChunk.FromString(raw)
    except DecodeError:
        with pytest.raises(DecodeError):
            read_chunk(raw)
        return True
    head, data = read_chunk(raw)
    _same_chunk(head, data, expected)
    return False


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=64))
def test_garbage_is_refused_as_protobuf_refuses_it(raw):
    _reads_as_protobuf(raw)


@pytest.mark.parametrize("raw", [
    b"\x0a\x01a\xaa\x80\x80\x80\x80\x00\x02hi",     # the data key padded to six bytes
    b"\x0a\x01a\xaa\x00\x02hi",                     # ... to two bytes
    b"\x0a\x01a\x2a\x82\x80\x80\x80\x80\x00hi",     # the data length padded to six bytes
    b"\x0a\x01a\x2a\x82\x00hi",                     # ... to two bytes
    b"\x0a\x01a\x2a\x80\x80\x80\x80\x10",           # a length of 2^32
    b"\x0a\x01a\x2a\x02hi\xf8\xff\xff\xff\x0f\x00",   # the largest field number, then a varint
])
def test_unusual_keys_and_lengths_read_as_protobuf_reads_them(raw):
    if _reads_as_protobuf(raw):          # refused: refused inside a request too
        with pytest.raises(DecodeError):
            chunk_reader(pb.SetParametersRequest, "chunk")(pb.SetParametersRequest(job_id="j").SerializeToString()
                                                           + b"\x12" + bytes([len(raw)]) + raw)


def test_pieces_are_checked():
    (raw,) = encode_pieces("flat", [np.arange(2, dtype="<f8"), np.arange(2, 4, dtype=">f8")])   # both FLOAT64
    assert pb.TensorChunk.FromString(raw).data == np.arange(4, dtype="<f8").tobytes()
    with pytest.raises(ValueError, match="at least one piece"):
        list(encode_pieces("flat", []))
    with pytest.raises(ValueError, match="does not hold"):
        list(encode_pieces("W", [np.zeros(6)], shape=(2, 2)))


def test_a_oneof_field_is_not_read_apart():
    with pytest.raises(ValueError, match="oneof"):
        chunk_reader(pb.GradientResponse, "chunk")


def test_a_truncated_chunk_is_a_decode_error():
    raw = next(encode_pieces("flat", [np.arange(100.0)]))
    with pytest.raises(DecodeError):
        read_chunk(raw[:-1])


def test_a_summary_reads_as_a_summary_and_an_odd_response_as_protobuf_reads_it():
    summary = pb.GradientSummary(loss=1.5, grad_norm=2.0, rows=3, step=4, shard_seconds=[0.1, 0.2])
    assert read_gradient_response(pb.GradientResponse(summary=summary).SerializeToString()) == summary
    chunk = pb.TensorChunk(name="flat", dtype=pb.FLOAT32, shape=[1], data=b"\0\0\x80?")
    # a chunk, then a summary: the oneof keeps the last, as protobuf says
    odd = pb.GradientResponse(chunk=chunk).SerializeToString() + pb.GradientResponse(summary=summary).SerializeToString()
    assert read_gradient_response(odd) == summary
    odd = pb.GradientResponse(summary=summary).SerializeToString() + pb.GradientResponse(chunk=chunk).SerializeToString()
    head, data = read_gradient_response(odd)
    _same_chunk(head, data, chunk)
    # a chunk field given twice: protobuf merges the two messages
    halves = [pb.GradientResponse(chunk=pb.TensorChunk(name="flat", offset=8)),
              pb.GradientResponse(chunk=pb.TensorChunk(dtype=pb.FLOAT32, shape=[3], data=b"1234"))]
    head, data = read_gradient_response(b"".join(h.SerializeToString() for h in halves))
    _same_chunk(head, data, pb.TensorChunk(name="flat", offset=8, dtype=pb.FLOAT32, shape=[3], data=b"1234"))


# --- a real server: stock protobuf clients read what it prepares --------------------------

def test_stock_protobuf_stubs_read_the_prepared_streams(client, server):
    """The generated stub (protobuf's own parser, as any other client uses) and our Client agree."""
    job = client.create_job("softmax", features=70_000, outputs=5, rows=16, shards=2, dtype="float32")
    stub = pb_grpc.GradShardStub(grpc.insecure_channel(server[0]))
    ours = client.get_params(job.job_id, flat=True)["flat"]
    assert ours.size == job.n_params and ours.nbytes > 1 << 20     # more than one chunk
    stock = decode_stream(stub.GetParameters(pb.GetParametersRequest(job_id=job.job_id, flat=True)))["flat"]
    np.testing.assert_array_equal(stock, ours)
    np.testing.assert_array_equal(ours, server[1].get_params(job.job_id))

    summary, grads = client.gradient(job.job_id, flat=True)
    responses = list(stub.ComputeGradient(iter([pb.GradientRequest(job_id=job.job_id, flat=True)])))
    first = responses[0].summary
    assert responses[0].WhichOneof("item") == "summary"
    assert (first.loss, first.grad_norm, first.rows, first.step) == (summary.loss, summary.grad_norm, 16, 0)
    stock = decode_stream(r.chunk for r in responses[1:])["flat"]
    np.testing.assert_array_equal(stock, grads["flat"])
    np.testing.assert_array_equal(grads["flat"], server[1].gradient(job.job_id).grad)
    grads["flat"][0] = 1.0                                          # writable
    client.delete_job(job.job_id)


@pytest.mark.parametrize("method,kind", [("GetJob", "unary_unary"), ("GetParameters", "unary_stream"),
                                         ("SetParameters", "stream_unary"), ("ComputeGradient", "stream_stream"),
                                         ("UploadDataset", "stream_unary")])
def test_a_request_protobuf_cannot_parse_is_invalid_argument(server, method, kind):
    """Bytes that are no message: the client's fault, said as such (gRPC alone would answer INTERNAL)."""
    channel = grpc.insecure_channel(server[0])
    call = getattr(channel, kind)(f"/gradshard.v1.GradShard/{method}")     # raw bytes in and out
    garbage = b"\x0a\x05ab"                                               # a string field cut short
    request = garbage if kind.startswith("unary") else iter([garbage])
    with pytest.raises(grpc.RpcError) as e:
        result = call(request, timeout=30)
        if kind.endswith("stream"):
            list(result)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "the request is not a valid" in e.value.details() and "Request" in e.value.details()
    channel.close()


def test_a_stream_the_client_cannot_decode_is_cancelled():
    """A server's chunk out of order: the client raises at once and cancels the call (the server sees it end)."""
    import threading
    from concurrent import futures

    from service.chunkwire import register
    from service.client import Client

    ended = {name: threading.Event() for name in ("GetParameters", "ComputeGradient")}

    class Broken(pb_grpc.GradShardServicer):
        def _broken(self, name, context, wrap):
            context.add_callback(ended[name].set)
            chunk = pb.TensorChunk(name="flat", dtype=pb.FLOAT64, shape=[4], offset=8, data=b"\0" * 8)
            yield wrap(chunk)
            ended[name].wait(30)                 # more would follow; only a cancel ends this call early

        def GetParameters(self, request, context):
            yield from self._broken("GetParameters", context, lambda c: c)

        def ComputeGradient(self, request_iterator, context):
            next(request_iterator)
            yield pb.GradientResponse(summary=pb.GradientSummary(loss=1.0))
            yield from self._broken("ComputeGradient", context, lambda c: pb.GradientResponse(chunk=c))

    server = grpc.server(futures.ThreadPoolExecutor(4))
    register(pb_grpc.add_GradShardServicer_to_server, Broken(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with Client(f"127.0.0.1:{port}", timeout=60) as client:
            for name, call in (("GetParameters", lambda: client.get_params("j", flat=True)),
                               ("ComputeGradient", lambda: client.gradient("j", flat=True))):
                with pytest.raises(ValueError, match="does not follow"):
                    call()
                assert ended[name].wait(5), f"{name} was not cancelled"
    finally:
        server.stop(0)
