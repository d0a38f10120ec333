"""blob_layout.blob_blocks (plain Python, no torch) against CompressedLinear, the blob's writer and torch reader:
the same (width, rank) blocks for every kind of blob, and every truncation / extension refused by both."""

import pytest

from fixtures.compressed_deltas import all_widths, method_deltas
from prinmix.algorithms.blob_layout import blob_blocks
from prinmix.algorithms.compressed_linear import CompressedLinear


def _blobs():
    for seed in (0, 1):
        for name, m in method_deltas(seed=seed).items():
            yield f"{name}-{seed}", m
    yield "all-widths", all_widths(36, 20)


@pytest.mark.parametrize("name,m", list(_blobs()), ids=lambda v: v if isinstance(v, str) else "")
def test_blocks_match_the_parsed_blob(name, m):
    data = m.to_blob().numpy().tobytes()
    assert len(data) == m.nbytes()
    assert blob_blocks(data, m.shape) == [(b.bits, b.rank) for b in m.blocks]
    assert [bits for bits, k in blob_blocks(data, m.shape) for _ in range(k)] == m.rank_widths()


@pytest.mark.parametrize("name,m", list(_blobs())[:5], ids=lambda v: v if isinstance(v, str) else "")
def test_truncated_or_extended_blobs_are_refused_like_from_blob(name, m):
    data = m.to_blob().numpy().tobytes()
    for bad in (data[:-1], data[: len(data) // 2], data + b"\0", data[:1]):
        with pytest.raises(ValueError):
            blob_blocks(bad, m.shape)
        with pytest.raises(ValueError):
            CompressedLinear.from_blob(bytearray(bad), m.shape, m.method)


def test_inconsistent_headers_are_refused():
    m = method_deltas()["mixed"]
    data = bytearray(m.to_blob().numpy().tobytes())
    wrong_width = bytearray(data)
    wrong_width[2] = 9                      # first block's width: 9 bits does not exist
    with pytest.raises(ValueError, match="invalid width 9"):
        blob_blocks(bytes(wrong_width), m.shape)
    with pytest.raises(ValueError, match="exceeds"):
        blob_blocks(bytes(data), (m.shape[0], 1))  # rank 4 > min(h_out, 1)
    with pytest.raises(ValueError, match="unknown blob kind"):
        blob_blocks(b"\x07" + bytes(data[1:]), m.shape)
