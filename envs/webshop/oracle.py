"""An expert that knows the goal: it searches with a query that finds the target product, pages to it, opens it,
picks the goal's options and buys. Its thoughts are short templates that state what it does and why.

    steps = oracle_plan(shop, goal, query_map)   # [(thought, action), ...]
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from webshop.engine import NEXT, RESULTS_PER_PAGE, WebShop
from webshop.reward import fuzzy_score

MAX_TITLE_WORDS = 12
_OPTIONS_RE = re.compile(r"\s+with\s+[^,:]+:\s.*$")
_PRICE_RE = re.compile(r",?\s*and price lower than [\d.]+ dollars\s*$")
_LEAD_RE = re.compile(r"^(find me|i need|i want|i am looking for|i'm looking for|looking for)\s+")


def load_query_map(path: str | Path | None) -> dict[str, list[str]]:
    if path is None or not Path(path).exists():
        return {}
    return json.loads(Path(path).read_text(encoding="utf-8"))


def candidate_queries(goal: dict[str, Any], query_map: dict[str, list[str]]) -> list[str]:
    """Queries people typed for this instruction, then the instruction without options and price, then the
    target's title."""
    text = goal["instruction_text"]
    base = _LEAD_RE.sub("", _OPTIONS_RE.sub("", _PRICE_RE.sub("", text)).strip().lower())
    title = " ".join(goal["name"].split()[:MAX_TITLE_WORDS]).lower()
    queries = list(query_map.get(text, [])) + list(query_map.get(base, [])) + [base, title]
    seen, out = set(), []
    for q in queries:
        if q and q not in seen:
            seen.add(q)
            out.append(q)
    return out


def choose_options(product: dict[str, Any], goal_options: dict[str, str] | list[str]) -> list[tuple[str, str]]:
    """(option name, value) to click, in the page's order."""
    if isinstance(goal_options, dict):
        return [(n, goal_options[n]) for n in product["options"]
                if n in goal_options and goal_options[n] in product["options"][n]]
    chosen = {}
    for wanted in goal_options:  # human goals list values only: take the closest value of any option
        best = max(((fuzzy_score(v, wanted), n, v) for n, vs in product["options"].items() for v in vs),
                   default=None)
        if best and best[0] > 85 and best[1] not in chosen:
            chosen[best[1]] = best[2]
    return [(n, chosen[n]) for n in product["options"] if n in chosen]


def oracle_plan(shop: WebShop, goal: dict[str, Any], query_map: dict[str, list[str]],
                max_pages: int = 5) -> list[tuple[str, str]] | None:
    """The expert's (thought, action) steps for `goal`, or None when no query finds the target."""
    asin = goal["asin"]
    for query in candidate_queries(goal, query_map):
        results = shop.search_engine.search(query)
        if asin in results and results.index(asin) < max_pages * RESULTS_PER_PAGE:
            page = results.index(asin) // RESULTS_PER_PAGE + 1
            break
    else:
        return None
    product = shop.catalog[asin]
    short_title = " ".join(product["Title"].split()[:8])
    steps = [("I should search for the product the instruction describes.", f"search[{query}]")]
    for _ in range(page - 1):
        steps.append(("No result on this page fits the request, so I'll look at the next page.", f"click[{NEXT}]"))
    steps.append((f"{asin} ({short_title}) matches the request, so I'll open it.", f"click[{asin}]"))
    for name, value in choose_options(product, goal["goal_options"]):
        steps.append((f"The instruction asks for {name} '{value}', so I'll select it.", f"click[{value}]"))
    price_ok = shop.catalog.prices[asin] <= goal["price_upper"]
    reason = "The requested options are selected" if product["options"] else "This item fits the request"
    if goal["price_upper"] < 1000000:
        reason += " and the price is within the budget" if price_ok else ", though the price is over the budget"
    steps.append((f"{reason}, so I'll buy it.", "click[Buy Now]"))
    return steps
