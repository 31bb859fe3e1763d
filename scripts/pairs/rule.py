"""What a pair rule is, and the registry of them that the pair builder (scripts/construct_preference.py) and the
pipeline's pairs stage (scripts/pipeline/stages.py) ask.

One module per rule under scripts/pairs/ (expert.py, self.py, step.py), each ending with its registration:

    PAIR_RULES.register(PairRule("expert", "expert vs each agent sample", build, ...), __name__)

The registry imports every module of scripts/pairs/ when first asked, so a new rule is a new module there (and its
tests); nothing else changes: `--rule` offers it, the pair builder adds its flags, the pipeline passes it the
values of `pipeline_flags` and serves the current model to it when it is `served`.

A rule from a module outside the package (a test module, a user's own) registers the same way, from an importable
module. The pair builder runs in its own process, so the module travels by name: `python -m
scripts.construct_preference --plugin MODULE ...` imports MODULE before reading `--rule`, and the pipeline's pairs
stage adds `--plugin <the module that registered the rule>` for any rule that is not built in. The module must be
importable from the repository root, where every stage runs (tests/toy_plugins.py registers one).
"""
from __future__ import annotations

import argparse
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from scripts.registry import Registry


@dataclass(frozen=True)
class PairInputs:
    """What every rule builds from, loaded and checked by the pair builder."""
    experts: dict  # {task id: (record, where)} (scripts.pairs.files.load_expert; {} without --expert_path)
    explored: dict  # {task id: [(record or None, where) per sample]} (scripts.pairs.files.load_explored)
    task: Any  # --task's config (eval_agent.config.TaskConfig), or None
    rejected_extra_rounds: int | None  # a losing trajectory keeps the chosen side's rounds + this (None: whole)


def counts_line(counts: dict) -> str:
    """The default report of a rule's counts: "tie 2, single 1, ..."."""
    return ", ".join(f"{k} {v}" for k, v in counts.items() if k not in ("rule", "pairs"))


@dataclass(frozen=True)
class PairRule:
    name: str
    help: str  # one line of --rule's help
    build: Callable[[argparse.Namespace, PairInputs], tuple[list[dict], dict]]  # the builder's flags -> (pairs, counts)
    needs_expert: bool = True  # --expert_path is required
    add_arguments: Callable[[Any], None] | None = None  # the rule's own flags, added to an argument group
    check: Callable[[argparse.Namespace], str | None] = lambda args: None  # what is wrong with the flags, or None
    report: Callable[[dict], str] = counts_line  # the line printed with the counts
    # the pipeline's side: the rule's flags from the pipeline's settings, and whether it plays the current model
    # (the pipeline then serves it and adds --controller_address and --model_name)
    pipeline_flags: Callable[[Any], list[str]] = lambda settings: []
    served: bool = False


def _rule_modules() -> list[str]:
    return [f"{__package__}.{m.name}" for m in pkgutil.iter_modules([str(Path(__file__).parent)])]


PAIR_RULES: Registry[PairRule] = Registry("pair rule", _rule_modules)
