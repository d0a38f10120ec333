"""The compressor's events: one LayerStarted/LayerDone per layer in order, every phase started and finished
in pairs, one COMPRESS phase per compressed matrix; a resumed run reports its layers as resumed; a custom
per-matrix compressor is what compresses; bad settings fail before any work with one-line errors."""

import pytest
import torch

from prinmix.algorithms.compress_matrix import compress_matrix
from prinmix.errors import BudgetError, PrinmixError
from prinmix.format.delta_file import load_delta
from prinmix.pipeline.compress import run_compress
from prinmix.pipeline.config import CalibrationConfig, CompressJob
from prinmix.pipeline.events import (
    HessiansCaptured,
    LayerDone,
    LayerStarted,
    Phase,
    PhaseDone,
    PhaseStarted,
    progress_listener,
)

FAST = CalibrationConfig(nsamples=4, seqlen=32)


def test_events_of_a_calibrated_run(tiny_pair, tmp_path):
    base, ft = tiny_pair("llama")
    events, calls, progress = [], [], []

    def counting(d, H, ratio, method, cfg):
        calls.append(tuple(d.shape))
        return compress_matrix(d, H, ratio, method, cfg)

    job = CompressJob.create(base, ft, tmp_path / "d.delta", "1/8", "deltacome", calibration=FAST)
    summary = run_compress(job, torch.device("cpu"), listeners=[events.append, progress_listener(
        lambda *a: progress.append(a))], matrix_compressor=counting)
    n = summary.layers
    assert [e.layer for e in events if isinstance(e, LayerStarted)] == list(range(n))
    assert [(e.layer, e.resumed) for e in events if isinstance(e, LayerDone)] == [(i, False) for i in range(n)]
    assert progress == [(i + 1, n, f"layer {i}") for i in range(n)]
    open_phases = []
    for e in events:
        if isinstance(e, PhaseStarted):
            open_phases.append((e.phase, e.layer))
        elif isinstance(e, PhaseDone):
            assert open_phases.pop() == (e.phase, e.layer)
    assert not open_phases
    compressed = [e for e in events if isinstance(e, PhaseDone) and e.phase is Phase.COMPRESS]
    assert [tuple(e.detail["shape"]) for e in compressed] == calls and calls
    delta = load_delta(tmp_path / "d.delta")
    assert sorted(e.detail["matrix"] for e in compressed) == sorted(delta.matrices)
    hessians = [e for e in events if isinstance(e, HessiansCaptured)]
    assert [e.layer for e in hessians] == list(range(n))
    assert all(e.hessians for e in hessians)
    assert sum(isinstance(e, PhaseStarted) and e.phase is Phase.EMBED for e in events) == 1


def test_resumed_layers_are_reported_and_not_recompressed(tiny_pair, tmp_path):
    base, ft = tiny_pair("llama")
    job = CompressJob.create(base, ft, tmp_path / "d.delta", "1/8", "lowrank", calibration=FAST)
    def stop(event):
        if isinstance(event, LayerDone):
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        run_compress(job, torch.device("cpu"), listeners=[stop])
    assert not (tmp_path / "d.delta").exists()
    assert [p.name for p in tmp_path.glob(".d.delta.partial-*/*")] == ["layer_00000.safetensors"]
    events = []
    run_compress(job, torch.device("cpu"), listeners=[events.append])
    done = [e for e in events if isinstance(e, LayerDone)]
    assert done[0].resumed and not any(e.resumed for e in done[1:])
    assert not any(isinstance(e, PhaseStarted) and e.phase is Phase.COMPRESS and e.layer == 0 for e in events)
    assert any(isinstance(e, PhaseStarted) and e.phase is Phase.COMPRESS and e.layer == 1 for e in events)
    assert not list(tmp_path.glob(".d.delta.partial-*"))          # parts removed once the file is written


def test_bad_settings_fail_before_any_work(tiny_pair, tmp_path):
    base, ft = tiny_pair("llama")
    with pytest.raises(PrinmixError, match="unknown method"):
        CompressJob.create(base, ft, tmp_path / "x.delta", method="zip")
    with pytest.raises(BudgetError, match="below it"):
        CompressJob.create(base, ft, tmp_path / "x.delta", "1/32", "bitdelta")
    with pytest.raises(PrinmixError, match="--nsamples must be a positive integer"):
        CompressJob.create(base, ft, tmp_path / "x.delta", calibration=CalibrationConfig(nsamples=0))
    with pytest.raises(PrinmixError, match="is a directory"):
        CompressJob.create(base, ft, tmp_path)
    assert list(tmp_path.iterdir()) == []
