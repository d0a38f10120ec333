"""Settings of a compress run apart from the per-matrix algorithm's (`PrinMixConfig` holds widths/fmax):
how the calibration pass runs (`CalibrationConfig`) and what the run produces (`CompressJob`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..algorithms.budget import parse_ratio
from ..algorithms.compress_matrix import PrinMixConfig
from ..algorithms.methods import METHOD_NAMES, METHODS
from ..errors import BudgetError, PrinmixError
from ..format.output_safety import refuse_input_overlap

__all__ = ["CalibrationConfig", "CompressJob"]

SPLIT_RULES = ("proportional", "measured")   # how the whole budget is shared: pipeline/budget_split.py


@dataclass(frozen=True)
class CalibrationConfig:
    """The calibration pass of the calibrated methods (prinmix, deltacome).

    calib: None/"builtin", a .txt/.jsonl/.parquet file or a Hugging Face dataset name.
    nsamples × seqlen: token windows [nsamples, seqlen]; seed: which windows.
    batch_size: sequences per layer forward. offload: None or a directory for memory-mapped hidden states.
    """

    calib: str | None = None
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    batch_size: int = 8
    offload: str | Path | None = None

    def validate(self) -> None:
        """PrinmixError naming the CLI flag of a non-positive count."""
        for flag, value in (("nsamples", self.nsamples), ("seqlen", self.seqlen), ("batch_size", self.batch_size)):
            if not isinstance(value, int) or value < 1:
                raise PrinmixError(f"--{flag.replace('_', '-')} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class CompressJob:
    """One compress run: FINETUNED against BASE into OUTPUT with `method` at ratio α (validated).

    distill_steps: BitDelta only — Adam steps of scale distillation on the calibration set (0 = off).
    base / finetuned: directories or Hugging Face Hub ids (checkpoint/hub.py); base_revision /
    finetuned_revision: a Hub branch, tag or commit (None: the default branch).
    exact_embeddings: α holds for the decoder linears only and every other tensor that differs is stored
    exactly (the earlier behaviour, for comparison); default False: α holds for the whole delta
    (pipeline/whole_budget.py).
    vocab_share: the embedding / lm_head rows' share of the compressed bits in whole-delta mode, forced
    (for benchmarks comparing splits); None (default): by `split`.
    split: "measured" (default; PrinMix with calibration: the bits that minimise the KL divergence each
    part's compression is measured to cause; proportional otherwise) or "proportional" (one ratio for every
    compressed part); pipeline/budget_split.py.
    """

    base: Path
    finetuned: Path
    output: Path
    alpha: float
    method: str = "prinmix"
    config: PrinMixConfig = field(default_factory=PrinMixConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    distill_steps: int = 0
    base_revision: str | None = None
    finetuned_revision: str | None = None
    exact_embeddings: bool = False
    vocab_share: float | None = None
    split: str = "measured"

    @classmethod
    def create(cls, base, finetuned, output, ratio: str | float = "1/16", method: str = "prinmix",
               config: PrinMixConfig | None = None, calibration: CalibrationConfig | None = None,
               distill_steps: int = 0, base_revision: str | None = None,
               finetuned_revision: str | None = None, exact_embeddings: bool = False,
               vocab_share: float | None = None, split: str = "measured") -> "CompressJob":
        """Validate the user's settings (one-line PrinmixError/BudgetError each) and build the job."""
        if method not in METHODS:
            raise PrinmixError(f"unknown method {method!r}: choose one of {', '.join(METHOD_NAMES)}")
        try:
            alpha = parse_ratio(ratio)
        except ValueError as e:
            raise BudgetError(str(e)) from None
        floor = METHODS[method].min_ratio
        if floor is not None and alpha < floor:
            raise BudgetError(f"{method} stores 1 bit per delta entry (ratio 1/16); ratio {ratio} is below it")
        calibration = calibration or CalibrationConfig()
        calibration.validate()
        if distill_steps < 0:
            raise PrinmixError(f"--distill-steps must be ≥ 0, got {distill_steps}")
        if Path(output).is_dir():
            raise PrinmixError(f"{output}: is a directory; give the delta file's path (e.g. {Path(output) / 'model.delta'})")
        refuse_input_overlap([output], [base, finetuned], "compress")
        config = config or PrinMixConfig()
        try:
            config.validate()
        except ValueError as e:
            raise BudgetError(f"invalid bit-width settings (--bits/--fmax): {e}") from None
        if split not in SPLIT_RULES:
            raise PrinmixError(f"--split {split!r}: choose one of {', '.join(SPLIT_RULES)}")
        if vocab_share is not None and not 0.0 <= vocab_share <= 1.0:
            raise BudgetError(f"vocab_share must lie in [0, 1], got {vocab_share}")
        return cls(Path(base), Path(finetuned), Path(output), alpha, method, config, calibration, distill_steps,
                   base_revision, finetuned_revision, bool(exact_embeddings), vocab_share, split)

    @property
    def calibrated(self) -> bool:
        return METHODS[self.method].calibrated

    def run_params(self, base_hash: str, finetuned_hash: str) -> dict:
        """Everything the result depends on (keys the resume directory: a changed setting starts afresh)."""
        c = self.calibration
        return {"method": self.method, "ratio": self.alpha, "budget": "blob+header", "exact": "base-dtype",
                "config": asdict(self.config), "calib": c.calib, "nsamples": c.nsamples, "seqlen": c.seqlen,
                "seed": c.seed, "base": base_hash, "finetuned": finetuned_hash, "distill_steps": self.distill_steps,
                "whole": not self.exact_embeddings, "vocab_share": self.vocab_share, "split": self.split}
