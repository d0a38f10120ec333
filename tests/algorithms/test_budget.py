import pytest

from prinmix.algorithms.budget import budget_bits, parse_ratio


@pytest.mark.parametrize("text,value", [("1/16", 1 / 16), ("0.0625", 0.0625), ("16x", 1 / 16), ("1/32", 1 / 32),
                                        ("3/16", 3 / 16), (" 64X ", 1 / 64), (0.5, 0.5)])
def test_parse_ratio(text, value):
    assert parse_ratio(text) == pytest.approx(value)


@pytest.mark.parametrize("bad", ["0", "-1/16", "2", "abc", "1/0", "0x", "nan", ""])
def test_parse_ratio_rejects(bad):
    with pytest.raises(ValueError):
        parse_ratio(bad)


def test_budget_bits_is_one_bit_per_entry_at_one_sixteenth():
    assert budget_bits(1 / 16, 3584, 512) == 3584 * 512
    assert budget_bits(1 / 32, 7, 9) == (7 * 9) // 2
