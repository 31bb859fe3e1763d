"""FastChat-compatible serving (controller, model workers, OpenAI API) and the SFT/DPO trainers."""

__version__ = "0.1.0"
