"""A real headless Debian chromium plays the WebShop site; the done page shows the text env's reward."""
import sys

import pytest

from eval_agent.paths import webshop_data_dir
from tests.conftest import free_port, http_process
from webshop.oracle import load_query_map, oracle_plan
from webshop.text_env import WebShopTextEnv, shared_shop

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def site():
    port = free_port()
    with http_process([sys.executable, "-m", "webshop.app", "--port", str(port)], f"http://127.0.0.1:{port}",
                      probe="/goal/0") as url:
        yield url


def wait_for_next_page(driver, old_page) -> None:
    """Every action is a form post: wait until the old page is gone and the new one is there."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 30).until(EC.staleness_of(old_page))
    WebDriverWait(driver, 30).until(EC.presence_of_element_located((By.ID, "page")))
    # #page exists while the new document still loads; its nodes are final only once loading completes (under
    # load, reading a button before that failed with "Node with given id does not belong to the document")
    WebDriverWait(driver, 30).until(lambda d: d.execute_script("return document.readyState") == "complete")


def click(driver, label):
    from selenium.webdriver.common.by import By

    page = driver.find_element(By.ID, "page")
    buttons = [b for b in page.find_elements(By.CSS_SELECTOR, "button") if b.text.strip() == label]
    assert buttons, f"no button {label!r} on the page"
    buttons[0].click()
    wait_for_next_page(driver, page)


def test_browser_purchase_matches_text_env(site, browser):
    from selenium.webdriver.common.by import By

    shop = shared_shop()
    idx = next(i for i, g in enumerate(shop.goals) if len(g["goal_options"]) == 2)
    plan = oracle_plan(shop, shop.goals[idx], load_query_map(webshop_data_dir() / "goal_query_map.json"))
    actions = [a for _, a in plan]
    # a non-trivial path: look at the features, go back, and leave out the last option (reward < 1)
    actions = actions[:-2] + ["click[Features]", "click[< Prev]", "click[Buy Now]"]

    env = WebShopTextEnv(shop=shop)
    env.reset(options={"goal_idx": idx})
    for a in actions:
        obs, text_reward, done, _, info = env.step(a)
        assert info["valid"], info["message"]
    assert done and 0 < text_reward < 1

    browser.get(f"{site}/goal/{idx}")
    assert shop.goals[idx]["instruction_text"] in browser.find_element(By.ID, "page").text
    for a in actions:
        kind, arg = a.split("[", 1)
        arg = arg[:-1]
        if kind == "search":
            page = browser.find_element(By.ID, "page")
            box = browser.find_element(By.ID, "search-input")
            box.send_keys(arg)
            browser.find_element(By.ID, "search-button").click()
            wait_for_next_page(browser, page)
            assert "Page 1 (Total results:" in browser.find_element(By.ID, "page").text
        else:
            click(browser, arg)
        assert not browser.find_elements(By.ID, "message")
    shown = browser.find_element(By.ID, "reward").text
    assert browser.find_element(By.ID, "page").get_attribute("data-page") == "done"
    assert float(shown) == pytest.approx(text_reward, abs=5e-5)
