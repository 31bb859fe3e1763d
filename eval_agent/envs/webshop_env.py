"""WebShop for eval_agent: BaseEnv over webshop.WebShopTextEnv.

As in ETO's WebShopEnv: the first observation is the search page's text as it is (simple [SEP] text mode unless
env_options sets observation_mode: text_rich), later ones are "Observation:\n" + the page. An invalid action
leaves the page unchanged and adds nothing (env option `lenient_actions: true`, ours: accept `Search [x]`-style
spellings and say why an action was refused). Reward is the purchase score; as in the original, any purchase
ends the episode as a success (metrics count reward 1.0 as solved).
"""
from __future__ import annotations

from eval_agent.envs.base import ACTION_PATTERN_WITH_SPACE, BaseEnv
from eval_agent.paths import webshop_data_dir
from webshop.text_env import WebShopTextEnv, shared_shop

OBSERVATION_PREFIX = "Observation:\n"


class WebShopEnv(BaseEnv):
    action_pattern = ACTION_PATTERN_WITH_SPACE  # the original's pattern for this env

    def __init__(self, task, max_steps: int, data_dir: str | None = None, observation_mode: str = "text",
                 lenient_actions: bool = False, **env_options):
        super().__init__(task, max_steps, **env_options)
        shop = shared_shop(data_dir or str(webshop_data_dir()))
        self.env = WebShopTextEnv(shop=shop, observation_mode=observation_mode, lenient_actions=lenient_actions)

    def _reset(self) -> str:
        observation, _ = self.env.reset(options={"goal_idx": int(self.task.data["goal_idx"])})
        return observation  # the original uses the page as the task text, without the prefix

    def _act(self, action: str) -> tuple[str, float, bool, bool]:
        observation, reward, done, _, info = self.env.step(action)
        self._last_valid = info["valid"]
        return OBSERVATION_PREFIX + observation, reward, done, done  # the original: any purchase is a success

    def action_rejected(self, observation: str) -> bool:
        return not self._last_valid  # the shop's own verdict: no such button, no keywords, not an action
