"""An agent behind any OpenAI-compatible chat endpoint (OpenAI, our fastchat.serve.openai_api_server, vLLM).

The key and base URL come from the agent config's `api_key` / `base_url` when
set, else from OPENAI_API_KEY / OPENAI_BASE_URL. The official client retries
connection errors, 429 and 5xx with exponential backoff (`max_retries`).
"""
from __future__ import annotations

import os
from typing import Any

import openai

from eval_agent.agents.base import Agent, ContextOverflowError, ModelError
from fastchat.constants import ErrorCode

_OVERFLOW_HINTS = ("context_length_exceeded", "maximum context length", "context length", "too many tokens")


class OpenAIAgent(Agent):
    def __init__(self, model_name: str, api_key: str | None = None, base_url: str | None = None,
                 timeout: float = 300.0, max_retries: int = 5, **common: Any):
        super().__init__(model_name, **common)
        api_key = api_key or os.environ.get("OPENAI_API_KEY")
        base_url = base_url or os.environ.get("OPENAI_BASE_URL")
        if not api_key:
            if not base_url:
                raise ModelError("openai agent: set OPENAI_API_KEY (and OPENAI_BASE_URL for a local server)")
            api_key = "EMPTY"  # local OpenAI-compatible servers accept any key
        self.client = openai.OpenAI(api_key=api_key, base_url=base_url, timeout=float(timeout),
                                    max_retries=int(max_retries))

    def __call__(self, messages: list[dict[str, str]]) -> str:
        try:
            response = self.client.chat.completions.create(
                model=self.model_name, messages=messages, temperature=self.temperature, top_p=self.top_p,
                max_tokens=self.max_new_tokens, stop=self.stop,
            )
        except openai.BadRequestError as e:
            if is_context_overflow(e):
                raise ContextOverflowError(str(e)) from e
            raise ModelError(f"bad request: {e}") from e
        except openai.OpenAIError as e:
            raise ModelError(f"{type(e).__name__}: {e}") from e
        if not response.choices:
            raise ModelError("the server returned no choices")
        if response.usage is not None:
            self.report_usage(response.usage.prompt_tokens, response.usage.completion_tokens)
        return (response.choices[0].message.content or "").strip()

    def close(self) -> None:
        self.client.close()


def is_context_overflow(error: openai.APIStatusError) -> bool:
    if str(getattr(error, "code", "")) in ("context_length_exceeded", str(ErrorCode.CONTEXT_OVERFLOW)):
        return True
    message = str(error).lower()
    return any(hint in message for hint in _OVERFLOW_HINTS)
