"""Compress a fleet of fine-tunes, one Ray task per fine-tune: `prinmix compress-many MANIFEST` (cli/fleet.py).

MANIFEST: JSONL (one object per line) or CSV (a header line), one fine-tune per line, with the fields
    base, finetuned (a checkpoint or a PEFT LoRA adapter directory), output, ratio, method
and optionally any other `prinmix compress` option (calib, nsamples, seqlen, bits, fmax, device,
batch_size, distill_steps, offload). Every line is validated before anything runs (ManifestError
naming the file, the line and the problem).

Execution: `ray.init()` on this machine, or `address` for a running cluster; each compression is a
Ray task asking for `num_cpus` CPUs and `num_gpus` GPUs. The driver waits for tasks as they finish,
prints one progress line each, and resubmits a failed task (an exception in it, or a lost worker) up to
`retries` more times, printing one line per failure; the other tasks go on. Ray's own retries are
off (max_retries=0) so that every failure is counted and reported here.

Outputs: a local path, or any fsspec URL (s3://, gs://, memory://, file://…). A task compresses into a
local file first — the output itself, or a staging file named after the job under `staging` for
URLs — then uploads it to a temporary name beside the output and renames it (a single put for object
stores, which publish whole objects only). Resumable as compress is: an output that already exists is
skipped, and a rerun continues a staged or partial compression from its last finished layer.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import fsspec

from . import api
from .calibration.data import iter_jsonl_objects
from .errors import PrinmixError

__all__ = ["FleetJob", "JobOutcome", "ManifestError", "compress_arguments", "read_manifest", "run_fleet"]

REQUIRED = ("base", "finetuned", "output", "ratio", "method")
OPTIONS = {"calib": str, "nsamples": int, "seqlen": int, "bits": str, "fmax": int, "device": str,
           "batch_size": int, "distill_steps": int, "offload": str}


class ManifestError(PrinmixError):
    """A compress-many manifest line is malformed."""


@dataclass(frozen=True)
class FleetJob:
    """One line of the manifest: where it came from and the arguments of its compression."""

    where: str                    # "manifest.jsonl:3"
    base: str
    finetuned: str
    output: str
    ratio: str
    method: str
    options: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        """A stable name for the job's staging file (same arguments → same name → resumable)."""
        text = json.dumps([self.base, self.finetuned, self.output, self.ratio, self.method, self.options],
                          sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class JobOutcome:
    job: FleetJob
    ok: bool
    attempts: int
    seconds: float = 0.0
    skipped: bool = False
    error: str | None = None


def _records(path: Path):
    """(line number, {field: value}) of a JSONL or CSV manifest."""
    if path.suffix.lower() != ".csv":
        yield from iter_jsonl_objects(path)
        return
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: cannot read the manifest ({getattr(e, 'strerror', None) or e})") from None
    for number, row in enumerate(csv.DictReader(text.splitlines()), start=2):
        yield number, {k.strip(): v.strip() for k, v in row.items() if k and v not in (None, "")}


def read_manifest(path) -> list[FleetJob]:
    """The manifest's jobs, every line validated (ManifestError naming file:line and the problem)."""
    path = Path(path)
    jobs, outputs = [], {}
    for number, record in _records(path):
        where = f"{path}:{number}"
        missing = [k for k in REQUIRED if not record.get(k)]
        if missing:
            raise ManifestError(f"{where}: missing {', '.join(missing)}")
        unknown = sorted(set(record) - set(REQUIRED) - set(OPTIONS))
        if unknown:
            raise ManifestError(f"{where}: unknown field(s) {', '.join(unknown)} (known: "
                                f"{', '.join(REQUIRED + tuple(OPTIONS))})")
        options = {}
        for name, kind in OPTIONS.items():
            if name in record:
                try:
                    options[name] = kind(record[name])
                except ValueError:
                    raise ManifestError(f"{where}: {name} = {record[name]!r} is not {kind.__name__}") from None
        if "bits" in options:                                 # compress's `widths`, as the CLI's --bits
            try:
                options["widths"] = tuple(int(b) for b in options.pop("bits").split(","))
            except ValueError:
                raise ManifestError(f"{where}: bits = {record['bits']!r}: expected integers such as 0,2,3,4,8") from None
        output = str(record["output"])
        if output in outputs:
            raise ManifestError(f"{where}: output {output} is also line {outputs[output]}'s")
        outputs[output] = number
        jobs.append(FleetJob(where, str(record["base"]), str(record["finetuned"]), output, str(record["ratio"]),
                             str(record["method"]), options))
    if not jobs:
        raise ManifestError(f"{path}: no jobs")
    return jobs


def _is_url(output: str) -> bool:
    return "://" in output


def _exists(output: str) -> bool:
    if not _is_url(output):
        return Path(output).is_file()
    fs, remote = fsspec.core.url_to_fs(output)
    return fs.exists(remote)


def _upload(local: Path, output: str) -> None:
    """Copy `local` to the fsspec URL `output` under a temporary name, then rename it into place."""
    fs, remote = fsspec.core.url_to_fs(output)
    parent = remote.rsplit("/", 1)[0] if "/" in remote else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    partial = f"{remote}.partial-{uuid.uuid4().hex[:8]}"
    fs.put_file(str(local), partial)
    fs.mv(partial, remote)


CALIBRATION_FIELDS = ("calib", "nsamples", "seqlen", "batch_size", "offload")
CONFIG_FIELDS = ("widths", "fmax")


def compress_arguments(options: dict) -> dict:
    """A manifest line's options as api.compress's keyword arguments: calibration fields into a
    CalibrationConfig, widths/fmax into a PrinMixConfig (each with its defaults otherwise), device and
    distill_steps as they are."""
    out = {k: v for k, v in options.items() if k not in CALIBRATION_FIELDS + CONFIG_FIELDS}
    calibration = {k: v for k, v in options.items() if k in CALIBRATION_FIELDS}
    if calibration:
        out["calibration"] = api.CalibrationConfig(**calibration)
    config = {k: v for k, v in options.items() if k in CONFIG_FIELDS}
    if config:
        out["config"] = api.PrinMixConfig(**config)
    return out


def compress_job(job: FleetJob, staging: str) -> dict:
    """Run one job (in a Ray worker): skip when its output exists, else compress (resumable) and upload.
    Returns {"skipped": bool, "seconds": float}; raises what compress raises."""
    t0 = time.time()
    if _exists(job.output):
        return {"skipped": True, "seconds": 0.0}
    local = Path(staging) / f"{job.key}.delta" if _is_url(job.output) else Path(job.output)
    local.parent.mkdir(parents=True, exist_ok=True)
    if not local.is_file():
        api.compress(job.base, job.finetuned, local, ratio=job.ratio, method=job.method, **compress_arguments(job.options))
    if _is_url(job.output):
        _upload(local, job.output)
        local.unlink()
    return {"skipped": False, "seconds": time.time() - t0}


def _error_line(exc: BaseException) -> str:
    """One line for a task's failure: the original exception's message (Ray wraps it)."""
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0] if text else ''}"


def run_fleet(jobs: list[FleetJob], address: str | None = None, num_cpus: float = 1, num_gpus: float = 0,
              retries: int = 2, staging: str | None = None, init_kwargs: dict | None = None,
              log=None) -> list[JobOutcome]:
    """Run every job as a Ray task (see module docstring); returns one JobOutcome per job, in order.

    log: callable(str) for progress and failure lines (default: print to stderr).
    """
    try:
        import ray
    except ImportError:
        raise PrinmixError("compress-many runs on Ray: pip install 'prinmix[fleet]'") from None
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    staging = staging or os.path.join(os.path.expanduser("~"), ".cache", "prinmix", "fleet-staging")
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, **(init_kwargs or {}))
    task = ray.remote(compress_job).options(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=0)
    outcomes = [JobOutcome(job, ok=False, attempts=0) for job in jobs]
    pending = {}

    def submit(i: int) -> None:
        outcomes[i].attempts += 1
        pending[task.remote(jobs[i], staging)] = i

    try:
        for i in range(len(jobs)):
            submit(i)
        done = 0
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(ready[0])
            outcome = outcomes[i]
            try:
                result = ray.get(ready[0])
            except Exception as exc:                       # noqa: BLE001 - any task failure is reported
                outcome.error = _error_line(exc)
                final = outcome.attempts > retries
                log(f"failed {jobs[i].where} -> {jobs[i].output} (attempt {outcome.attempts}/{retries + 1}): "
                    f"{outcome.error}{'' if final else '; retrying'}")
                if not final:
                    submit(i)
                    continue
            else:
                outcome.ok, outcome.error = True, None
                outcome.skipped, outcome.seconds = result["skipped"], result["seconds"]
            done += 1
            state = "skipped (exists)" if outcome.skipped else ("ok" if outcome.ok else "FAILED")
            log(f"[{done}/{len(jobs)}] {state} {jobs[i].output}"
                + (f" in {outcome.seconds:.1f} s" if outcome.ok and not outcome.skipped else ""))
    finally:
        if started_here:
            ray.shutdown()
    return outcomes

