from eval_agent.envs.base import BaseEnv, State, parse_action

__all__ = ["BaseEnv", "State", "parse_action"]
