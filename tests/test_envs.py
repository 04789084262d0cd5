"""envs/prrtquant.yaml (for `snakemake --sdm conda`) agrees with pyproject.toml and with the tested venv.

Every runtime dependency of pyproject.toml has exactly one pin in the conda environment (conda-forge name, or
a pip pin for packages conda-forge lacks), the pin lies in pyproject's range, and it is the version this test
suite runs with (so conda users get what CI tested). Extras (test, slurm) are not part of the job environment:
the SLURM plugin runs in the submitting Snakemake, not inside the rules' conda environment.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
import tomllib

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from conftest import ROOT

ENV_FILE = ROOT / "envs" / "prrtquant.yaml"

# PyPI distribution (canonical name) -> conda-forge package, where they differ
CONDA_NAME = {"snakemake": "snakemake-minimal"}
# on PyPI only: pinned in the environment's pip section
PIP_ONLY = {"rt-utils"}
# conda entries that are not Python distributions of pyproject
NOT_PYPROJECT = {"python", "pip"}


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirements() -> dict[str, Requirement]:
    reqs = [Requirement(r) for r in _pyproject()["project"]["dependencies"]]
    return {canonicalize_name(r.name): r for r in reqs}


def _env_pins() -> tuple[dict[str, str], dict[str, str], list[str]]:
    """(conda name -> version, pip name -> version, problems) from envs/prrtquant.yaml."""
    env = yaml.safe_load(ENV_FILE.read_text())
    conda, pip, problems = {}, {}, []
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            for line in dep.get("pip", []):
                if line.startswith("-"):  # -e .. (the package itself), options
                    continue
                m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s=<>!~,]+)", line.strip())
                if not m:
                    problems.append(f"pip entry not pinned exactly (name==version): {line!r}")
                    continue
                pip[canonicalize_name(m[1])] = m[2]
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*(?:={1,2}\s*([^\s=<>!~,*]+))?", str(dep).strip())
        if not m:
            problems.append(f"conda entry not understood: {dep!r}")
            continue
        name, version = m[1].lower(), m[2]
        if version is None and name != "pip":
            problems.append(f"conda entry not pinned (name=version): {dep!r}")
            continue
        if name in conda:
            problems.append(f"conda entry twice: {name}")
        conda[name] = version
    return conda, pip, problems


def _pin_for(dist: str, conda: dict[str, str], pip: dict[str, str]) -> tuple[str, str | None]:
    if dist in PIP_ONLY:
        return f"pip:{dist}", pip.get(dist)
    name = CONDA_NAME.get(dist, dist)
    return name, conda.get(name)


def test_env_file_is_conda_forge_and_well_formed():
    env = yaml.safe_load(ENV_FILE.read_text())
    assert env["channels"][0] == "conda-forge", env["channels"]
    assert "defaults" not in env["channels"]
    _, _, problems = _env_pins()
    assert not problems, problems


def test_every_dependency_is_pinned_within_pyproject_range():
    conda, pip, _ = _env_pins()
    problems = []
    for dist, req in _requirements().items():
        where, version = _pin_for(dist, conda, pip)
        if version is None:
            problems.append(f"{req.name}: no pin in {ENV_FILE.name} (expected {where})")
        elif not req.specifier.contains(Version(version), prereleases=True):
            problems.append(f"{req.name}: pin {where}={version} outside pyproject's {req.specifier}")
    # and nothing pinned that pyproject does not ask for
    wanted = {CONDA_NAME.get(d, d) for d in _requirements() if d not in PIP_ONLY}
    extra = set(conda) - wanted - NOT_PYPROJECT
    extra_pip = set(pip) - PIP_ONLY
    if extra or extra_pip:
        problems.append(f"pinned in {ENV_FILE.name} but not a dependency in pyproject.toml: "
                        f"{sorted(extra | extra_pip)}")
    assert not problems, "\n".join(problems)


def test_python_pin_within_requires_python():
    conda, _, _ = _env_pins()
    requires = SpecifierSet(_pyproject()["project"]["requires-python"])
    assert "python" in conda, "no python pin"
    assert requires.contains(Version(conda["python"])), (conda["python"], str(requires))
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert Version(running) == Version(conda["python"]), (
        f"tests run on Python {running}, envs pin python={conda['python']}"
    )


def test_pins_equal_the_versions_this_suite_runs_with():
    conda, pip, _ = _env_pins()
    differ = []
    for dist, req in _requirements().items():
        where, pinned = _pin_for(dist, conda, pip)
        if pinned is None:
            continue  # reported by the range test
        try:
            installed = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            pytest.fail(f"{req.name} is not installed in {sys.prefix}")
        if Version(installed) != Version(pinned):
            differ.append(f"{where}: envs pins {pinned}, tests run with {installed}")
    assert not differ, (
        "envs/prrtquant.yaml is not the tested set; update the pins (or the venv):\n" + "\n".join(differ)
    )


def test_pip_constraints_agree_with_the_conda_pins():
    """`make` installs .venv with envs/constraints.txt: the same versions as the conda pins, so CI, `make run`
    and `--sdm conda` users run the same set."""
    constraints = {}
    for line in (ROOT / "envs" / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            constraints[canonicalize_name(name)] = version
    conda, pip, _ = _env_pins()
    differ = []
    for dist, req in _requirements().items():
        where, pinned = _pin_for(dist, conda, pip)
        if constraints.get(dist) != pinned:
            differ.append(f"{req.name}: constraints {constraints.get(dist)}, {where} {pinned}")
    assert not differ, "\n".join(differ)
