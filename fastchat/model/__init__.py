"""Model preparation: the embedded default model (GGUF -> Hugging Face folder) and tiny test models."""
