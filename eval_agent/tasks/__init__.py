from eval_agent.tasks.base import Task, TaskLoader, shard

__all__ = ["Task", "TaskLoader", "shard"]
