"""An OpenAI-compatible API in front of the controller.

    python -m fastchat.serve.openai_api_server --controller-address http://127.0.0.1:21001 \
        [--host 127.0.0.1] [--port 8000] [--api-keys KEY1,KEY2]

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="EMPTY")  # or one of --api-keys
    client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Hi"}])

Chat messages are rendered by the worker with its chat template (the same
fastchat.conversation code the trainers use), and the template's stop strings
and stop token ids are passed along with the request's own stops. A worker
without /worker_render_chat (one of FastChat's own) is asked for its
conversation template instead, rendered as FastChat's get_prompt renders it.
With --api-keys every request must carry `Authorization: Bearer <one of them>`.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import secrets
from typing import AsyncIterator, Callable

import httpx
from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from fastchat.constants import API_PORT, CONTROLLER_PORT, ErrorCode
from fastchat.conversation import fastchat_prompt
from fastchat.serve.hosts import add_listen_args, listen, serve, warn_if_not_loopback
from fastchat.serve.openai_protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    ChatMessage,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    DeltaMessage,
    ErrorResponse,
    ModelCard,
    ModelList,
    UsageInfo,
    response_id,
)

log = logging.getLogger("fastchat.openai_api_server")


class APIError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code

    def response(self) -> JSONResponse:
        return JSONResponse(ErrorResponse(message=str(self), code=self.code).model_dump(), status_code=400)


class InvalidAPIKey(Exception):
    pass


def _stops(*groups) -> list[str]:
    out: list[str] = []
    for g in groups:
        for s in ([g] if isinstance(g, str) else g or []):
            if s and s not in out:
                out.append(s)
    return out


def build_app(controller_address: str, worker_timeout: float = 100.0, api_keys: list[str] | None = None) -> FastAPI:
    async def check_api_key(auth: HTTPAuthorizationCredentials | None = Depends(HTTPBearer(auto_error=False))):
        # compare_digest: how long a wrong key takes to refuse says nothing about the right ones
        if auth is None or not any(secrets.compare_digest(auth.credentials.encode(), k.encode()) for k in api_keys):
            raise InvalidAPIKey()

    app = FastAPI(title="fastchat OpenAI-compatible API", dependencies=[Depends(check_api_key)] if api_keys else [])
    client = httpx.AsyncClient(timeout=httpx.Timeout(worker_timeout, connect=10.0))

    @app.exception_handler(InvalidAPIKey)
    async def _refuse(request, exc):  # OpenAI's answer to a missing or wrong key
        return JSONResponse({"error": {"message": "Invalid or missing API key: send 'Authorization: Bearer <key>' "
                                                  "with one of the keys this server was started with (--api-keys).",
                                       "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}},
                            status_code=401, headers={"WWW-Authenticate": "Bearer"})

    @app.on_event("shutdown")
    async def _close():
        await client.aclose()

    async def send(url: str, payload: dict) -> httpx.Response:
        try:
            return await client.post(url, json=payload)
        except httpx.HTTPError as e:
            raise APIError(ErrorCode.CONTROLLER_WORKER_TIMEOUT, f"request to {url} failed: {e}") from e

    async def post(url: str, payload: dict) -> dict:
        r = await send(url, payload)
        try:
            r.raise_for_status()
            return r.json()
        except (httpx.HTTPError, ValueError) as e:
            raise APIError(ErrorCode.CONTROLLER_WORKER_TIMEOUT, f"request to {url} failed: {e}") from e

    async def worker_for(model: str) -> str:
        address = (await post(controller_address + "/get_worker_address", {"model": model}))["address"]
        if not address:
            models = (await post(controller_address + "/list_models", {}))["models"]
            raise APIError(ErrorCode.INVALID_MODEL, f"model {model!r} is not served; available: {models}")
        return address

    async def max_new_tokens(worker: str, model: str, prompt: str, requested: int | None) -> int:
        context = (await post(worker + "/model_details", {"model": model}))["context_length"]
        used = (await post(worker + "/count_token", {"model": model, "prompt": prompt}))["count"]
        room = context - used
        if room <= 0:
            raise APIError(ErrorCode.CONTEXT_OVERFLOW,
                           f"This model's maximum context length is {context} tokens. However, your messages "
                           f"resulted in {used} tokens. Please reduce the length of the messages.")
        return min(requested, room) if requested and requested > 0 else room

    def check_request(req) -> None:
        if req.n is not None and req.n < 1:
            raise APIError(ErrorCode.PARAM_OUT_OF_RANGE, f"n={req.n} must be at least 1")
        if req.temperature is not None and req.temperature < 0:
            raise APIError(ErrorCode.PARAM_OUT_OF_RANGE, f"temperature={req.temperature} must be >= 0")
        if req.top_p is not None and not 0 <= req.top_p <= 1:
            raise APIError(ErrorCode.PARAM_OUT_OF_RANGE, f"top_p={req.top_p} must be within [0, 1]")

    async def generate(worker: str, params: dict) -> dict:
        out = await post(worker + "/worker_generate", params)
        if out.get("error_code", 0) != 0:
            raise APIError(out["error_code"], out.get("text", "generation failed"))
        return out

    async def render_chat(worker: str, model: str, messages: list[dict]) -> dict:
        """Prompt and stops: rendered by the worker (ours), or from its conversation template (FastChat's)."""
        r = await send(worker + "/worker_render_chat", {"model": model, "messages": messages})
        if r.status_code == 404:  # FastChat's own workers have no such endpoint
            conv = (await post(worker + "/worker_get_conv_template", {"model": model}))["conv"]
            try:
                prompt = fastchat_prompt(conv, messages)
            except (KeyError, TypeError, ValueError) as e:  # TemplateError is a ValueError
                raise APIError(ErrorCode.INTERNAL_ERROR, f"cannot render with the conversation template of worker "
                                                         f"{worker}: {e!r}") from e
            return {"prompt": prompt, "stop": _stops(conv.get("stop_str")),
                    "stop_token_ids": conv.get("stop_token_ids") or []}
        try:
            chat = r.json()
        except ValueError as e:
            raise APIError(ErrorCode.CONTROLLER_WORKER_TIMEOUT, f"worker {worker}: HTTP {r.status_code}") from e
        if "prompt" not in chat:
            raise APIError(chat.get("error_code", ErrorCode.VALIDATION_TYPE_ERROR), chat.get("text", str(chat)))
        return chat

    async def stream_chunks(worker: str, params: dict) -> AsyncIterator[dict]:
        async with client.stream("POST", worker + "/worker_generate_stream", json=params) as r:
            buf = b""
            async for piece in r.aiter_bytes():
                buf += piece
                *chunks, buf = buf.split(b"\0")
                for c in chunks:
                    if c:
                        yield json.loads(c)

    async def event_stream(worker: str, jobs: list[tuple[int, dict]], event: Callable[[int, str, str | None], str],
                           opening: Callable[[int], str] | None = None) -> AsyncIterator[str]:
        """Server-sent events for the choices `jobs` (index, worker params), generated one after another.

        `event(index, new_text, finish_reason)` and `opening(index)` (sent before a choice's text) give a
        chunk's JSON; a worker error ends the stream with the worker's error chunk.
        """
        for index, params in jobs:
            if opening is not None:
                yield f"data: {opening(index)}\n\n"
            sent = ""
            async for chunk in stream_chunks(worker, params):
                if chunk.get("error_code", 0) != 0:
                    yield f"data: {json.dumps(chunk)}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                text, finish = chunk["text"], chunk.get("finish_reason")
                delta = text[len(sent):] if text.startswith(sent) else text
                sent = text
                if delta or finish is not None:
                    yield f"data: {event(index, delta, finish)}\n\n"
        yield "data: [DONE]\n\n"

    def sampling(req, model: str, prompt: str, max_new: int, stop: list[str], stop_ids: list[int]) -> dict:
        return {"model": model, "prompt": prompt, "temperature": req.temperature if req.temperature is not None
                else 0.7, "top_p": req.top_p if req.top_p is not None else 1.0, "top_k": req.top_k or -1,
                "repetition_penalty": req.repetition_penalty or 1.0, "max_new_tokens": max_new,
                "stop": stop, "stop_token_ids": stop_ids, "echo": False}

    @app.get("/v1/models")
    async def list_models():
        try:
            models = (await post(controller_address + "/list_models", {}))["models"]
        except APIError as e:
            return e.response()
        return ModelList(data=[ModelCard(id=m) for m in models])

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest):
        try:
            check_request(req)
            worker = await worker_for(req.model)
            messages = ([{"role": "user", "content": req.messages}] if isinstance(req.messages, str)
                        else [m.model_dump() for m in req.messages])
            chat = await render_chat(worker, req.model, messages)
            max_new = await max_new_tokens(worker, req.model, chat["prompt"], req.max_tokens)
            params = sampling(req, req.model, chat["prompt"], max_new, _stops(req.stop, chat["stop"]),
                              chat["stop_token_ids"])
            if req.stream:
                cid = response_id("chatcmpl")

                def chunk(index: int, delta: DeltaMessage, finish: str | None = None) -> str:
                    return ChatCompletionStreamResponse(id=cid, model=req.model, choices=[ChatCompletionStreamChoice(
                        index=index, delta=delta, finish_reason=finish)]).model_dump_json(exclude_none=True)
                events = event_stream(worker, [(i, params) for i in range(req.n or 1)],
                                      lambda i, text, finish: chunk(i, DeltaMessage(content=text), finish),
                                      opening=lambda i: chunk(i, DeltaMessage(role="assistant")))
                return StreamingResponse(events, media_type="text/event-stream")
            outs = await asyncio.gather(*[generate(worker, params) for _ in range(req.n or 1)])
        except APIError as e:
            return e.response()
        usage = UsageInfo()
        for o in outs:
            u = o.get("usage", {})
            usage.prompt_tokens = u.get("prompt_tokens", 0)
            usage.completion_tokens += u.get("completion_tokens", 0)
        usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
        return ChatCompletionResponse(model=req.model, usage=usage, choices=[
            ChatCompletionResponseChoice(index=i, message=ChatMessage(role="assistant", content=o["text"]),
                                         finish_reason=o.get("finish_reason") or "stop")
            for i, o in enumerate(outs)])

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        try:
            check_request(req)
            worker = await worker_for(req.model)
            params = []
            for p in prompts:
                max_new = await max_new_tokens(worker, req.model, p, req.max_tokens)
                params.append(sampling(req, req.model, p, max_new, _stops(req.stop), []) | {"echo": bool(req.echo)})
            if req.stream:
                cid = response_id("cmpl")
                events = event_stream(
                    worker, list(enumerate(p for p in params for _ in range(req.n or 1))),
                    lambda i, text, finish: CompletionStreamResponse(id=cid, model=req.model, choices=[
                        CompletionChoice(index=i, text=text, finish_reason=finish)]).model_dump_json())
                return StreamingResponse(events, media_type="text/event-stream")
            outs = await asyncio.gather(*[generate(worker, p) for p in params for _ in range(req.n or 1)])
        except APIError as e:
            return e.response()
        usage = UsageInfo()
        for o in outs:
            u = o.get("usage", {})
            usage.prompt_tokens += u.get("prompt_tokens", 0)
            usage.completion_tokens += u.get("completion_tokens", 0)
        usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
        return CompletionResponse(model=req.model, usage=usage, choices=[
            CompletionChoice(index=i, text=o["text"], finish_reason=o.get("finish_reason") or "stop")
            for i, o in enumerate(outs)])

    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_listen_args(p, API_PORT)
    p.add_argument("--controller-address", default=f"http://127.0.0.1:{CONTROLLER_PORT}")
    p.add_argument("--worker-timeout", type=float, default=100.0, help="seconds to wait on a worker")
    p.add_argument("--api-keys", type=lambda s: [k for k in s.split(",") if k], default=None,
                   help="comma-separated keys; requests must then send 'Authorization: Bearer <key>'")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    warn_if_not_loopback(a.host, "OpenAI API server")
    serve(build_app(a.controller_address, a.worker_timeout, a.api_keys), listen(a.host, a.port), a.port_file)


if __name__ == "__main__":
    main()
