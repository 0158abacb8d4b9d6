"""Issue 19: every subcommand takes its flags, positionals and a.b=c overrides in any order."""

from __future__ import annotations

import itertools
import json

import pytest

from speed_ray.cli import build_parser, main


def _parse(argv: list[str]) -> dict:
    ns = vars(build_parser().parse_args(argv))
    ns.pop("fn")
    return ns


# command -> (the leading positionals, in order; flags with their values; overrides; expected namespace)
CASES = {
    "run": (["configs/tiny.yaml"], [["--stages", "topics,brainstorm"], ["--force", "topics"]],
            ["teacher.judge_temperature=0.7", "pipeline.seed=3"],
            {"config": "configs/tiny.yaml", "stages": "topics,brainstorm", "force": "topics"}),
    "status": (["RUN_DIR"], [["--config", "configs/tiny.yaml"], ["--run", "r1"], ["--json"]],
               ["teacher.judge_temperature=0.7", "pipeline.seed=3"],
               {"run_dir": "RUN_DIR", "config": "configs/tiny.yaml", "run": "r1", "json": True}),
    "evaluate": (["offline:minilm"], [["--config", "c.yaml"], ["--local-tasks", "a.yaml,b.yaml"], ["--limit", "5"],
                                      ["--out", "o"]],
                 ["evaluate.instructions=false", "evaluate.batch_size=8"],
                 {"model": "offline:minilm", "config": "c.yaml", "local_tasks": "a.yaml,b.yaml", "limit": 5,
                  "out": "o", "tasks": None, "benchmark": None}),
    "sweep": (["configs/tiny.yaml"], [["-v"]], ["sweep.points=2", "pipeline.seed=3"],
              {"config": "configs/tiny.yaml"}),
    "influence": (["configs/tiny.yaml"], [["--verbose"]], ["influence.repeats=2", "pipeline.seed=3"],
                  {"config": "configs/tiny.yaml"}),
    "serve": (["offline:minilm"], [["--config", "c.yaml"], ["--port", "9000"], ["--allow-unauthenticated-public"]],
              ["serve.batch_size=4", "serve.route_prefix=/x"],
              {"model": "offline:minilm", "config": "c.yaml", "port": 9000, "host": None,
               "allow_unauthenticated_public": True}),
    # Commands without overrides: their flags still go anywhere.
    "models": (["prepare"], [["--only", "minilm"]], [], {"action": "prepare", "only": "minilm"}),
    "report": (["RUN_DIR"], [["--run", "r1"]], [], {"run_dir": "RUN_DIR", "run": "r1"}),
    "llm-server": (["offline:smollm2"], [["--engine", "vllm"], ["--port", "9001"]], [],
                   {"model": "offline:smollm2", "engine": "vllm", "port": 9001, "host": "127.0.0.1"}),
}


def _orders(positionals: list[str], flags: list[list[str]], overrides: list[str]):
    """Flags before, between and after the positionals and overrides (the positionals and overrides keep
    their order, as overrides apply left to right)."""
    words = positionals + overrides
    for perm in itertools.permutations(range(len(flags))):
        for cuts in itertools.combinations_with_replacement(range(len(words) + 1), len(flags)):
            argv, at = [], 0
            for fi, cut in zip(perm, cuts):
                argv += words[at:cut] + flags[fi]
                at = cut
            yield argv + words[at:]


@pytest.mark.parametrize("command", sorted(CASES))
def test_flags_and_overrides_in_any_order(command):
    positionals, flags, overrides, expected = CASES[command]
    seen = 0
    for argv in _orders(positionals, flags, overrides):
        ns = _parse([command, *argv])
        assert ns["command"] == command
        for key, value in expected.items():
            assert ns[key] == value, (argv, key, ns)
        if overrides:
            assert ns["overrides"] == overrides, (argv, ns)
        assert ns["verbose"] == any(f[0] in ("-v", "--verbose") for f in flags), (argv, ns)
        seen += 1
    assert seen > len(flags) * (len(positionals) + len(overrides))   # before, between and after


def test_issue_example_status_override_after_flag():
    ns = _parse(["status", "RUN_DIR", "--config", "configs/tiny.yaml", "teacher.judge_temperature=0.7"])
    assert ns["run_dir"] == "RUN_DIR" and ns["config"] == "configs/tiny.yaml"
    assert ns["overrides"] == ["teacher.judge_temperature=0.7"]


def test_issue_example_reaches_the_config(tmp_path, monkeypatch, capsys):
    """End to end through main(): the override after --config is applied to the config status compares with."""
    import speed_ray.driver as driver

    loaded = []
    real = driver.load_config

    def spy(path, overrides=None):
        loaded.append(real(path, overrides))
        return loaded[-1]

    monkeypatch.setattr(driver, "load_config", spy)
    argv = ["status", str(tmp_path), "--config", "configs/tiny.yaml", "teacher.judge_temperature=0.7", "--run", "r",
            "--json", "teacher.judge_temperature=0.5"]
    assert main(argv[:5]) == 1                       # no runs in an empty dir, but the arguments parse
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["r"]
    assert loaded[-1].teacher.judge_temperature == 0.5     # both overrides, applied left to right
    assert main(argv[:-1]) == 0 and loaded[-1].teacher.judge_temperature == 0.7


def test_compare_paths_around_flags():
    ns = _parse(["compare", "runs/a", "--out", "o", "runs/b", "runs/c"])
    assert ns["paths"] == ["runs/a", "runs/b", "runs/c"] and ns["out"] == "o"
    assert _parse(["compare", "--out", "o", "runs/a", "--", "-odd-name"])["paths"] == ["runs/a", "-odd-name"]


@pytest.mark.parametrize("argv, named", [
    (["status", "RUN_DIR", "--config", "configs/tiny.yaml", "oops"], ["oops"]),
    (["status", "RUN_DIR", "--json", "--bogus", "a.b=1", "stray"], ["--bogus", "stray"]),
    (["run", "configs/tiny.yaml", "--stages", "topics", "--bogus=1"], ["--bogus=1"]),
    (["evaluate", "m", "--limit", "3", "=1"], ["=1"]),
    (["report", "RUN_DIR", "--run", "r", "a.b=1"], ["a.b=1"]),          # report takes no overrides
    (["models", "prepare", "x"], ["x"]),
    (["llm-server", "m", "--engine", "hf", "extra"], ["extra"]),
    (["compare", "a", "--out", "o", "--nope"], ["--nope"]),
])
def test_bad_tokens_get_a_clear_error(argv, named, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"speed-ray {argv[0]}: error: unrecognized argument"), err
    for tok in named:
        assert tok in line.split(": ", 2)[-1].split(), (tok, line)
    if argv[0] not in ("report", "models", "llm-server", "compare"):
        assert "a.b=value" in line


def test_bad_token_through_main_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["status", "RUN_DIR", "--config", "configs/tiny.yaml", "teacher.judge_temperature"])
    assert e.value.code == 2
    assert "unrecognized argument: teacher.judge_temperature" in capsys.readouterr().err
