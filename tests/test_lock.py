"""The committed locks agree with pyproject.toml's ranges and with the versions README names."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCKS = ("dev.lock", "bench.lock", "peers.lock", "autoround.lock", "gptqmodel.lock")
README_NAMED = ("torch", "transformers", "compressed-tensors", "accelerate", "triton")


def read_lock(name: str) -> dict[str, Version]:
    """``{distribution: version}`` of a pip-compile lock (one ``name==version`` line per distribution)."""
    pins = {}
    for line in (ROOT / "requirements" / name).read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9._-]+)==(\S+)$", line.strip())
        if match:
            pins[match.group(1).lower()] = Version(match.group(2))
    return pins


def project_requirements(*extras: str) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += project["optional-dependencies"][extra]
    return [Requirement(r) for r in reqs]


@pytest.mark.parametrize("lock,extras", [("dev.lock", ("dev",)), ("bench.lock", ("dev", "cnn")), ("peers.lock", ()),
                                         ("autoround.lock", ()), ("gptqmodel.lock", ())])
def test_every_lock_pins_every_requirement_inside_its_range(lock, extras):
    pins = read_lock(lock)
    for req in project_requirements(*extras):
        name = req.name.lower()
        assert name in pins, f"{lock} has no pin for {req}: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), f"{lock} pins {name}=={pins[name]} outside {req}"


def test_torch_is_the_cpu_build_on_this_disk():
    for lock in LOCKS:
        assert str(read_lock(lock)["torch"]) == "2.13.0+cpu", f"{lock}: any other torch is a multi-GB CUDA download"


def test_ranges_are_capped_for_the_fast_movers():
    for req in project_requirements("dev"):
        if req.name in ("transformers", "compressed-tensors", "accelerate"):
            assert any(spec.operator in ("<", "<=") for spec in req.specifier), f"{req}: cap it at the newest tested minor"


def test_readme_names_the_locked_versions():
    readme = (ROOT / "README.md").read_text()
    pins = read_lock("dev.lock")
    for name in README_NAMED:
        assert f"{name} {pins[name]}" in readme, f"README should name {name} {pins[name]} (requirements/dev.lock)"
