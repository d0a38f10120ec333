import pytest
import torch

from prinmix.algorithms.packing import pack_codes, packed_nbytes, unpack_codes


def reference_pack(codes: list[int], bits: int) -> bytes:
    """Bit-by-bit little-endian packing, the definition the vectorised code must match."""
    out = bytearray((len(codes) * bits + 7) // 8)
    for i, c in enumerate(codes):
        for k in range(bits):
            if (c >> k) & 1:
                pos = i * bits + k
                out[pos // 8] |= 1 << (pos % 8)
    return bytes(out)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("numel", [0, 1, 7, 8, 13, 64, 1001])
def test_round_trip_and_layout(bits, numel):
    gen = torch.Generator().manual_seed(bits * 1000 + numel)
    codes = torch.randint(0, 2 ** bits, (numel,), generator=gen, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.ndim == 1
    assert packed.numel() == packed_nbytes(numel, bits) == (numel * bits + 7) // 8
    assert bytes(packed.tolist()) == reference_pack(codes.tolist(), bits)
    assert torch.equal(unpack_codes(packed, bits, numel), codes)


def test_multidimensional_codes_flatten_row_major():
    codes = torch.randint(0, 8, (5, 7), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    packed = pack_codes(codes, 3)
    assert torch.equal(packed, pack_codes(codes.reshape(-1), 3))
    assert torch.equal(unpack_codes(packed, 3, 35).reshape(5, 7), codes)
    assert torch.equal(pack_codes(codes.t(), 3), pack_codes(codes.t().contiguous().reshape(-1), 3))


def test_known_bytes():
    assert pack_codes(torch.tensor([1, 0, 1, 1], dtype=torch.uint8), 1).tolist() == [0b1101]
    assert pack_codes(torch.tensor([5, 3, 7], dtype=torch.uint8), 3).tolist() == [0b11011101, 0b1]
    assert pack_codes(torch.tensor([0xA, 0x5], dtype=torch.uint8), 4).tolist() == [0x5A]


def test_too_short_buffer_raises():
    packed = pack_codes(torch.ones(13, dtype=torch.uint8), 3)   # 5 bytes
    with pytest.raises(ValueError, match="too short"):
        unpack_codes(packed[:4], 3, 13)
    with pytest.raises(ValueError, match="too short"):
        unpack_codes(torch.zeros(0, dtype=torch.uint8), 8, 1)
    # extra trailing bytes are ignored
    longer = torch.cat([packed, torch.full((3,), 255, dtype=torch.uint8)])
    assert torch.equal(unpack_codes(longer, 3, 13), torch.ones(13, dtype=torch.uint8))


def test_invalid_inputs():
    with pytest.raises(ValueError):
        pack_codes(torch.tensor([4], dtype=torch.uint8), 2)
    with pytest.raises(ValueError):
        pack_codes(torch.tensor([1], dtype=torch.uint8), 0)
    with pytest.raises(ValueError):
        packed_nbytes(10, 9)
    with pytest.raises(TypeError):
        pack_codes(torch.tensor([1.0]), 2)
