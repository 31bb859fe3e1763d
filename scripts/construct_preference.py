"""Build DPO pairs from exploration outputs: the expert rule (ETO's), the self rule (no expert) or step pairs.

    python -m scripts.construct_preference --explore_dir outputs/explore/webshop \\
        --expert_path data/webshop_sft.json --output_path data/webshop_pairs.json --task webshop
    python -m scripts.construct_preference --rule self --explore_dir D --output_path P --task webshop
    python -m scripts.construct_preference --rule step --explore_dir D --expert_path E --output_path P \\
        --task alfworld --controller_address http://127.0.0.1:21001 --model_name M [--rollouts 3]

--explore_dir holds one <id>.json per task as eval_agent writes it (or <id>__s<k>.json per sample with
--samples_per_task K; metrics.json is ignored). Rule `expert` (default, as the original): the expert trajectory
with the same id is compared with each agent sample: the higher reward is chosen and the lower rejected; ties
give no pair. Rule `self`: among a task's K samples, the highest reward is chosen and the lowest rejected, when
they differ by more than --min_reward_gap. Rule `step`: IPR-style step-level pairs, valued by Monte-Carlo
rollouts of the current model through the real env (scripts/pairs/step.py says how). Each rule is a module of
scripts/pairs/ registered with scripts.pairs.rule.PAIR_RULES; `--plugin MODULE` (repeatable) first imports a module
from outside the package that registers more rules (scripts/pairs/rule.py says how).

A pair is {"id", "kind", "rule", "prompt", "chosen", "rejected", ...} where the prompt is the first three turns
(instruction, "OK", task; for step pairs also the expert's first steps), which must be the same on both sides,
and chosen/rejected are the rest, starting at the first gpt turn and ending at the last gpt turn (trailing
observations are never trained on). --task NAME applies the task config's rule for a losing trajectory, as the
original does: WebShop and ScienceWorld keep at most the chosen side's number of rounds (gpt turns) + 5,
ALFWorld keeps it whole (`rejected_extra_rounds` in the config; --rejected_extra_rounds K overrides it).
--max_rejected_turns N caps every rejected trajectory at N gpt turns. Each pair records the cap applied and the
rejected side's full length. Episodes ended by an infrastructure failure (env crash, model server error) or
without any action are skipped and counted. Counts are printed and written to <output>.stats.json beside the
pairs (with the rollouts' env steps and tokens for step pairs); every output is written atomically.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from eval_agent.config import TASK_PATH_ENV, ConfigError, describe_tasks, load_task_config
from eval_agent.run_layout import pair_stats_file
from fastchat.records import RecordError, write_json_atomic
from scripts.pairs.files import load_expert, load_explored
from scripts.pairs.rule import PAIR_RULES, PairInputs


def load_plugins(argv: list[str] | None) -> None:
    """Import the --plugin modules before the parser is built: the rules they register become --rule choices."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--plugin", action="append", default=[])
    for module in p.parse_known_args(argv)[0].plugin:
        PAIR_RULES.load(module)


def main(argv: list[str] | None = None) -> int:
    load_plugins(argv)
    rules = PAIR_RULES.entries()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--explore_dir", required=True, type=Path, help="folder of per-task agent outputs")
    p.add_argument("--expert_path", type=Path, default=None,
                   help="expert SFT file (JSON list with rewards); needed by the " +
                        " and ".join(name for name, rule in rules.items() if rule.needs_expert) + " rules")
    p.add_argument("--output_path", required=True, type=Path)
    p.add_argument("--rule", choices=list(rules), default="expert",
                   help="; ".join(f"{name}: {rule.help}" for name, rule in rules.items()))
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                   help="import MODULE first: an importable module that registers more pair rules (repeatable)")
    p.add_argument("--max_rejected_turns", type=int, default=None,
                   help="keep at most this many gpt turns of the rejected trajectory")
    p.add_argument("--task", default=None,
                   help=f"task name ({describe_tasks()}; more with --task_path): applies its "
                        "rejected-trajectory rule (rejected_extra_rounds)")
    p.add_argument("--task_path", action="append", default=[], metavar="DIR",
                   help=f"also find task configs in DIR (repeatable; before ${TASK_PATH_ENV}'s folders)")
    p.add_argument("--rejected_extra_rounds", type=int, default=None,
                   help="a losing agent trajectory keeps at most the expert's rounds + K (overrides --task's)")
    p.add_argument("--ignore_prompt_mismatch", action="store_true",
                   help="pair tasks whose first three turns differ (the expert's prompt is used)")
    for name, rule in rules.items():
        if rule.add_arguments is not None:
            rule.add_arguments(p.add_argument_group(f"{name} rule ({PAIR_RULES.module_of(name)})"))
    a = p.parse_args(argv)
    rule = rules[a.rule]
    if a.max_rejected_turns is not None and a.max_rejected_turns < 1:
        p.error("--max_rejected_turns must be at least 1")
    if rule.needs_expert and a.expert_path is None:
        p.error(f"--rule {a.rule} needs --expert_path")
    if (problem := rule.check(a)) is not None:
        p.error(problem)
    cfg = None
    if a.task:
        try:
            cfg = load_task_config(a.task, a.task_path)
        except ConfigError as e:
            p.error(str(e))
    extra = a.rejected_extra_rounds if a.rejected_extra_rounds is not None else (
        cfg.rejected_extra_rounds if cfg else None)
    if extra is not None and extra < 0:
        p.error("--rejected_extra_rounds must be >= 0")
    try:
        explored = load_explored(a.explore_dir)
        experts = load_expert(a.expert_path) if a.expert_path else {}
        pairs, counts = rule.build(a, PairInputs(experts, explored, cfg, extra))
    except RecordError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    counts = {"rule": a.rule, "pairs": len(pairs), **counts}
    write_json_atomic(a.output_path, pairs)
    write_json_atomic(pair_stats_file(a.output_path), counts)
    print(rule.report(counts))
    capped = sum(p.get("rejected_rounds_total", 0) > (p.get("rejected_cap_rounds") or 10**9) for p in pairs)
    print(f"{len(pairs)} pairs written to {a.output_path} (rule {a.rule})"
          + (f"; {capped} rejected trajectories cut at the chosen side's rounds + {extra}" if extra is not None
             else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
