"""Shopping goals: what the shopper is asked to buy.

A goal holds the instruction text, the target attributes and options, a price upper bound and the target product's
asin / category / query / name / product_category (read by the type score of the reward).

- Synthetic goals (WebShop's `human_goals=False`): one per product that has a synthetic instruction and per
  combination of its option values; instruction = "<instruction> with <name>: <value>, and ... , and price lower
  than X dollars". Options are a dict {name: value}.
- Human goals (when the raw `items_human_ins.json` is loaded): one per human instruction with attributes; options
  are the list of values the worker picked.

As WebShop does, a price bound is drawn from the multiples of 10 just above the product's price (once per
synthetic product, shared by its option combinations; once per human instruction), and only once the whole list is
built is it shuffled by a fresh seed-233 generator (WebShop: `random.seed(233); random.shuffle(goals)`). The order
therefore depends on nothing but the unshuffled list, so goal index i is WebShop's goal i, and ETO's index files
address the same human goals when the full data is present. WebShop drew the bounds from its unseeded global
generator, so no seed reproduces its bounds; ours come from a generator of their own with a fixed seed, which keeps
them reproducible and out of the shuffle's way.
"""
from __future__ import annotations

import itertools
import random
from collections import defaultdict
from typing import Any

from webshop.catalog import Catalog

GOAL_SEED = 233  # WebShop's shuffle seed
PRICE_BOUND_SEED = 233  # ours; keeps the bounds that earlier versions of this engine drew
PRICE_STEPS = [10.0 * i for i in range(1, 100)]
NO_PRICE_BOUND = 1000000


def _price_bound(rng: random.Random, price: float) -> tuple[float, str]:
    above = [p for p in PRICE_STEPS if p > price][:4]
    if len(above) >= 2:
        _, upper = sorted(rng.sample(above, 2))
        return upper, f", and price lower than {upper:.2f} dollars"
    return NO_PRICE_BOUND, ""


def _target_fields(product: dict[str, Any]) -> dict[str, Any]:
    return {k: product[k] for k in ("asin", "category", "query", "name", "product_category")}


def synthetic_goals(catalog: Catalog, rng: random.Random) -> list[dict[str, Any]]:
    goals = []
    attribute_counts: dict[str, int] = defaultdict(int)
    for product in catalog.products:
        if not product.get("instruction_text"):
            continue
        attributes = product["instruction_attributes"]
        upper, price_text = _price_bound(rng, catalog.prices[product["asin"]])
        names = sorted(product["options"])
        for combination in itertools.product(*(product["options"][n] for n in names)):
            goal_options = dict(zip(names, combination))
            option_text = ", and ".join(f"{k}: {v}" for k, v in goal_options.items())
            option_text = f" with {option_text}" if option_text else ""
            goals.append({
                **_target_fields(product),
                "instruction_text": f"{product['instruction_text']}{option_text}{price_text}",
                "attributes": attributes,
                "price_upper": upper,
                "goal_options": goal_options,
            })
            for a in attributes:
                attribute_counts[a] += 1
    for g in goals:  # rarer attributes weigh more when sampling goals for training
        g["weight"] = sum(1.0 / attribute_counts[a] for a in g["attributes"]) / max(len(g["attributes"]), 1)
    return goals


def human_goals(catalog: Catalog, rng: random.Random) -> list[dict[str, Any]]:
    goals = []
    for product in catalog.products:
        for ins in product.get("instructions", []):
            if not ins.get("instruction_attributes"):
                continue  # WebShop skips human instructions without attributes
            upper, price_text = _price_bound(rng, catalog.prices[product["asin"]])
            goals.append({
                **_target_fields(product),
                "instruction_text": ins["instruction"].strip(".") + price_text,
                "attributes": ins["instruction_attributes"],
                "price_upper": upper,
                "goal_options": ins.get("instruction_options", []),
                "weight": 1,
            })
    return goals


def has_human_goals(catalog: Catalog) -> bool:
    # documents_1k.jsonl carries a few human instructions, but only the raw file holds all of them
    return catalog.human_loaded


def build_goals(catalog: Catalog, human: bool | None = None) -> list[dict[str, Any]]:
    """All goals in WebShop's order. `human=None`: human goals when the catalog carries them, else synthetic."""
    if human is None:
        human = has_human_goals(catalog)
    if human and not has_human_goals(catalog):
        raise ValueError(f"{catalog.source}: human goals need the raw items_human_ins.json, which is not loaded")
    price_rng = random.Random(PRICE_BOUND_SEED)
    goals = human_goals(catalog, price_rng) if human else synthetic_goals(catalog, price_rng)
    random.Random(GOAL_SEED).shuffle(goals)  # same permutation as WebShop's random.seed(233); random.shuffle
    for i, g in enumerate(goals):
        g["goal_idx"] = i
    return goals
