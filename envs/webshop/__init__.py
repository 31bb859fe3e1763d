"""WebShop (Yao et al. 2022) rewritten: catalog, goals, BM25 search, reward, text env and web site.

    from webshop import WebShopTextEnv
    env = WebShopTextEnv()                       # data from $WEBSHOP_DATA or data/webshop
    obs, info = env.reset(options={"goal_idx": 0})
    obs, reward, done, truncated, info = env.step("search[wool socks]")

Entry points: `python -m webshop.build_index` (persist the search index), `python -m webshop.app --port N` (site).
"""
from webshop.engine import WebShop
from webshop.reward import get_reward
from webshop.text_env import WebShopTextEnv, shared_shop

__all__ = ["WebShop", "WebShopTextEnv", "get_reward", "shared_shop"]
