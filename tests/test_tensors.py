"""The wire format: named arrays as ordered chunks of at most 1 MiB."""
import numpy as np
import pytest

from gradshard.v1 import gradshard_pb2 as pb
from service.tensors import CHUNK_BYTES, TensorAssembler, decode_stream, encode, encode_all, expect_shapes


def test_a_large_tensor_round_trips_in_chunks_of_at_most_one_mib():
    a = np.random.default_rng(0).standard_normal((1_000_003,)).astype(np.float32)
    chunks = list(encode("flat", a))
    assert len(chunks) == 4 and all(len(c.data) <= CHUNK_BYTES for c in chunks)
    assert [c.offset for c in chunks] == [0, CHUNK_BYTES, 2 * CHUNK_BYTES, 3 * CHUNK_BYTES]
    assert all(list(c.shape) == [1_000_003] and c.dtype == pb.FLOAT32 for c in chunks)
    out = decode_stream(chunks)["flat"]
    np.testing.assert_array_equal(out, a)
    out[0] = 1.0                                    # the client gets a writable array
    assembler = TensorAssembler(expect_shapes({"flat": (1_000_003,)}, np.float32))
    for c in chunks:
        assembler.add(c)
    np.testing.assert_array_equal(assembler.finish()["flat"], a)


def test_named_tensors_keep_shape_dtype_and_bytes():
    tensors = {"W1": np.arange(12.0).reshape(3, 4), "b1": np.array([1.5, -2.0]), "e": np.zeros((0, 3))}
    out = decode_stream(encode_all(tensors))
    for name, a in tensors.items():
        assert out[name].shape == a.shape and out[name].dtype == np.float64
        np.testing.assert_array_equal(out[name], a)


def test_raw_bytes_are_little_endian():
    chunk = next(encode("x", np.array([1.0], dtype=">f8")))
    assert chunk.data == np.array([1.0], "<f8").tobytes() and chunk.dtype == pb.FLOAT64


def test_fortran_order_arrays_are_sent_in_c_order():
    a = np.asfortranarray(np.arange(6.0).reshape(2, 3))
    np.testing.assert_array_equal(decode_stream(encode("W", a))["W"], a)


@pytest.mark.parametrize("chunk,match", [
    (pb.TensorChunk(name="Z", dtype=pb.FLOAT64, shape=[2]), "unknown tensor 'Z'"),
    (pb.TensorChunk(name="W", dtype=pb.FLOAT32, shape=[2, 2]), "dtype float32, the job uses float64"),
    (pb.TensorChunk(name="W", dtype=pb.FLOAT64, shape=[4]), "shape (4,), expected (2, 2)"),
    (pb.TensorChunk(name="W", dtype=pb.FLOAT64, shape=[2, 2], data=b"\0" * 40), "40 bytes is more than its 32"),
])
def test_the_assembler_checks_each_chunk_before_allocating(chunk, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
        TensorAssembler(expect_shapes({"W": (2, 2)}, np.float64)).add(chunk)


def test_later_chunks_must_repeat_the_first_shape():
    assembler = TensorAssembler(lambda name, shape, dtype: None)
    assembler.add(pb.TensorChunk(name="X", dtype=pb.FLOAT64, shape=[2, 3], data=b"\0" * 16))
    with pytest.raises(ValueError, match=r"a chunk says float64 \(2, 4\), the first said float64 \(2, 3\)"):
        assembler.add(pb.TensorChunk(name="X", dtype=pb.FLOAT64, shape=[2, 4], offset=16, data=b"\0" * 8))
