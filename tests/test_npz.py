"""Tests for workers.npz: header-only describe, memory-mapped reads, column blocks."""
import os
import struct
import sys
import zipfile

import numpy as np
import pytest

# The project is not necessarily installed; make the repo root importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from workers.npz import NpzArrayInfo, describe, open_array, read_columns  # noqa: E402


def _arrays():
    rng = np.random.default_rng(0)
    return {
        "X": rng.standard_normal((7, 5)),  # float64, C order
        "X32": rng.standard_normal((6, 4)).astype(np.float32),
        "XF": np.asfortranarray(rng.standard_normal((5, 3))),
        "XF32": np.asfortranarray(rng.standard_normal((4, 6)).astype(np.float32)),
        "y": np.arange(7, dtype=np.int64) % 3,
    }


@pytest.fixture
def stored(tmp_path):
    path = str(tmp_path / "stored.npz")
    np.savez(path, **_arrays())
    return path


@pytest.fixture
def deflated(tmp_path):
    path = str(tmp_path / "deflated.npz")
    np.savez_compressed(path, **_arrays())
    return path


@pytest.mark.parametrize("kind, compressed", [("stored", False), ("deflated", True)])
def test_describe_reports_headers(request, kind, compressed):
    info = describe(request.getfixturevalue(kind))
    assert set(info) == {"X", "X32", "XF", "XF32", "y"}
    assert info["X"] == NpzArrayInfo("X", (7, 5), np.dtype(np.float64), False, compressed)
    assert info["X32"] == NpzArrayInfo("X32", (6, 4), np.dtype(np.float32), False, compressed)
    assert info["XF"] == NpzArrayInfo("XF", (5, 3), np.dtype(np.float64), True, compressed)
    assert info["XF32"].fortran_order and info["XF32"].dtype == np.float32
    assert info["y"] == NpzArrayInfo("y", (7,), np.dtype(np.int64), False, compressed)


@pytest.mark.parametrize("name", ["X", "X32", "XF", "XF32", "y"])
def test_open_array_stored_is_readonly_memmap(stored, name):
    expected = _arrays()[name]
    arr = open_array(stored, name)
    assert isinstance(arr, np.memmap)
    assert arr.dtype == expected.dtype and arr.shape == expected.shape
    assert arr.flags.f_contiguous == expected.flags.f_contiguous
    assert not arr.flags.writeable
    np.testing.assert_array_equal(arr, expected)


@pytest.mark.parametrize("name", ["X", "XF32", "y"])
def test_open_array_compressed_falls_back_to_load(deflated, name):
    arr = open_array(deflated, name)
    assert not isinstance(arr, np.memmap)
    np.testing.assert_array_equal(arr, _arrays()[name])


@pytest.mark.parametrize("kind", ["stored", "deflated"])
@pytest.mark.parametrize("name", ["X", "XF"])
@pytest.mark.parametrize("begin, end", [(1, 3), (0, 3), (2, 2)])
def test_read_columns_block(request, kind, name, begin, end):
    block = read_columns(request.getfixturevalue(kind), name, begin, end, np.float32)
    expected = _arrays()[name][:, begin:end].astype(np.float32)
    assert type(block) is np.ndarray and block.flags.c_contiguous
    assert block.dtype == np.float32 and block.shape == expected.shape
    np.testing.assert_array_equal(block, expected)


def test_read_columns_all_columns_is_a_copy(stored):
    block = read_columns(stored, "X", 0, 5, np.float64)
    np.testing.assert_array_equal(block, _arrays()["X"])
    assert type(block) is np.ndarray and block.flags.owndata and block.flags.writeable


@pytest.mark.parametrize("begin, end", [(-1, 2), (3, 2), (0, 6), (6, 6)])
def test_read_columns_bad_range(stored, begin, end):
    with pytest.raises(ValueError, match=r"stored\.npz.*\[%d, %d\).*'X'.*5 columns" % (begin, end)):
        read_columns(stored, "X", begin, end, np.float64)


def test_read_columns_rejects_1d(stored):
    with pytest.raises(ValueError, match="'y' is 1-D"):
        read_columns(stored, "y", 0, 1, np.float64)


@pytest.mark.parametrize("kind", ["stored", "deflated"])
def test_missing_member_names_file_and_members(request, kind):
    path = request.getfixturevalue(kind)
    with pytest.raises(ValueError) as exc:
        open_array(path, "W")
    msg = str(exc.value)
    assert path in msg and "no array 'W'" in msg and "X, X32, XF, XF32, y" in msg


def test_not_a_zip(tmp_path):
    path = tmp_path / "plain.npz"
    np.save(path.with_suffix(".npy"), np.ones(3))
    os.rename(path.with_suffix(".npy"), path)  # a bare .npy masquerading as .npz
    for call in (lambda: describe(str(path)), lambda: open_array(str(path), "X")):
        with pytest.raises(ValueError, match="plain.npz is not an npz"):
            call()


def test_object_dtype_rejected(tmp_path):
    path = str(tmp_path / "obj.npz")
    np.savez(path, X=np.ones((2, 2)), o=np.array([{"a": 1}, None], dtype=object))
    assert describe(path)["o"].dtype == np.dtype(object)  # header alone is fine
    with pytest.raises(ValueError, match=r"obj\.npz.*'o'.*object dtype"):
        open_array(path, "o")


def test_local_extra_field_differs_from_central_directory(tmp_path):
    path = str(tmp_path / "long.npz")
    long_name = "features_" + "x" * 200
    big = np.arange(300_000, dtype=np.float64).reshape(1000, 300)
    np.savez(path, **{long_name: big, "y": np.arange(1000)})
    # Precondition: numpy writes a zip64 extra only in the local header, so an
    # offset computed from the central directory's extra length would be wrong.
    with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
        info = zf.getinfo(long_name + ".npy")
        f.seek(info.header_offset)
        name_len, extra_len = struct.unpack("<26x2H", f.read(30))
    assert name_len == len(long_name) + 4 and extra_len != len(info.extra)
    arr = open_array(path, long_name)
    assert isinstance(arr, np.memmap)
    np.testing.assert_array_equal(arr, big)
    np.testing.assert_array_equal(read_columns(path, long_name, 100, 103, np.float32),
                                  big[:, 100:103].astype(np.float32))
    np.testing.assert_array_equal(open_array(path, "y"), np.arange(1000))


def test_empty_stored_array(tmp_path):
    path = str(tmp_path / "empty.npz")
    np.savez(path, X=np.zeros((0, 4), dtype=np.float32))
    arr = open_array(path, "X")
    assert arr.shape == (0, 4) and arr.dtype == np.float32 and not arr.flags.writeable
    assert read_columns(path, "X", 1, 3, np.float64).shape == (0, 2)
