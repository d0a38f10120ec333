"""compress-many: manifest validation; one job staged and uploaded to an fsspec URL; a local Ray fleet over
tiny pairs with one broken on purpose (the others succeed, the broken one is reported once per attempt and
retried, the exit code is non-zero, a rerun skips what is done)."""

import json

import fsspec
import pytest

from prinmix import api
from prinmix.cli import main
from prinmix.errors import PrinmixError
from prinmix.fleet import FleetJob, ManifestError, compress_arguments, compress_job, read_manifest

FAST = {"nsamples": 2, "seqlen": 32, "device": "cpu"}


def test_manifest_jsonl_csv_and_errors(tmp_path):
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text('{"base": "b", "finetuned": "f", "output": "o1.delta", "ratio": "1/16", "method": "prinmix",'
                     ' "nsamples": "4", "bits": "0,2,4"}\n\n'
                     '{"base": "b", "finetuned": "a", "output": "s3://bucket/o2.delta", "ratio": "1/8", "method": "lowrank"}\n')
    jobs = read_manifest(jsonl)
    assert [j.output for j in jobs] == ["o1.delta", "s3://bucket/o2.delta"]
    assert jobs[0].options == {"nsamples": 4, "widths": (0, 2, 4)} and jobs[1].where.endswith("m.jsonl:3")
    arguments = compress_arguments({**jobs[0].options, "fmax": 2, "device": "cpu", "distill_steps": 3})
    assert arguments["calibration"] == api.CalibrationConfig(nsamples=4)          # the other fields: defaults
    assert arguments["config"] == api.PrinMixConfig(widths=(0, 2, 4), fmax=2)
    assert (arguments["device"], arguments["distill_steps"]) == ("cpu", 3) and compress_arguments({}) == {}
    csv = tmp_path / "m.csv"
    csv.write_text("base,finetuned,output,ratio,method,seqlen\nb,f,o.delta,1/16,deltacome,128\nb,g,p.delta,1/16,prinmix,\n")
    jobs = read_manifest(csv)
    assert jobs[0].options == {"seqlen": 128} and jobs[1].options == {} and jobs[1].where.endswith("m.csv:3")
    for text, message in (('{"base": "b", "output": "o", "ratio": "1", "method": "x"}', r"m\.jsonl:1: missing finetuned"),
                          ('{"base": "b", "finetuned": "f", "output": "o", "ratio": "1", "method": "x", "rank": 3}',
                           "unknown field"),
                          ('{"base": "b", "finetuned": "f", "output": "o", "ratio": "1", "method": "x", "nsamples": "many"}',
                           "nsamples = 'many' is not int"),
                          ("[1, 2]", "expected a JSON object"), ("{oops", "not valid JSON"), ("", "no jobs")):
        jsonl.write_text(text + "\n")
        with pytest.raises(PrinmixError, match=message):
            read_manifest(jsonl)
    line = '{"base": "b", "finetuned": "f", "output": "o", "ratio": "1", "method": "x"}\n'
    jsonl.write_text(line * 2)
    with pytest.raises(ManifestError, match="also line 1"):
        read_manifest(jsonl)


def test_job_to_an_fsspec_url_is_staged_uploaded_and_then_skipped(tiny_pair, tmp_path):
    base, ft = tiny_pair("llama")
    job = FleetJob("m:1", str(base), str(ft), "memory://fleet/llama.delta", "1/8", "lowrank", FAST)
    assert compress_job(job, str(tmp_path / "staging"))["skipped"] is False
    fs = fsspec.filesystem("memory")
    assert fs.ls("/fleet", detail=False) == ["/fleet/llama.delta"]          # no partial upload left behind
    assert not list((tmp_path / "staging").iterdir())                       # the staged copy is removed
    with fs.open("/fleet/llama.delta", "rb") as f, open(tmp_path / "copy.delta", "wb") as out:
        out.write(f.read())
    assert api.load_delta(tmp_path / "copy.delta").method == "lowrank"
    assert compress_job(job, str(tmp_path / "staging"))["skipped"] is True


def test_ray_fleet_with_one_broken_pair(tiny_pair, tmp_path, capsys):
    pytest.importorskip("ray")
    lines = []
    for family, method in (("llama", "prinmix"), ("qwen2", "deltacome"), ("mistral", "lowrank")):
        base, ft = tiny_pair(family)
        output = f"file://{tmp_path}/out/{family}.delta" if family == "mistral" else str(tmp_path / f"{family}.delta")
        lines.append({"base": str(base), "finetuned": str(ft), "output": output, "ratio": "1/8", "method": method,
                      **FAST})
    base, _ = tiny_pair("llama")
    lines.insert(1, {"base": str(base), "finetuned": str(tmp_path / "missing"), "output": str(tmp_path / "broken.delta"),
                     "ratio": "1/8", "method": "prinmix", **FAST})
    manifest = tmp_path / "fleet.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))

    args = ["compress-many", str(manifest), "--retries", "1", "--staging", str(tmp_path / "staging")]
    assert main(args) == 1
    captured = capsys.readouterr()
    failures = [line for line in captured.err.splitlines() if line.startswith("failed ")]
    assert len(failures) == 2 and "fleet.jsonl:2" in failures[0] and "missing" in failures[0]
    assert "(attempt 1/2)" in failures[0] and "retrying" in failures[0] and "(attempt 2/2)" in failures[1]
    assert "[4/4]" in captured.err and "3 of 4 compressed, 1 failed" in captured.out
    assert "FAILED" in captured.out and "broken.delta after 2 attempt(s)" in captured.out
    for family in ("llama", "qwen2"):
        assert api.load_delta(tmp_path / f"{family}.delta").params is not None
    assert api.load_delta(tmp_path / "out" / "mistral.delta").method == "lowrank"
    assert not (tmp_path / "broken.delta").exists()

    assert main(args + ["--retries", "0"]) == 1                              # rerun: the done ones are skipped
    assert capsys.readouterr().err.count("skipped (exists)") == 3
