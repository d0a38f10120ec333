"""--offload: calibration hidden states in memory-mapped files give the same delta, and are cleaned up."""

from __future__ import annotations

import torch

from prinmix import api
from prinmix.api import CalibrationConfig
from prinmix.calibration.decoder_stack import DecoderStack
from prinmix.calibration.layer_inputs import run_layer
from prinmix.calibration.offload import HiddenFiles
from prinmix.checkpoint.reader import CheckpointReader
from prinmix.cli import main as cli_main

FAST = dict(calibration=CalibrationConfig(nsamples=4, seqlen=32))


def test_offloaded_compress_is_byte_identical(tiny_pair, tmp_path):
    base, ft = tiny_pair("llama", "fp32")
    plain, offloaded = tmp_path / "plain.delta", tmp_path / "offloaded.delta"
    api.compress(base, ft, plain, **FAST)
    assert cli_main(["compress", str(base), str(ft), "-o", str(offloaded), "--nsamples", "4", "--seqlen", "32",
                     "--offload", str(tmp_path / "hidden")]) == 0
    assert plain.read_bytes() == offloaded.read_bytes()
    assert list((tmp_path / "hidden").iterdir()) == []          # the memory-mapped files are gone


def test_embed_and_run_layer_write_into_given_buffers(tiny_pair, tmp_path):
    reader = CheckpointReader(tiny_pair("llama", "fp32")[1])
    stack = DecoderStack(reader)
    ids = torch.randint(3, 400, (5, 24), generator=torch.Generator().manual_seed(0))
    ref = stack.embed(reader, ids, batch_size=2)
    files = HiddenFiles(tmp_path, (5, 24, stack.config.hidden_size))
    first = files.next()
    inputs = stack.embed(reader, ids, batch_size=2, out=first)
    assert inputs.hidden is first and torch.equal(first, ref.hidden)
    layer = stack.build_layer(0, stack.read_layer_state(reader, 0))
    second = files.next()
    assert second.data_ptr() != first.data_ptr()
    out = run_layer(layer, inputs, batch_size=2, out=second)
    assert out is second and torch.equal(out, run_layer(layer, ref, batch_size=2))
    assert files.next() is first
    paths = list(files.paths)
    assert all(p.exists() for p in paths)
    del inputs, out, first, second
    files.close()
    assert not any(p.exists() for p in paths)


def test_packed_linear_stands_in_for_compressed_linear():
    from prinmix.algorithms.compress_matrix import compress_matrix
    from prinmix.format.resume_part import MappedCompressedLinear

    g = torch.Generator().manual_seed(0)
    delta = torch.randn(48, 4, generator=g) @ torch.randn(4, 40, generator=g)
    m = compress_matrix(delta, None, 1 / 8)
    packed = MappedCompressedLinear(m)
    assert torch.equal(packed.to_blob(), m.to_blob()) and packed.nbytes() == m.nbytes() and packed.shape == (48, 40)
    assert packed._unpacked is None
    assert torch.equal(packed.reconstruct(torch.float32), m.reconstruct(torch.float32))   # unpacks once
    signs = MappedCompressedLinear(compress_matrix(delta, None, 1 / 16, "bitdelta"))
    signs.sign.scale = torch.tensor(0.5, dtype=torch.float16)                             # e.g. distilled scales
    assert signs.to_blob()[1:3].clone().view(torch.float16).item() == 0.5


def test_offload_advice_only_when_hidden_states_crowd_memory():
    from prinmix.calibration.offload import offload_advice

    shape = (128, 2048, 8192)                                  # 70B calibration: 2 × 8.6 GB of float32
    assert "--offload" in offload_advice(shape, available=24 * 2 ** 30)
    assert offload_advice(shape, available=256 * 2 ** 30) is None
    assert offload_advice((8, 64, 64), available=24 * 2 ** 30) is None
