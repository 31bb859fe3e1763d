"""The suite runs with the versions of requirements.lock: a different install fails here, naming each package, so
a green run always means "green with the pinned versions". People who upgrade on purpose set
ETO_ALLOW_UNPINNED=1 (`python -m scripts.deps upgrade` does, in its scratch environment)."""
from __future__ import annotations

import os

import pytest

from scripts import deps


@pytest.mark.skipif(os.environ.get(deps.OPT_OUT) == "1", reason=f"{deps.OPT_OUT}=1: versions not compared")
def test_installed_versions_equal_the_lock():
    diff = deps.differences()
    assert not diff, ("installed versions differ from requirements.lock (`python -m scripts.deps install` installs "
                      "the lock's):\n" + "\n".join(diff))


def test_the_check_names_each_difference():
    changed = {**deps.read_lock(), "transformers": "0.0.1", "no-such-package-here": "1.0"}
    diff = deps.differences(changed)
    assert any(line.startswith("transformers: ") and "lock: 0.0.1" in line for line in diff)
    assert "no-such-package-here: not installed (lock: 1.0)" in diff


def test_the_lock_covers_every_requirement():
    """Each requirements.txt entry (and the packages setup.sh adds) is pinned: nothing resolves freely."""
    from packaging.requirements import Requirement

    pins = deps.read_lock()
    lines = [line.split("#", 1)[0].strip() for line in deps.REQUIREMENTS.read_text().splitlines()]
    names = [Requirement(line).name for line in lines if line]
    missing = [n for n in [*names, *deps.NO_DEPS, *deps.EXTRA, *deps.BUILD] if deps.normalize(n) not in pins]
    assert not missing, f"requirements.lock lacks {missing}: regenerate it with `python -m scripts.deps freeze`"


def test_a_cuda_torch_is_never_pinned(tmp_path, monkeypatch):
    """GPU machines keep their own torch build: pip never gets a torch-family constraint, and the check leaves a
    CUDA build's version alone while it still compares a CPU build's."""
    text = deps.pip_constraints(tmp_path).read_text()
    assert "transformers==" in text
    assert not any(deps.TORCH_FAMILY.match(line.split("==")[0]) for line in text.splitlines())
    pins = {"torch": "2.13.0+cpu"}
    for build, differs in (("2.99.0+cu128", False), ("2.99.0+cpu", True), ("2.13.0+cpu", False)):
        monkeypatch.setattr(deps, "installed_version", lambda name, build=build: build)
        assert bool(deps.differences(pins)) is differs, build
