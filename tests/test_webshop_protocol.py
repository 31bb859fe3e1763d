"""WebShop episodes as the original ETO code plays them: the first user turn, actions under WebShop's parse, invalid
actions, and success. Expected values follow the original's rules (Yifan-Song793/ETO eval_agent/envs/webshop_env.py;
princeton-nlp/WebShop web_agent_site/envs/web_agent_text_env.py and engine/engine.py), not our output."""
from __future__ import annotations

import pytest

from eval_agent.config import load_task_config
from eval_agent.envs.webshop_env import WebShopEnv
from eval_agent.prompt import build_messages
from webshop.text_env import shared_shop

CFG = load_task_config("webshop")
TASK = CFG.make_loader().load("test")[0]


def make_env(**options) -> WebShopEnv:
    return CFG.env_class()(TASK, max_steps=CFG.max_steps, **{**CFG.env_options, **options})


def goal():
    return shared_shop().goals[TASK.data["goal_idx"]]


def test_first_user_turn_is_the_search_page_without_prefix():
    env = make_env()
    first = env.reset()
    # WebShop's search page in simple text mode: its visible texts joined by " [SEP] "; ETO uses it as it is
    expected = " [SEP] ".join(["WebShop", "Instruction:", goal()["instruction_text"], "Search"])
    assert first == expected == env.env.observation
    assert first.startswith("WebShop [SEP] Instruction: [SEP] ")
    messages = build_messages(CFG.instruction_text(), CFG.icl_messages(), first, CFG.icl_num)
    assert messages[-1] == {"role": "user", "content": expected}


def open_target(env: WebShopEnv) -> str:
    env.reset()
    env.step(f"Action: search[{goal()['name']}]")
    return env.step(f"Action: click[{goal()['asin']}]")[0]


def test_search_from_an_item_page_goes_to_results():
    env = make_env()
    item = open_target(env)
    assert "Buy Now" in item
    obs, reward, done, info = env.step("Thought: try another query.\nAction: search[women sweater]")
    assert info["valid_format"] and info["outcome"] == "ran" and reward == 0 and not done
    assert obs.startswith("Observation:\nInstruction: [SEP] ")
    assert "[SEP] Back to Search [SEP] Page 1 (Total results: 50) [SEP] Next > [SEP] " in obs


@pytest.mark.parametrize("action", ["click[B000NOTHERE]",  # not on the page
                                    "click[Next >]",  # a results-page button, not on an item page
                                    "buy it",  # no name[argument]
                                    "Search[women sweater]",  # names are case-sensitive
                                    "click [Buy Now]",  # a space before '[' is part of the name
                                    "search[]"])  # '(.+)' needs a character
def test_invalid_action_returns_the_unchanged_page(action):
    env = make_env()
    item = open_target(env)
    obs, reward, done, info = env.step(f"Action: {action}")
    assert obs == item and obs.startswith("Observation:\nInstruction: [SEP] ")  # nothing added
    assert reward == 0 and not done and not env.state.finished and info["valid_format"]
    assert info["outcome"] == "rejected"  # the shop's verdict, though the page says nothing


def test_lenient_actions_option_adds_our_message_and_loose_parse():
    env = make_env(lenient_actions=True)
    item = open_target(env)
    obs, reward, done, _ = env.step("Action: click[B000NOTHERE]")
    assert obs == "Observation:\nInvalid action: there is no 'b000nothere' to click on this page.\n" + \
        item.removeprefix("Observation:\n")
    assert reward == 0 and not done
    obs = env.step("Action: Search [women sweater]")[0]
    assert "Page 1 (Total results: 50)" in obs and "Invalid" not in obs


def test_any_purchase_is_a_success_and_its_reward_is_the_score():
    g = next(x for x in shared_shop().goals[:200] if len(x["goal_options"]) == 2)
    task = next(t for t in CFG.make_loader().load("test") if t.data["goal_idx"] == shared_shop().goals.index(g))
    env = CFG.env_class()(task, max_steps=CFG.max_steps, **CFG.env_options)
    env.reset()
    env.step(f"Action: search[{g['name']}]")
    env.step(f"Action: click[{g['asin']}]")
    obs, reward, done, _ = env.step("Action: click[Buy Now]")  # the target, no option chosen
    # WebShop's get_reward for the target: type 1, all attributes, 0 of 2 options, price met
    n = len(g["attributes"]) + 2 + 1
    assert reward == pytest.approx((n - 2) / n) and reward < 1
    assert done and env.state.success and env.state.terminate_reason == "success"
    assert env.state.reward == reward and obs.endswith(f"{reward:.4f}")
