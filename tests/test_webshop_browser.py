"""A real headless Debian chromium plays the WebShop site; the done page shows the text env's reward."""
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from webshop.oracle import load_query_map, oracle_plan
from webshop.text_env import WebShopTextEnv, shared_shop
from eval_agent.paths import webshop_data_dir

pytestmark = pytest.mark.slow
CHROMEDRIVER = "/usr/bin/chromedriver"


def ensure_chromium():
    if shutil.which("chromium") and os.path.exists(CHROMEDRIVER):
        return
    if os.geteuid() != 0:
        pytest.fail("Debian chromium is missing: run `apt-get install -y chromium chromium-driver` as root")
    subprocess.run(["apt-get", "install", "-y", "-qq", "chromium", "chromium-driver"], check=True, timeout=600,
                   stdout=subprocess.DEVNULL, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def site():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "webshop.app", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(url + "/goal/0", timeout=2)
                break
            except OSError:
                assert proc.poll() is None, "webshop.app exited"
                time.sleep(0.25)
        else:
            pytest.fail("webshop.app did not answer within 30 s")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    ensure_chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def wait_for_next_page(driver, old_page) -> None:
    """Every action is a form post: wait until the old page is gone and the new one is there."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 30).until(EC.staleness_of(old_page))
    WebDriverWait(driver, 30).until(EC.presence_of_element_located((By.ID, "page")))


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
