"""WebShop for eval_agent: BaseEnv over webshop.WebShopTextEnv.

Observations are "Observation:\n" + the page text (simple [SEP] text mode unless env_options sets
observation_mode: text_rich). Reward is the purchase score; success means a score of at least the task config's `success_reward` (1.0).
"""  # noqa: E501
from __future__ import annotations

from eval_agent.envs.base import ACTION_PATTERN_WITH_SPACE, BaseEnv
from eval_agent.paths import webshop_data_dir
from webshop.text_env import WebShopTextEnv, shared_shop

OBSERVATION_PREFIX = "Observation:\n"


class WebShopEnv(BaseEnv):
    action_pattern = ACTION_PATTERN_WITH_SPACE  # the original's pattern for this env

    def __init__(self, task, max_steps: int, data_dir: str | None = None, observation_mode: str = "text",
                 **env_options):
        super().__init__(task, max_steps, **env_options)
        shop = shared_shop(data_dir or str(webshop_data_dir()))
        self.env = WebShopTextEnv(shop=shop, observation_mode=observation_mode)

    def _reset(self) -> str:
        observation, _ = self.env.reset(options={"goal_idx": int(self.task.data["goal_idx"])})
        return OBSERVATION_PREFIX + observation

    def _act(self, action: str) -> tuple[str, float, bool, bool]:
        observation, reward, done, _, _ = self.env.step(action)
        return OBSERVATION_PREFIX + observation, reward, done, done and reward >= self.success_reward
