"""Agent evaluation and exploration: environments, task loaders, prompts and the episode driver."""
