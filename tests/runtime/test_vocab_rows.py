"""vocab_rows.packed_codes_at (the torch path's code reads of single rows) against pack_codes' own input."""

import pytest
import torch

from prinmix.algorithms.packing import pack_codes
from prinmix.runtime.vocab_rows import packed_codes_at


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 7, 13, 64])
def test_codes_at_every_position_equal_the_packed_codes(bits, n):
    """Every position, the stream's last code included (its second byte clamped inside the stream)."""
    codes = torch.randint(0, 2 ** bits, (n,), generator=torch.Generator().manual_seed(bits * 100 + n), dtype=torch.uint8)
    data = pack_codes(codes, bits)
    positions = torch.randperm(n)
    assert torch.equal(packed_codes_at(data, bits, positions), codes[positions].to(torch.int64))
