"""Catalog loading (mirror documents and WebShop's raw release format) and goal generation."""
import itertools
import json
import random

import pytest

from webshop.catalog import CatalogError, load_catalog, load_raw
from webshop.goals import GOAL_SEED, NO_PRICE_BOUND, PRICE_STEPS, build_goals
from webshop.text_env import shared_shop


@pytest.fixture(scope="module")
def shop():
    return shared_shop()


def test_documents_catalog_has_loaded_fields(shop):
    cat = shop.catalog
    assert len(cat) == 1000 and len(cat.contents) == 1000
    p = next(p for p in cat.products if len(p["pricing"]) == 2)
    assert p["Price"] == f"${p['pricing'][0]} to ${p['pricing'][1]}"
    assert p["pricing"][0] <= cat.prices[p["asin"]] <= p["pricing"][1]
    assert sum("instruction_text" in p for p in cat.products) == 415
    assert all(p["Attributes"] for p in cat.products)  # empty attributes become WebShop's DUMMY_ATTR


def test_synthetic_goals_cover_every_option_combination(shop):
    goals, cat = shop.goals, shop.catalog
    expected = sum(len(list(itertools.product(*p["options"].values())))
                   for p in cat.products if p.get("instruction_text"))
    assert len(goals) == expected == 6910
    g = goals[0]
    for key in ("instruction_text", "attributes", "goal_options", "price_upper", "asin", "category", "query",
                "name", "product_category"):
        assert key in g
    for g in goals[:300]:
        price = cat.prices[g["asin"]]
        if g["price_upper"] < 1000000:
            assert g["price_upper"] in PRICE_STEPS and g["price_upper"] > price
            assert g["instruction_text"].endswith(f"price lower than {g['price_upper']:.2f} dollars")
        for name, value in g["goal_options"].items():
            assert value in cat[g["asin"]]["options"][name]
            assert f"{name}: {value}" in g["instruction_text"]


def test_goal_order_is_fixed_by_seed(shop):
    again = build_goals(shop.catalog)
    assert GOAL_SEED == 233
    assert [g["instruction_text"] for g in again] == [g["instruction_text"] for g in shop.goals]
    assert [g["goal_idx"] for g in again] == list(range(len(again)))


def webshop_shuffle(goals: list) -> list:
    """WebShop's step after building every goal: random.seed(233); random.shuffle(goals), on the global generator."""
    saved = random.getstate()
    try:
        random.seed(233)
        random.shuffle(goals)
    finally:
        random.setstate(saved)
    return goals


def price_text(goal) -> str:
    upper = goal["price_upper"]
    return f", and price lower than {upper:.2f} dollars" if upper < NO_PRICE_BOUND else ""


def test_goal_i_is_webshops_synthetic_goal_i(shop):
    # WebShop's unshuffled list: products in catalog order, each product's option combinations in
    # itertools.product order over the sorted option names
    unshuffled = []
    for p in shop.catalog.products:
        if not p.get("instruction_text"):
            continue
        names = sorted(p["options"])
        for values in itertools.product(*(p["options"][n] for n in names)):
            options = dict(zip(names, values))
            listed = ", and ".join(f"{k}: {v}" for k, v in options.items())
            unshuffled.append((p["asin"], p["instruction_text"] + (f" with {listed}" if listed else ""), options))
    expected = webshop_shuffle(unshuffled)
    assert len(shop.goals) == len(expected)
    bounds = {}
    for goal, (asin, text, options) in zip(shop.goals, expected):
        wanted = (asin, text + price_text(goal), options)
        assert (goal["asin"], goal["instruction_text"], goal["goal_options"]) == wanted
        bounds.setdefault(asin, set()).add(goal["price_upper"])
    assert all(len(b) == 1 for b in bounds.values())  # one bound per product, shared by its combinations


def test_goal_i_is_webshops_human_goal_i(tmp_path):
    asins = [f"B0HUMAN{i:03d}" for i in range(4)]
    raw = [{"asin": a, "name": f"Product {a}", "pricing": f"${10 + 7 * i}.00", "product_category": "A › B",
            "category": "c", "query": "q"} for i, a in enumerate(asins)]
    human = {a: [{"instruction": f"i want {a} number {k}.", "instruction_attributes": ["soft"] if k != 1 else [],
                  "instruction_options": [f"size {k}"]} for k in range(3)] for a in asins}
    (tmp_path / "items.json").write_text(json.dumps(raw))
    (tmp_path / "attrs.json").write_text(json.dumps({a: {"attributes": ["soft"]} for a in asins}))
    (tmp_path / "human.json").write_text(json.dumps(human))
    goals = build_goals(load_raw(tmp_path / "items.json", tmp_path / "attrs.json", tmp_path / "human.json"))
    # products in file order, each one's instructions in order, those without attributes skipped
    unshuffled = [(a, ins["instruction"].strip("."), ins["instruction_options"])
                  for a in asins for ins in human[a] if ins["instruction_attributes"]]
    expected = webshop_shuffle(unshuffled)
    assert len(goals) == 8
    for goal, (asin, text, options) in zip(goals, expected):
        wanted = (asin, text + price_text(goal), options)
        assert (goal["asin"], goal["instruction_text"], goal["goal_options"]) == wanted


def test_human_goals_need_the_raw_human_file(shop):
    with pytest.raises(ValueError, match="items_human_ins.json"):
        build_goals(shop.catalog, human=True)


def test_raw_release_format_loads_and_gives_human_goals(tmp_path):
    raw = [{"asin": "B0RAW00001", "name": "Cozy Wool Beanie Hat", "full_description": "A warm hat.",
            "small_description": "Hand wash only", "pricing": "$12.50 - $18.00", "images": ["http://x/1.jpg"],
            "product_category": "Clothing › Accessories › Hats", "category": "fashion", "query": "Beanies ",
            "customization_options": {"Color": [{"value": "Navy/White", "image": None}, {"value": "Red"}]}},
           {"asin": "B0RAW00001", "name": "duplicate", "pricing": ""},
           {"asin": "nan", "name": "no asin"}]
    (tmp_path / "items.json").write_text(json.dumps(raw))
    (tmp_path / "attrs.json").write_text(json.dumps({"B0RAW00001": {"attributes": ["hand wash"]}}))
    (tmp_path / "human.json").write_text(json.dumps({"B0RAW00001": [
        {"instruction": "i want a navy beanie.", "instruction_attributes": ["hand wash"],
         "instruction_options": ["navy | white"]},
        {"instruction": "no attributes", "instruction_attributes": [], "instruction_options": []}]}))
    cat = load_raw(tmp_path / "items.json", tmp_path / "attrs.json", tmp_path / "human.json")
    assert len(cat) == 1
    p = cat["B0RAW00001"]
    assert p["pricing"] == [12.5, 18.0] and p["Price"] == "$12.5 to $18.0"
    assert p["options"] == {"color": ["navy | white", "red"]} and p["BulletPoints"] == ["Hand wash only"]
    assert p["query"] == "beanies"
    goals = build_goals(cat)
    assert len(goals) == 1 and goals[0]["goal_options"] == ["navy | white"]
    assert goals[0]["instruction_text"].startswith("i want a navy beanie")


def test_bad_files_name_the_file(tmp_path):
    (tmp_path / "documents_1k.jsonl").write_text('{"id": "x", "product": {"asin": "x"}}\n')
    with pytest.raises(CatalogError, match=r"documents_1k.jsonl:1: product lacks field"):
        load_catalog(tmp_path)
    with pytest.raises(CatalogError, match="no WebShop catalog"):
        load_catalog(tmp_path / "empty")
