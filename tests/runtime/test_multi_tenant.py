"""MultiTenantModel: a batch of tenants + base in one forward equals each merged checkpoint loaded by
transformers; greedy generation, continuous batching (join/drop) and LRU swapping are exact."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from prinmix import api
from prinmix.algorithms.compressed_linear import BLOB_HEADER_BYTES, BLOCK_HEADER_BYTES, SIGN_HEADER_BYTES
from prinmix.api import CalibrationConfig
from prinmix.errors import BaseMismatchError, PrinmixError
from prinmix.format.delta_file import load_delta, save_delta
from prinmix.runtime.decode_state import left_padded
from prinmix.runtime.delta_linear import DeltaLinear
from prinmix.runtime.multi_tenant import DecodeState, MultiTenantModel
from prinmix.runtime.packed_kernel import kernel_available

METHODS = ("deltacome", "lowrank", "bitdelta")


@pytest.fixture(scope="module")
def llama(tiny_pair, tmp_path_factory):
    """(base_dir, {method: delta path}, {method or None: merged model}) for the tiny llama pair."""
    base, ft = tiny_pair("llama")
    work = tmp_path_factory.mktemp("mt_llama")
    calib = work / "calib.txt"
    calib.write_text("\n".join(f"{a}+{a + 7}={2 * a + 7}" for a in range(300)))
    deltas, refs = {}, {None: AutoModelForCausalLM.from_pretrained(base).eval()}
    for m in METHODS:
        deltas[m] = work / f"{m}.delta"
        api.compress(base, ft, deltas[m], ratio="1/8", method=m, device="cpu", calibration=CalibrationConfig(calib=str(calib), nsamples=4, seqlen=32))
        refs[m] = AutoModelForCausalLM.from_pretrained(api.merge(base, deltas[m], work / f"merged_{m}")).eval()
    return base, deltas, refs


@pytest.fixture(scope="module")
def prinmix_whole(tiny_pair, tmp_path_factory) -> Path:
    """A PrinMix whole delta of the tiny llama pair (compressed linears and embedding rows)."""
    base, ft = tiny_pair("llama")
    work = tmp_path_factory.mktemp("mt_prinmix")
    path, calib = work / "pm.delta", work / "calib.txt"
    calib.write_text("\n".join(f"{a}+{a + 7}={2 * a + 7}" for a in range(300)))
    api.compress(base, ft, path, ratio="1/8", method="prinmix", device="cpu",
                 calibration=CalibrationConfig(calib=str(calib), nsamples=4, seqlen=32))
    assert load_delta(path).vocab
    return path


@pytest.fixture(scope="module")
def served(llama):
    base, deltas, _ = llama
    model = MultiTenantModel(base, backend="torch")
    for m, path in deltas.items():
        model.add_tenant(m, path)
    return model


def _prompts(n_tokens=(9, 4, 12, 7, 3), vocab=500, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in n_tokens]


def _greedy(model, prompt, n):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_batch_of_tenants_and_base_equals_merged_checkpoints(llama, served):
    _, _, refs = llama
    tenants = ["deltacome", None, "lowrank", "bitdelta", "deltacome"]
    prompts = _prompts()
    ids, mask, pos = left_padded(prompts)
    logits = served.logits(ids, tenants, attention_mask=mask, position_ids=pos)
    for i, (p, t) in enumerate(zip(prompts, tenants)):
        with torch.no_grad():
            ref = refs[t](torch.tensor([p])).logits[0]
        got = logits[i, ids.shape[1] - len(p):]
        assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4), t
        if t is None:
            assert torch.allclose(got, ref, atol=1e-5)


def test_greedy_generate_equals_merged_models(llama, served):
    _, _, refs = llama
    tenants = ["lowrank", "deltacome", None, "bitdelta"]
    prompts = _prompts((6, 11, 5, 8), seed=1)
    out = served.generate(prompts, tenants, max_new_tokens=6)
    for p, t, o in zip(prompts, tenants, out):
        assert o == _greedy(refs[t], p, 6), t


def test_continuous_batching_join_and_drop(llama, served):
    _, _, refs = llama
    prompts = _prompts((7, 10, 4), seed=2)
    state = served.prefill(prompts[:2], ["deltacome", None], seq_ids=["a", "b"])
    served.decode_step(state)
    late = served.prefill(prompts[2:], ["bitdelta"], seq_ids=["c"])       # joins the running batch
    state = DecodeState.join(state, late)
    served.decode_step(state)
    state.drop(["b"])                                                     # leaves
    assert state.seq_ids == ["a", "c"] and state.mask.shape[1] < 10 + 3
    for _ in range(2):
        served.decode_step(state)
    done = {s.seq_id: s.generated for s in state.seqs}
    assert done["a"] == _greedy(refs["deltacome"], prompts[0], 5)
    assert done["c"] == _greedy(refs["bitdelta"], prompts[2], 4)


def test_lru_swapping_under_a_device_budget(llama):
    base, deltas, refs = llama
    one = MultiTenantModel(base, backend="torch")
    sizes = {m: one.add_tenant(m, p) for m, p in deltas.items()}
    budget = max(one.registry.nbytes(m) for m in deltas)                 # one tenant at a time
    model = MultiTenantModel(base, backend="torch", budget_bytes=budget)
    for m, p in deltas.items():
        model.add_tenant(m, p)
    prompt = _prompts((6,), seed=3)[0]
    for m in ("deltacome", "lowrank", "deltacome", "bitdelta"):
        assert model.generate([prompt, prompt], [m, None], 3)[0] == _greedy(refs[m], prompt, 3)
        assert model.registry.resident == [m]
    assert model.registry.evictions == 3
    assert model.tenant_bytes("bitdelta")["resident_bytes"] == model.registry.nbytes("bitdelta")
    assert model.tenant_bytes("deltacome")["resident_bytes"] == 0                 # swapped out to host memory
    with pytest.raises(PrinmixError, match="device budget"):
        model.generate([prompt, prompt], ["deltacome", "lowrank"], 1)
    for m, info in sizes.items():                                         # resident ≈ the file's linear payload
        delta = load_delta(deltas[m])
        headers = sum(SIGN_HEADER_BYTES - 2 if d.sign is not None else BLOB_HEADER_BYTES + BLOCK_HEADER_BYTES *
                      len(d.blocks) for d in delta.matrices.values())
        assert info["linear_bytes"] == delta.linear_bytes() - headers
        assert info["other_bytes"] >= delta.dense_bytes() - 8 * sum(i.numel() for i, _, _ in delta.rows.values())


def _synthetic_qwen2_pair(root: Path):
    """Random tiny Qwen2 (q/k/v biases, tied embeddings, a sliding-window layer) and a perturbed copy:
    low-rank + noise on the linears, new biases and norms, ten changed embedding rows."""
    cfg = Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
                      use_sliding_window=True, sliding_window=6, max_window_layers=1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.1, generator=g)
        model.save_pretrained(root / "base")
        for n, p in model.named_parameters():
            if "embed" in n:
                p[10:20] += 0.1 * torch.randn(10, p.shape[1], generator=g)
            elif p.ndim == 2:
                u, v = torch.randn(p.shape[0], 4, generator=g), torch.randn(4, p.shape[1], generator=g)
                p += 0.02 * (u @ v) / p.shape[1] ** 0.5 + 0.002 * torch.randn(p.shape, generator=g)
            else:
                p += 0.05 * torch.randn(p.shape, generator=g)
        model.save_pretrained(root / "finetuned")
    return root / "base", root / "finetuned"


@pytest.mark.parametrize("method,exact", [("lowrank", True), ("lowrank", False),
                                          ("bitdelta", False)])
def test_biases_norms_tied_embedding_rows_and_sliding_window(tmp_path, method, exact):
    """Exact rows (--exact-embeddings) or a compressed tied embedding (lookup rows gathered from the packed
    form, head as a delta on the changed rows' logits) serve the merged model's logits."""
    base, ft = _synthetic_qwen2_pair(tmp_path)
    path = tmp_path / "lr.delta"
    api.compress(base, ft, path, ratio="1/4" if method != "bitdelta" else "1/16", method=method, device="cpu",
                 exact_embeddings=exact, calibration=CalibrationConfig(nsamples=4, seqlen=32))
    delta = load_delta(path)
    assert any(n.endswith("bias") for n in delta.dense)
    assert "model.embed_tokens.weight" in (delta.rows if exact else delta.vocab)
    model = MultiTenantModel(base, backend="torch")
    model.add_tenant("t", path)
    merged = AutoModelForCausalLM.from_pretrained(api.merge(base, path, tmp_path / "merged")).eval()
    plain = AutoModelForCausalLM.from_pretrained(base).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 96, (n,), generator=g).tolist() for n in (9, 14, 4)]
    prompts[0][:3] = [12, 15, 11]                                         # changed embedding rows
    tenants = ["t", None, "t"]
    ids, mask, pos = left_padded(prompts)
    logits = model.logits(ids, tenants, attention_mask=mask, position_ids=pos)
    for i, (p, t) in enumerate(zip(prompts, tenants)):
        with torch.no_grad():
            ref = (merged if t else plain)(torch.tensor([p])).logits[0]
        assert torch.allclose(logits[i, ids.shape[1] - len(p):], ref, atol=1e-4, rtol=1e-4), t
    out = model.generate(prompts, tenants, 10)                            # past the sliding window
    for p, t, o in zip(prompts, tenants, out):
        assert o == _greedy(merged if t else plain, p, 10)


def test_refuses_what_it_cannot_serve(llama, served, tmp_path):
    base, deltas, _ = llama
    delta = load_delta(deltas["lowrank"])
    delta.matrices.pop("model.layers.0.mlp.up_proj.weight")  # stored as both is refused by load_delta already
    delta.dense["model.layers.0.mlp.up_proj.weight"] = torch.zeros(128, 64)
    save_delta(delta, tmp_path / "dense_linear.delta")
    with pytest.raises(PrinmixError, match="dense replacement"):
        served.add_tenant("x", tmp_path / "dense_linear.delta")
    delta = load_delta(deltas["lowrank"])
    idx, m, shape = delta.vocab["model.embed_tokens.weight"]          # one token added (an exact row)
    grown = [shape[0] + 1, shape[1]]
    delta.vocab["model.embed_tokens.weight"] = (idx, m, grown)
    delta.rows["model.embed_tokens.weight"] = (torch.tensor([shape[0]]), torch.zeros(1, shape[1]), grown)
    save_delta(delta, tmp_path / "vocab.delta")
    with pytest.raises(PrinmixError, match="vocabulary size"):
        served.add_tenant("y", tmp_path / "vocab.delta")
    q_base, q_ft = _synthetic_qwen2_pair(tmp_path / "q")
    api.compress(q_base, q_ft, tmp_path / "other.delta", ratio="1/4", method="lowrank", device="cpu")
    with pytest.raises(BaseMismatchError):
        served.add_tenant("z", tmp_path / "other.delta")
    with pytest.raises(PrinmixError, match="already registered"):
        served.add_tenant("lowrank", deltas["lowrank"])
    assert sorted(served.tenants) == sorted(METHODS)


@pytest.mark.parametrize("cache_bytes", [1 << 30, 20_000], ids=["all cached", "cache smaller than the tenants"])
def test_fast_cpu_path_equals_merged_checkpoints(llama, cache_bytes):
    """The factor-cache backend serves the same logits and greedy tokens."""
    base, deltas, refs = llama
    model = MultiTenantModel(base, backend="cached", factor_cache_bytes=cache_bytes)
    for m, path in deltas.items():
        model.add_tenant(m, path)
    _assert_serves_like(model, refs, ["lowrank", None, "deltacome", "bitdelta"], _prompts((6, 11, 5, 8), seed=4))
    mem = model.memory()
    assert 0 < mem["factor_cache_bytes"] <= cache_bytes
    assert mem["delta_bytes"] == sum(model.registry.nbytes(m) for m in deltas)
    assert model.factor_cache.hits > 0


def _assert_serves_like(model, refs, tenants, prompts):
    """One batch of `tenants` gives each one's merged checkpoint's logits (1e-4: float32 models) and greedy tokens."""
    ids, mask, pos = left_padded(prompts)
    logits = model.logits(ids, tenants, attention_mask=mask, position_ids=pos)
    for i, (p, t) in enumerate(zip(prompts, tenants)):
        with torch.no_grad():
            ref = refs[t](torch.tensor([p])).logits[0]
        assert torch.allclose(logits[i, ids.shape[1] - len(p):], ref, atol=1e-4, rtol=1e-4), t
    out = model.generate(prompts, tenants, max_new_tokens=5)
    for p, t, o in zip(prompts, tenants, out):
        assert o == _greedy(refs[t], p, 5), t


def test_token_choice_hook(served):
    """prefill / decode_step hand the step's sequences and last-position logits to `choose` before appending
    its tokens: the logits equal a full forward over prompt + chosen tokens, and the chosen (not the greedy)
    tokens are what the next step feeds."""
    tenants = ["lowrank", None, "bitdelta"]
    prompts = _prompts((5, 8, 3), seed=7)
    seen = []

    def least_likely(seqs, logits):
        seen.append(([list(s.prompt) + list(s.generated) for s in seqs], logits.clone()))
        return logits.argmin(-1).tolist()

    state = served.prefill(prompts, tenants, ["a", "b", "c"], choose=least_likely)
    for _ in range(2):
        served.decode_step(state, choose=least_likely)
    for fed, logits in seen:                                          # what each step saw, before its token
        ids, mask, pos = left_padded(fed)
        full = served.logits(ids, tenants, attention_mask=mask, position_ids=pos)[:, -1]
        assert torch.allclose(logits, full, atol=1e-4, rtol=1e-4)
    assert [s.generated for s in state.seqs] == [[int(seen[k][1][i].argmin()) for k in range(3)] for i in range(3)]
    assert state.seqs[0].generated != served.generate([prompts[0]], ["lowrank"], 3)[0]
    with pytest.raises(PrinmixError, match="2 tokens for 3 sequences"):
        served.decode_step(state, choose=lambda seqs, logits: [0, 0])


@pytest.mark.parametrize("cache_dtype", [torch.int4, torch.int8])
def test_integer_cache_serves_a_prinmix_whole_delta(tiny_pair, prinmix_whole, cache_dtype):
    """A PrinMix whole delta (compressed linears and embedding rows) with an int4 (the CPU default of a 16-bit
    model) or int8 factor cache (linears, embedding and lm_head rows) gives the torch reference's logits within
    bfloat16 rounding of the delta's effect, from Int8Factors / Int4Factors."""
    base, path = tiny_pair("llama")[0], prinmix_whole
    assert MultiTenantModel(base).factor_cache.dtype == torch.float32           # the default of a float32 model
    assert MultiTenantModel(base, dtype=torch.bfloat16).factor_cache.dtype == torch.int4
    fast = MultiTenantModel(base, backend="cached", factor_cache_dtype=cache_dtype)
    ref = MultiTenantModel(base, backend="torch")
    for model in (fast, ref):
        model.add_tenant("t", path)
    prompts = _prompts((9, 5), seed=3)
    ids, mask, pos = left_padded(prompts)
    got, want = (m.logits(ids, ["t", None], attention_mask=mask, position_ids=pos) for m in (fast, ref))
    plain = ref.logits(ids, [None, None], attention_mask=mask, position_ids=pos)
    assert torch.equal(got[1], want[1])
    effect = (want[0] - plain[0]).norm()
    assert effect > 0 and (got[0] - want[0]).norm() < 0.02 * effect
    kinds = {type(f).__name__ for f, _ in fast.factor_cache._entries.values()}
    assert ("Int4Factors" if cache_dtype == torch.int4 else "Int8Factors") in kinds


def test_packed_kernel_serves_a_prinmix_whole_delta_like_its_merged_checkpoint(llama, prinmix_whole, tmp_path):
    """The CPU default ("auto" → the packed C++ kernel when it builds): a PrinMix whole delta (linears and the
    compressed embedding / lm_head rows, all read from the packed codes) batched with other methods' tenants
    (left to the reference) and the base gives each merged checkpoint's logits and greedy tokens (float32 model:
    within float32 summation order, 1e-4); no factor is cached."""
    if not kernel_available():
        pytest.skip("the packed kernel does not build here (its own tests say why)")
    base, deltas, refs = llama
    path = prinmix_whole
    merged = AutoModelForCausalLM.from_pretrained(api.merge(base, path, tmp_path / "merged")).eval()
    model = MultiTenantModel(base)
    model.add_tenant("prinmix", path)
    model.add_tenant("lowrank", deltas["lowrank"])
    _assert_serves_like(model, {**refs, "prinmix": merged}, ["prinmix", None, "lowrank", "prinmix"],
                        _prompts((6, 11, 5, 8), seed=5))
    linears = [m for m in model.modules.values() if isinstance(m, DeltaLinear)]
    slot = model.registry.slot_of("prinmix")
    assert linears and all(slot in m.packed_table().slots for m in linears if slot in m.tenants)
    assert any(getattr(m, "kernel", False) for m in model.modules.values())          # lm_head rows: the kernel
    assert model.memory()["factor_cache_bytes"] == 0 and len(model.factor_cache) == 0
