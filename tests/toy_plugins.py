"""Pipeline parts registered from outside the package, as a user's own module would (tests/test_registries.py):
a pair rule `toy` and a serving backend `toy`. Importing this module registers them.

The pair builder runs in its own process and imports this module by name there (the pipeline passes
`--plugin tests.toy_plugins`, as for any rule that is not built in); the toy backend's worker is a module of its own
(tests/toy_worker.py) that the services start.
"""
from __future__ import annotations

from fastchat.records import PROMPT_TURNS, pair_record, trajectory
from scripts.pairs.rule import PAIR_RULES, PairRule
from scripts.pipeline.backends import SERVING_BACKENDS, ServingBackend


def first_vs_last(a, inputs) -> tuple[list[dict], dict]:
    """Rule `toy`: a task's first sample chosen over its last (a stand-in: the plumbing is what is tested)."""
    pairs = []
    for key, samples in inputs.explored.items():
        usable = [rec for rec, _ in samples if rec is not None]
        if len(usable) > 1:
            first, last = usable[0], usable[-1]
            pairs.append(pair_record(key, "trajectory", first["conversations"][:PROMPT_TURNS],
                                     trajectory(first["conversations"]), trajectory(last["conversations"]),
                                     rule="toy", tag=a.toy_tag))
    return pairs, {"tasks": len(inputs.explored), "single": len(inputs.explored) - len(pairs)}


def add_arguments(group) -> None:
    group.add_argument("--toy_tag", default="", help="written into every pair")


TOY_RULE = PAIR_RULES.register(PairRule(
    "toy", "a task's first sample vs its last (a test's rule)", first_vs_last, needs_expert=False,
    add_arguments=add_arguments,
    # a value from the pipeline's settings, to see it arrive
    pipeline_flags=lambda settings: ["--toy_tag", f"gap {settings.min_reward_gap}"]), __name__)

# the settings as the worker's flags: the reply names the batch size and the tensor-parallel size it was given
TOY_BACKEND = SERVING_BACKENDS.register(ServingBackend(
    "toy", "tests.toy_worker",
    lambda batch_size, options: ["--reply", f"fixed reply (batch {batch_size}, tp "
                                            f"{options.get('tensor_parallel_size', 1)})"]), __name__)
