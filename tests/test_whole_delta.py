"""The whole-delta budget: every byte stored for weights (tensor data and their header entries, measured on
the file itself) ≤ α × the 16-bit size of what differs, computed here independently from the two
checkpoints — over random shapes, ratios 1/8 … 1/64, tied and untied embeddings, an enlarged vocabulary;
merge equals reconstruct(); --exact-embeddings keeps the earlier behaviour."""

import json
import math
import shutil
import struct

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from prinmix import api
from prinmix.checkpoint.apply_delta import finetuned_tensor
from prinmix.checkpoint.reader import CheckpointReader
from prinmix.format.delta_file import ratio_within_file


def _random_pair(root, tokenizer_dir, vocab, seed, hidden, inter, tied, added_rows, dtype=torch.float32):
    """A random Llama base and a 'fine-tune' of it: low-rank + noise on every linear, norms nudged, a third of
    the embedding rows changed (all lm_head rows when untied), `added_rows` new tokens."""
    g = torch.Generator().manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                      max_position_embeddings=128)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).to(dtype).eval()
    base, ft = root / "base", root / "finetuned"
    model.save_pretrained(base)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "embed" in n:
                rows = torch.randperm(vocab, generator=g)[: vocab // 3]
                p[rows] += 0.05 * torch.randn(len(rows), hidden, generator=g).to(dtype)
            elif p.ndim == 2:
                u, v = torch.randn(p.shape[0], 3, generator=g), torch.randn(3, p.shape[1], generator=g)
                p += (0.05 * (u @ v) / p.shape[1] ** 0.5 + 0.003 * torch.randn(p.shape, generator=g)).to(dtype)
            else:
                p += (0.02 * torch.randn(p.shape, generator=g)).to(dtype)
        if added_rows:
            model.resize_token_embeddings(vocab + added_rows)
    model.save_pretrained(ft)
    for d in (base, ft):
        for item in tokenizer_dir.iterdir():
            shutil.copy2(item, d / item.name)
    return base, ft


def _what_differs(base, ft) -> int:
    """Entries of what differs: whole linears/norms; rows (changed or added) of vocabulary matrices."""
    b, f = CheckpointReader(base), CheckpointReader(ft)
    vocab = f.config.vocab_size
    n = 0
    for name in f.tensor_names:
        ft_t = f.get(name, dtype=None)
        if name not in b:
            n += ft_t.numel()
            continue
        base_t = b.get(name, dtype=None)
        if ft_t.ndim == 2 and ft_t.shape[0] == vocab:
            k = min(base_t.shape[0], ft_t.shape[0])
            n += (int((base_t[:k] != ft_t[:k]).any(1).sum()) + ft_t.shape[0] - k) * ft_t.shape[1]
        elif not torch.equal(base_t, ft_t):
            n += ft_t.numel()
    return n


def _weight_bytes_on_disk(path) -> int:
    """Bytes of the file that belong to weights: tensor data and header entries of every non-aux tensor, and
    their metadata entries (checksums, shapes, objectives), measured as serialised (string-escaped) JSON."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    meta = json.loads(header["__metadata__"]["prinmix"])
    keys = [k for k in header if k != "__metadata__" and not k.startswith("aux/")]
    data = sum(header[k]["data_offsets"][1] - header[k]["data_offsets"][0] for k in keys)
    entries = sum(len(json.dumps({k: header[k]}, separators=(",", ":"))) - 2 + 1 for k in keys)
    weight_meta = {"checksums": {k: meta["checksums"][k] for k in keys},
                   "matrices": meta["matrices"], "rows": meta["rows"], "vocab": meta.get("vocab", {}),
                   "stats": {"objective": meta["stats"].get("objective", {})}}
    return data + entries + len(json.dumps(json.dumps(weight_meta, sort_keys=True)))


CASES = [  # (seed, hidden, intermediate, tied, added rows, ratio, method)
    (0, 128, 320, True, 0, "1/8", "lowrank"),
    (1, 160, 256, False, 0, "1/16", "lowrank"),
    (2, 128, 384, True, 5, "1/32", "lowrank"),
    (3, 192, 256, False, 3, "1/64", "lowrank"),
    (4, 128, 256, True, 0, "1/16", "prinmix"),
    (5, 128, 256, False, 2, "1/32", "prinmix"),
    (6, 128, 256, False, 0, "1/16", "deltacome"),
]


@pytest.mark.parametrize("seed,hidden,inter,tied,added,ratio,method", CASES)
def test_whole_file_within_budget_and_merge_equals_reconstruct(tiny_models, tmp_path, seed, hidden, inter, tied,
                                                               added, ratio, method):
    vocab = len(tiny_models.tokenizer)
    base, ft = _random_pair(tmp_path, tiny_models.tokenizer_dir, vocab, seed, hidden, inter, tied, added)
    path = tmp_path / "d.delta"
    s = api.compress(base, ft, path, ratio=ratio, method=method, device="cpu",
                     calibration=api.CalibrationConfig(nsamples=4, seqlen=32))
    alpha = s.ratio_requested
    delta = api.load_delta(path)
    assert delta.vocab, "the changed embedding rows are compressed"
    if added:
        name = next(iter(delta.rows))
        assert delta.rows[name][0].numel() == added          # added tokens keep exact rows
    # toy matrices whose header entries exceed a quarter of their budget keep their budget for the blob
    # (ratio_within_file); their header entries are the only bytes allowed beyond α
    exempt = sum(_matrix_header_on_disk(path, n) for n, m in delta.matrices.items()
                 if ratio_within_file(alpha, n, m.shape) == alpha)
    budget = math.floor(alpha * 16 * _what_differs(base, ft)) // 8
    assert s.whole_params == _what_differs(base, ft)
    assert _weight_bytes_on_disk(path) <= budget + exempt
    assert s.weight_bytes["total"] >= _weight_bytes_on_disk(path)     # the reported bound is an upper bound
    # merge writes exactly what reconstruct gives, compressed rows included
    merged = CheckpointReader(api.merge(base, path, tmp_path / "merged"))
    b = CheckpointReader(base)
    for name in list(delta.vocab) + list(delta.matrices)[:2]:
        assert torch.equal(merged.get(name, dtype=None), finetuned_tensor(name, b, delta)), name
    for name, (idx, m, shape) in delta.vocab.items():
        want = b.get(name, dtype=torch.float32)
        rows = merged.get(name, dtype=torch.float32)[idx] - want[idx]
        assert torch.allclose(rows, m.reconstruct(), atol=1e-6), name


def _matrix_header_on_disk(path, name) -> int:
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    key = f"linear/{name}"
    meta = json.loads(header["__metadata__"]["prinmix"])
    part = {"checksums": {key: meta["checksums"][key]}, "matrices": {name: meta["matrices"][name]},
            "stats": {"objective": {name: meta["stats"]["objective"].get(name)}}}
    return len(json.dumps({key: header[key]}, separators=(",", ":"))) + len(json.dumps(json.dumps(part)))


def test_exact_embeddings_keeps_rows_exact(tiny_models, tmp_path):
    vocab = len(tiny_models.tokenizer)
    base, ft = _random_pair(tmp_path, tiny_models.tokenizer_dir, vocab, 7, 128, 256, True, 0)
    whole, exact = tmp_path / "w.delta", tmp_path / "e.delta"
    sw = api.compress(base, ft, whole, ratio="1/16", method="lowrank", device="cpu")
    se = api.compress(base, ft, exact, ratio="1/16", method="lowrank", device="cpu", exact_embeddings=True)
    de = api.load_delta(exact)
    assert not de.vocab and "model.embed_tokens.weight" in de.rows
    assert se.ratio_achieved <= 1 / 16 < se.ratio_whole          # only the linears meet α
    assert sw.ratio_whole < se.ratio_whole and sw.file_bytes < se.file_bytes
    info = api.info(whole)
    assert info.whole_mode and info.ratio_whole == pytest.approx(sw.ratio_whole)
    assert set(info.vocab) == {"model.embed_tokens.weight"}


def test_lora_adapter_input_still_works(tiny_pair, tmp_path):
    """A PEFT LoRA adapter as the fine-tune: only its linears differ; the whole delta is those linears."""
    peft = pytest.importorskip("peft")
    base, _ = tiny_pair("llama")
    model = AutoModelForCausalLM.from_pretrained(str(base))
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False))
    adapter = tmp_path / "adapter"
    lora.save_pretrained(adapter)
    s = api.compress(base, adapter, tmp_path / "l.delta", ratio="1/16", method="lowrank", device="cpu")
    delta = api.load_delta(tmp_path / "l.delta")
    assert not delta.vocab and not delta.rows and not delta.dense
    assert {n.rsplit(".", 2)[-2] for n in delta.matrices} == {"q_proj", "v_proj"}
    assert s.whole_params == sum(m.shape[0] * m.shape[1] for m in delta.matrices.values())
