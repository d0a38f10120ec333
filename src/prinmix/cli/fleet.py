"""`prinmix compress-many`: the parser, and a command that runs prinmix.fleet and prints one line per failure.

The command imports the fleet runner inside its body (the CLI's lazy-loading exception: no torch for --help).
"""

from __future__ import annotations


def cmd_compress_many(a) -> int:
    from ..fleet import read_manifest, run_fleet

    jobs = read_manifest(a.manifest)
    outcomes = run_fleet(jobs, address=a.address, num_cpus=a.num_cpus, num_gpus=a.num_gpus, retries=a.retries,
                         staging=a.staging)
    failed = [o for o in outcomes if not o.ok]
    print(f"{len(outcomes) - len(failed)} of {len(outcomes)} compressed"
          f"{f', {len(failed)} failed:' if failed else ''}")
    for o in failed:
        print(f"FAILED {o.job.where} -> {o.job.output} after {o.attempts} attempt(s): {o.error}")
    return 1 if failed else 0


def add_compress_many_parser(sub) -> None:
    """The `prinmix compress-many` subcommand, on the CLI's subparsers object."""
    p = sub.add_parser("compress-many", help="compress every fine-tune of a JSONL/CSV manifest as Ray tasks")
    p.add_argument("manifest", help="JSONL or CSV: base, finetuned, output, ratio, method [, compress options]")
    p.add_argument("--address", default=None, help="Ray cluster address (default: start Ray on this machine)")
    p.add_argument("--num-cpus", type=float, default=1, help="CPUs per compression task")
    p.add_argument("--num-gpus", type=float, default=0, help="GPUs per compression task")
    p.add_argument("--retries", type=int, default=2, help="resubmit a failed task up to this many times")
    p.add_argument("--staging", default=None,
                   help="local directory for deltas bound for fsspec URLs (default ~/.cache/prinmix/fleet-staging)")
    p.set_defaults(fn=cmd_compress_many)
