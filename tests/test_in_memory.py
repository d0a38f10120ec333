"""prinmix.apply_delta equals prinmix.merge; load_with_deltas runs tenants as their merged models."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import prinmix
from fixtures.tiny_models import single_thread
from prinmix.errors import BaseMismatchError, PrinmixError


@pytest.fixture(scope="module")
def deltas(tiny_pair, tmp_path_factory):
    work = tmp_path_factory.mktemp("in_memory")
    out = {}
    with single_thread():
        for dtype in ("float32", "bf16"):
            base, ft = tiny_pair("llama", dtype)
            path = work / f"{dtype}.delta"
            prinmix.compress(base, ft, path, ratio="1/8", method="prinmix", device="cpu",
                             calibration=prinmix.CalibrationConfig(nsamples=4, seqlen=32))
            merged = prinmix.merge(base, path, work / f"merged-{dtype}")
            out[dtype] = (base, path, merged)
    return out


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("dtype", ["float32", "bf16"])
def test_apply_delta_is_bit_identical_to_merge_in_the_checkpoint_dtype(deltas, dtype):
    base, path, merged = deltas[dtype]
    with single_thread():
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype="auto")
        before = _params(model)
        assert prinmix.apply_delta(model, path) is model
        want = _params(AutoModelForCausalLM.from_pretrained(str(merged), dtype="auto"))
    got = _params(model)
    assert got.keys() == want.keys()
    changed = [k for k in got if not torch.equal(before[k], got[k])]
    assert changed and all(torch.equal(got[k], want[k]) for k in got), [k for k in got if not torch.equal(got[k], want[k])]


def test_apply_delta_to_a_float32_copy_of_a_bf16_base_matches_merge_to_bf16_rounding(deltas):
    base, path, merged = deltas["bf16"]
    with single_thread():
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        prinmix.apply_delta(model, path)
        want = _params(AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32))
    for k, v in _params(model).items():  # merge rounds base + ΔŴ to bf16 (8 mantissa bits); here kept in fp32
        torch.testing.assert_close(v, want[k], rtol=2 ** -8, atol=1e-6)


def test_apply_delta_refuses_other_bases_and_non_models(deltas, tiny_pair):
    _, path, _ = deltas["float32"]
    qwen_base, _ = tiny_pair("qwen2")
    other = AutoModelForCausalLM.from_pretrained(str(qwen_base))
    with pytest.raises(BaseMismatchError, match="made for a 'llama' base"):
        prinmix.apply_delta(other, path)
    bf16_base, _, _ = deltas["bf16"]
    wrong = AutoModelForCausalLM.from_pretrained(str(bf16_base))  # a llama, but not this delta's base
    with pytest.raises(BaseMismatchError, match="another base"):
        prinmix.apply_delta(wrong, path)
    with pytest.raises(PrinmixError, match="expected a transformers PreTrainedModel"):
        prinmix.apply_delta({"w": torch.zeros(1)}, path)
    wrong.name_or_path = ""
    with pytest.raises(PrinmixError, match="verify_base=False"):
        prinmix.apply_delta(wrong, path)


def test_load_with_deltas_generates_like_the_merged_model(deltas):
    base, path, merged = deltas["float32"]
    ids = torch.tensor([[5, 17, 29, 3, 11, 40]])
    with single_thread():
        mt = prinmix.load_with_deltas(base, {"ft": path})
        got = mt.logits(ids, ["ft"])
        base_logits = mt.logits(ids, [None])
        model = AutoModelForCausalLM.from_pretrained(str(merged))
        with torch.no_grad():
            want = model(ids).logits
            want_base = AutoModelForCausalLM.from_pretrained(str(base))(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(base_logits, want_base, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, base_logits)
