"""An OpenAI-compatible API in front of the controller.

    python -m fastchat.serve.openai_api_server --controller-address http://127.0.0.1:21001 \
        [--host 127.0.0.1] [--port 8000]

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="EMPTY")
    client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Hi"}])

Chat messages are rendered by the worker with its chat template (the same
fastchat.conversation code the trainers use), and the template's stop strings
and stop token ids are passed along with the request's own stops.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
from typing import AsyncIterator

import httpx
from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse

from fastchat.constants import API_PORT, CONTROLLER_PORT, ErrorCode
from fastchat.serve.openai_protocol import (ChatCompletionRequest, ChatCompletionResponse,
                                            ChatCompletionResponseChoice, ChatCompletionStreamChoice,
                                            ChatCompletionStreamResponse, ChatMessage, CompletionChoice,
                                            CompletionRequest, CompletionResponse, CompletionStreamResponse,
                                            DeltaMessage, ErrorResponse, ModelCard, ModelList, UsageInfo, _id)

log = logging.getLogger("fastchat.openai_api_server")


class APIError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code

    def response(self) -> JSONResponse:
        return JSONResponse(ErrorResponse(message=str(self), code=self.code).model_dump(), status_code=400)


def _stops(*groups) -> list[str]:
    out: list[str] = []
    for g in groups:
        for s in ([g] if isinstance(g, str) else g or []):
            if s and s not in out:
                out.append(s)
    return out


def build_app(controller_address: str, worker_timeout: float = 100.0) -> FastAPI:
    app = FastAPI(title="fastchat OpenAI-compatible API")
    client = httpx.AsyncClient(timeout=httpx.Timeout(worker_timeout, connect=10.0))

    @app.on_event("shutdown")
    async def _close():
        await client.aclose()

    async def post(url: str, payload: dict) -> dict:
        try:
            r = await client.post(url, json=payload)
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

    async def stream_chunks(worker: str, params: dict) -> AsyncIterator[dict]:
        async with client.stream("POST", worker + "/worker_generate_stream", json=params) as r:
            buf = b""
            async for piece in r.aiter_bytes():
                buf += piece
                *chunks, buf = buf.split(b"\0")
                for c in chunks:
                    if c:
                        yield json.loads(c)

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
            chat = await post(worker + "/worker_render_chat", {"model": req.model, "messages": messages})
            if "prompt" not in chat:
                raise APIError(chat.get("error_code", ErrorCode.VALIDATION_TYPE_ERROR), chat.get("text", ""))
            max_new = await max_new_tokens(worker, req.model, chat["prompt"], req.max_tokens)
            params = sampling(req, req.model, chat["prompt"], max_new, _stops(req.stop, chat["stop"]),
                              chat["stop_token_ids"])
            if req.stream:
                return StreamingResponse(chat_stream(worker, params, req.n or 1), media_type="text/event-stream")
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

    async def chat_stream(worker: str, params: dict, n: int):
        cid = _id("chatcmpl")
        for i in range(n):
            first = ChatCompletionStreamResponse(id=cid, model=params["model"], choices=[
                ChatCompletionStreamChoice(index=i, delta=DeltaMessage(role="assistant"))])
            yield f"data: {first.model_dump_json(exclude_none=True)}\n\n"
            sent = ""
            async for chunk in stream_chunks(worker, params):
                if chunk.get("error_code", 0) != 0:
                    yield f"data: {json.dumps(chunk)}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                text, finish = chunk["text"], chunk.get("finish_reason")
                delta = text[len(sent):] if text.startswith(sent) else text
                sent = text
                if not delta and finish is None:
                    continue
                msg = ChatCompletionStreamResponse(id=cid, model=params["model"], choices=[
                    ChatCompletionStreamChoice(index=i, delta=DeltaMessage(content=delta), finish_reason=finish)])
                yield f"data: {msg.model_dump_json(exclude_none=True)}\n\n"
        yield "data: [DONE]\n\n"

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
                return StreamingResponse(completion_stream(worker, params, req.n or 1),
                                         media_type="text/event-stream")
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

    async def completion_stream(worker: str, params: list[dict], n: int):
        cid = _id("cmpl")
        index = 0
        for p in params:
            for _ in range(n):
                sent = ""
                async for chunk in stream_chunks(worker, p):
                    if chunk.get("error_code", 0) != 0:
                        yield f"data: {json.dumps(chunk)}\n\n"
                        yield "data: [DONE]\n\n"
                        return
                    text, finish = chunk["text"], chunk.get("finish_reason")
                    delta = text[len(sent):] if text.startswith(sent) else text
                    sent = text
                    if not delta and finish is None:
                        continue
                    msg = CompletionStreamResponse(id=cid, model=p["model"], choices=[
                        CompletionChoice(index=index, text=delta, finish_reason=finish)])
                    yield f"data: {msg.model_dump_json()}\n\n"
                index += 1
        yield "data: [DONE]\n\n"

    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=API_PORT)
    p.add_argument("--controller-address", default=f"http://127.0.0.1:{CONTROLLER_PORT}")
    p.add_argument("--worker-timeout", type=float, default=100.0, help="seconds to wait on a worker")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    import uvicorn
    uvicorn.run(build_app(a.controller_address, a.worker_timeout), host=a.host, port=a.port, log_level="warning")


if __name__ == "__main__":
    main()
