"""The `speed-ray` command: the same code paths as the jobs under jobs/."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import re
import sys

# Errors a user can fix: printed as one line, exit 2, no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (FileNotFoundError, PermissionError)


def _user_errors() -> tuple[type[BaseException], ...]:
    from speed_ray.config import ConfigError
    from speed_ray.errors import DataError
    from speed_ray.models.offline import ModelNotFound

    return USER_ERRORS + (ConfigError, ModelNotFound, DataError)


def _split_overrides(args: argparse.Namespace) -> None:
    from speed_ray.config import check_overrides

    args.overrides = check_overrides(getattr(args, "overrides", None))


def _csv(text: str | None) -> list[str] | None:
    return [s.strip() for s in text.split(",") if s.strip()] if text else None


def cmd_run(args: argparse.Namespace) -> int:
    from speed_ray.driver import run_from_config

    _split_overrides(args)
    run_from_config(args.config, args.overrides, stages=_csv(args.stages), force=_csv(args.force))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from speed_ray.driver import status_main

    _split_overrides(args)
    return status_main(args)


def cmd_models(args: argparse.Namespace) -> int:
    from speed_ray.models import offline

    if args.action != "prepare":
        raise ValueError(f"unknown models action {args.action!r}")
    fns = {"smollm2": offline.prepare_smollm2, "minilm": offline.minilm_path, "tiny-llama": offline.prepare_tiny_llama,
           "tiny-bert": offline.prepare_tiny_bert}
    names = _csv(args.only) or list(fns)
    out = {}
    for n in names:
        if n not in fns:
            from speed_ray.models.offline import ModelNotFound

            raise ModelNotFound(f"unknown offline model {n!r}; known: {', '.join(fns)}")
        out[f"offline:{n}"] = str(fns[n]())
        print(f"offline:{n} -> {out[f'offline:{n}']}")
    print(json.dumps(out))
    return 0


def _lazy(target: str):
    def run(args: argparse.Namespace) -> int:
        _split_overrides(args)
        mod, _, fn = target.partition(":")
        return getattr(importlib.import_module(mod), fn)(args) or 0

    return run


# An `a.b=value` override: a key that does not start with '-', then '='.
_OVERRIDE = re.compile(r"[^-=\s][^=\s]*=")


class Parser(argparse.ArgumentParser):
    """The top-level parser: each subcommand takes its flags, positionals and a.b=c overrides in any order.

    argparse fills a subcommand's positionals from the first run of them only, so in
    `status RUN_DIR --config c.yaml x.y=1` the override after the flag is left over. `parse_args` parses what
    it knows and gives the leftovers to the subcommand's trailing list (`overrides`, or `paths` for compare);
    anything else (an unknown flag, a stray word) is an error naming every such token.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.trailing: dict[str, tuple[argparse.ArgumentParser, str | None, bool]] = {}

    def add_command(self, sub, name: str, *, trailing: str | None = None, overrides: bool = True, **kwargs):
        """A subcommand whose leftover positionals go to `trailing` (a.b=c overrides only, unless not
        `overrides`)."""
        sp = sub.add_parser(name, parents=[_common()], **kwargs)
        self.trailing[name] = (sp, trailing, overrides)
        return sp

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        ns, extras = self.parse_known_args(args, namespace)
        if not extras:
            return ns
        sp, dest, overrides_only = self.trailing.get(getattr(ns, "command", None) or "", (self, None, True))
        bad: list[str] = []
        after_dashes = False
        for tok in extras:
            if tok == "--" and not after_dashes:
                after_dashes = True
                continue
            fits = (_OVERRIDE.match(tok) is not None) if overrides_only else (after_dashes or not tok.startswith("-"))
            if dest and fits:
                setattr(ns, dest, [*(getattr(ns, dest, None) or []), tok])
            else:
                bad.append(tok)
        if bad:
            hint = " (overrides look like a.b=value)" if dest and overrides_only else ""
            sp.error(f"unrecognized argument{'s' if len(bad) > 1 else ''}: {' '.join(bad)}{hint}")
        return ns


def _common() -> argparse.ArgumentParser:
    """Flags every subcommand also takes after its name (`speed-ray run c.yaml -v`)."""
    c = argparse.ArgumentParser(add_help=False)
    c.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    return c


def build_parser() -> Parser:
    p = Parser(prog="speed-ray", description="SPEED on Ray: synthesize embedding data with aligned "
               "small LLMs, train and evaluate embedders. Each command takes its flags, arguments and a.b=value "
               "overrides in any order.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    r = p.add_command(sub, "run", trailing="overrides", help="run a config's stages (skipping finished ones)")
    r.add_argument("config", help="YAML run config, e.g. configs/tiny.yaml")
    r.add_argument("overrides", nargs="*", help="a.b=value overrides")
    r.add_argument("--stages", help="comma-separated stages to run (default: all of the variant)")
    r.add_argument("--force", help="comma-separated stages to re-run from scratch even if done, with the stages "
                   "downstream of them (their previous "
                   "output is moved to RUN_DIR/replaced/, not deleted)")
    r.set_defaults(fn=cmd_run)

    s = p.add_command(sub, "status", trailing="overrides",
                      help="stages, row counts, costs and what is stale in a run directory")
    s.add_argument("run_dir", help="the run directory (local path or fsspec URL)")
    s.add_argument("--config", help="compare against this config (default: the run's saved config)")
    s.add_argument("--run", help="run name inside run_dir (default: every run)")
    s.add_argument("overrides", nargs="*", help="a.b=value overrides for --config")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.add_argument("--watch", action="store_true", help="show each stage's progress (done of total, valid share, "
                   "rejects, tokens, cost, rate, ETA), refreshed until the run finishes or Ctrl-C")
    s.add_argument("--interval", type=float, default=5.0, help="seconds between --watch refreshes (default 5)")
    s.set_defaults(fn=cmd_status)

    m = p.add_command(sub, "models", help="prepare the offline demo models")
    m.add_argument("action", choices=["prepare"])
    m.add_argument("--only", help="comma-separated: smollm2, minilm, tiny-llama")
    m.set_defaults(fn=cmd_models)

    e = p.add_command(sub, "evaluate", trailing="overrides",
                      help="evaluate a model or a run's embedder on MTEB or local tasks")
    e.add_argument("model", help="model path, hub id, offline:minilm, or a run directory")
    e.add_argument("--config", help="YAML config whose `evaluate` section is used")
    e.add_argument("--tasks", help="comma-separated mteb task names")
    e.add_argument("--local-tasks", help="comma-separated local task YAML files")
    e.add_argument("--benchmark", help='named mteb benchmark, e.g. "MTEB(eng, v2)"')
    e.add_argument("--out", help="directory for results (default: beside the model or ./eval-results)")
    e.add_argument("--limit", type=int, help="at most this many examples per task (smoke tests)")
    e.add_argument("overrides", nargs="*", help="a.b=value overrides for --config")
    e.set_defaults(fn=_lazy("speed_ray.evaluate.cli:evaluate_main"))

    c = p.add_command(sub, "compare", trailing="paths", overrides=False,
                      help="several runs or results side by side, per task and per category")
    c.add_argument("paths", nargs="+", help="run directories or results.json files")
    c.add_argument("--out", help="write compare.md / compare.json here")
    c.set_defaults(fn=_lazy("speed_ray.evaluate.cli:compare_main"), overrides=[])

    rp = p.add_command(sub, "report", help="write the run report (markdown + PNG, and one self-contained HTML "
                       "page) for a run directory")
    rp.add_argument("run_dir")
    rp.add_argument("--run", help="run name inside run_dir (default: all)")
    rp.set_defaults(fn=_lazy("speed_ray.studies.report:report_main"), overrides=[])

    sw = p.add_command(sub, "sweep", trailing="overrides",
                       help="the scaling-law sweep (or an alignment-factor grid) from a config")
    sw.add_argument("config")
    sw.add_argument("overrides", nargs="*")
    sw.set_defaults(fn=_lazy("speed_ray.studies.sweep:sweep_main"))

    inf = p.add_command(sub, "influence", trailing="overrides",
                        help="the synthetic-data category influence study from a config")
    inf.add_argument("config")
    inf.add_argument("overrides", nargs="*")
    inf.set_defaults(fn=_lazy("speed_ray.studies.influence_job:influence_main"))

    sv = p.add_command(sub, "serve", trailing="overrides",
                       help="serve an embedder with an OpenAI-compatible /v1/embeddings on Ray Serve")
    sv.add_argument("model", help="model path, hub id, offline:minilm, or a run directory")
    sv.add_argument("--config", help="YAML config whose `serve` section is used")
    sv.add_argument("--host")
    sv.add_argument("--port", type=int)
    sv.add_argument("--allow-unauthenticated-public", action="store_true",
                    help="bind a non-loopback host with no token configured")
    sv.add_argument("overrides", nargs="*")
    sv.set_defaults(fn=_lazy("speed_ray.serve.cli:serve_main"))

    from speed_ray.embedder.cli import add_parser as add_train_embedder

    add_train_embedder(p, sub)

    ls = p.add_command(sub, "llm-server",
                       help="serve an LLM with an OpenAI-compatible /v1/chat/completions (Ray Serve)")
    ls.add_argument("model", help="model path, hub id or offline:smollm2")
    ls.add_argument("--engine", choices=["hf", "vllm"], default="hf")
    ls.add_argument("--host", default="127.0.0.1")
    ls.add_argument("--port", type=int, default=8011)
    ls.set_defaults(fn=_lazy("speed_ray.generate.server:server_main"), overrides=[])
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.verbose:     # Ray's own operator progress bars, execution plans and INFO logs (speed_ray/raylocal.py)
        import os

        os.environ["SPEED_RAY_VERBOSE"] = "1"
    try:
        return int(args.fn(args) or 0)
    except KeyboardInterrupt:
        print("speed-ray: interrupted; finished work is kept, rerun to resume", file=sys.stderr)
        return 130
    except Exception as e:
        if isinstance(e, _user_errors()):
            print(f"speed-ray: error: {e}", file=sys.stderr)
            return 2
        from speed_ray.stage import StageError

        if isinstance(e, StageError):
            first = str(e).splitlines()
            print(f"speed-ray: error: {first[0]}", file=sys.stderr)
            if args.verbose:
                print("\n".join(first[1:]), file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
