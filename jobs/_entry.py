"""Shared argument parsing for the job entry points: --config, a.b=c overrides, and optional --stages."""

from __future__ import annotations

import argparse
import sys


def job_main(description: str, stages: list[str] | None = None, argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", required=True, help="YAML run config (a path inside the job's working dir)")
    p.add_argument("--stages", help="comma-separated stages (default: every stage of the config's variant)")
    p.add_argument("--force", help="comma-separated stages to re-run even if done")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging and Ray's own progress bars")
    p.add_argument("overrides", nargs="*", help="a.b=value overrides")
    args = p.parse_args(argv)
    cli = ["run", args.config, *args.overrides] + (["-v"] if args.verbose else [])
    chosen = stages or ([s for s in args.stages.split(",") if s] if args.stages else None)
    if chosen:
        cli += ["--stages", ",".join(chosen)]
    if args.force:
        cli += ["--force", args.force]
    from speed_ray.cli import main

    return main(cli)


if __name__ == "__main__":
    sys.exit(job_main("speed-ray job"))
