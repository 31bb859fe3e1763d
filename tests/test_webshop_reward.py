"""WebShop reward on hand-worked cases: each fault lowers the score by the formula."""
import pytest

from webshop.reward import get_reward, normalize_color, option_matches, title_nouns, type_score

SOCKS = {
    "asin": "B000SOCKS1", "name": "Acme Cotton Crew Socks for Men", "Title": "Acme Cotton Crew Socks for Men",
    "query": "men's socks", "product_category": "Clothing, Shoes & Jewelry › Men › Clothing › Socks",
    "Attributes": ["moisture wicking", "cotton spandex"], "BulletPoints": ["Soft and machine wash safe"],
    "Description": "Everyday socks.", "options": {"color": ["black", "white"], "size": ["small", "large"]},
}
# attributes: one found among the product's attributes (fuzzy), one only in its bullet points (substring)
GOAL = {
    "asin": "B000SOCKS1", "name": SOCKS["name"], "query": "men's socks", "product_category": SOCKS["product_category"],
    "attributes": ["moisture wicking", "machine wash"], "goal_options": {"color": "black", "size": "large"},
    "price_upper": 20.0,
}


def reward(product=SOCKS, goal=GOAL, price=15.0, options=None):
    return get_reward(product, goal, price, {"color": "black", "size": "large"} if options is None else options)


def test_full_match_scores_one():
    r, d = reward()
    assert r == 1.0
    assert (d["attribute_matches"], d["option_matches"], d["price_ok"], d["r_type"]) == (2, 2, True, 1.0)


def test_wrong_option_costs_one_of_five():
    r, d = reward(options={"color": "black", "size": "small"})
    assert d["option_matches"] == 1
    assert r == pytest.approx(4 / 5)


def test_missing_options_cost_each():
    assert reward(options={})[0] == pytest.approx(3 / 5)


def test_over_price_costs_one_of_five():
    r, d = reward(price=25.0)
    assert not d["price_ok"]
    assert r == pytest.approx(4 / 5)


def test_missing_attribute_costs_one():
    goal = dict(GOAL, attributes=["moisture wicking", "machine wash", "gluten free"])
    assert reward(goal=goal)[0] == pytest.approx(5 / 6)


def test_wrong_type_halves_when_only_a_fifth_of_title_nouns_match():
    # shares 1 of the 5 target nouns (acme) and neither the query nor 2 category levels -> r_type 0.5
    wallet = dict(SOCKS, name="Acme Leather Wallet", Title="Acme Leather Wallet", query="wallets",
                  product_category="Accessories › Wallets")
    assert title_nouns(GOAL["name"]) == {"acme", "cotton", "crew", "socks", "men"}
    r, d = reward(product=wallet)
    assert d["title_score"] == pytest.approx(0.2) and d["r_type"] == 0.5
    assert r == pytest.approx(0.5)


def test_category_match_keeps_type_but_no_title_overlap_zeroes_it():
    same_category = dict(SOCKS, name="Plain Gloves", Title="Plain Gloves", query="gloves")
    info = type_score(same_category, GOAL)
    assert info["category_match"] and info["title_score"] == 0.0
    assert reward(product=same_category)[0] == 0.0


def test_title_overlap_under_ten_percent_gives_point_one():
    long_goal = dict(GOAL, name=" ".join(f"word{c}" for c in "abcdefghijk") + " socks", query="x",
                     product_category="A › B")
    info = type_score(SOCKS, long_goal)  # 1 shared noun ("socks") of 12
    assert info["title_score"] == pytest.approx(1 / 12) and info["r_type"] == 0.1


def test_colors_are_reduced_to_one_word_before_matching():
    assert normalize_color("jet black | grey") == "black"
    assert option_matches(["jet black | grey"], {"color": "black"}) == 1
    # human goals list values: "navy blue" reduces to "blue", which a plain "navy" does not match
    assert option_matches(["large", "navy"], ["large", "navy blue"]) == 1
    assert option_matches(["x-large"], {"size": "large"}) == 0
