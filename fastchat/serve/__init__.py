"""FastChat-compatible serving: controller, model workers (transformers with continuous batching, vLLM),
an OpenAI-compatible API server and a command-line chat."""
