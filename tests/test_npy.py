"""``data.npy.loads``: a shard's ``.npy`` member read as ``numpy.load`` reads it, or refused."""

from __future__ import annotations

import io

import numpy as np
import pytest

from gwtn_dist.data import npy


def _npy_bytes(array: np.ndarray, version: tuple[int, int] | None = None) -> bytes:
    out = io.BytesIO()
    np.lib.format.write_array(out, array, version=version, allow_pickle=False)
    return out.getvalue()


_RNG = np.random.default_rng(0)
ARRAYS = {
    "uint8 image": _RNG.integers(0, 256, (28, 28), dtype=np.uint8),
    "uint8 colour image": _RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8),
    "uint16 token ids": _RNG.integers(0, 65536, (64,), dtype=np.uint16),
    "float64 Fortran order": np.asfortranarray(_RNG.random((3, 5))),
    "big-endian float32": _RNG.random((2, 3, 4)).astype(">f4"),
    "0-d": np.array(3.5),
    "empty": np.zeros((0, 4), dtype=np.int32),
    "bool": _RNG.random(9) < 0.5,
}


@pytest.mark.parametrize("version", [(1, 0), (2, 0), (3, 0)])
@pytest.mark.parametrize("name", sorted(ARRAYS))
def test_loads_gives_what_numpy_load_gives(name, version):
    data = _npy_bytes(ARRAYS[name], version)
    got, want = npy.loads(data), np.load(io.BytesIO(data))
    assert got.dtype == want.dtype and got.shape == want.shape
    assert np.array_equal(got, want)
    assert got.flags.c_contiguous == want.flags.c_contiguous
    assert got.flags.f_contiguous == want.flags.f_contiguous
    assert got.flags.writeable


def test_arrays_read_from_the_same_header_do_not_share_memory():
    data = _npy_bytes(ARRAYS["uint8 image"])
    first, second = npy.loads(data), npy.loads(data)
    first[0, 0] ^= 0xFF
    assert not np.array_equal(first, second)
    assert np.array_equal(second, ARRAYS["uint8 image"])


def test_bytes_past_the_array_are_ignored_as_numpy_does():
    data = _npy_bytes(ARRAYS["uint16 token ids"]) + b"\0\0\0"
    assert np.array_equal(npy.loads(data), ARRAYS["uint16 token ids"])


@pytest.mark.parametrize("bad, message", [
    (b"not an array", "bad magic"),
    (b"\x93NUMPY\x07\x00\x10\x00{}", "version 7"),
    (_npy_bytes(ARRAYS["uint8 image"])[:-1], "truncated"),
    (_npy_bytes(ARRAYS["uint8 image"]).replace(b"'descr'", b"'dexcr'"), "bad .npy header"),
    (_npy_bytes(ARRAYS["uint8 image"]).replace(b"(28, 28)", b"(28,-28)"), "bad .npy shape"),
])
def test_bad_data_raises_value_error_naming_the_fault(bad, message):
    with pytest.raises(ValueError, match=message):
        npy.loads(bad)


def test_an_array_of_python_objects_is_refused_not_unpickled():
    out = io.BytesIO()
    np.lib.format.write_array(out, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="Python objects"):
        npy.loads(out.getvalue())
