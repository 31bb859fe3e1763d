"""Agents' protocol handling: prompt rendering, streaming, retries, timeouts, context overflow.

The servers here are small scripted HTTP servers on loopback that answer as a FastChat
controller/worker or an OpenAI endpoint would, including the failures our error handling
must survive; the real controller and worker are exercised in test_eval_e2e.py.
"""
from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from eval_agent.agents import load_agent_config, make_agent
from eval_agent.agents.base import ContextOverflowError, ModelError
from eval_agent.agents.fastchat_agent import FastChatAgent
from eval_agent.agents.openai_agent import OpenAIAgent
from eval_agent.config import ConfigError
from fastchat.constants import ErrorCode
from fastchat.conversation import TEMPLATES, render

MESSAGES = [{"role": "user", "content": "Do the task."}, {"role": "assistant", "content": "OK"},
            {"role": "user", "content": "You are in a room."}]


class ScriptedServer:
    """Answers POSTs by path; `script[path]` is a list of replies used in order (the last repeats).
    A reply is (status, body) with body a dict (JSON), a list of dicts (a NUL-delimited stream),
    or ("sleep", seconds) to stall."""

    def __init__(self, script: dict[str, list]):
        self.script = script
        self.requests: list[tuple[str, dict]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                server.requests.append((self.path, body))
                replies = server.script[self.path]
                status, reply = replies[min(server.count(self.path) - 1, len(replies) - 1)]
                if status == "sleep":
                    time.sleep(reply)
                    status, reply = 200, [{"text": "late", "error_code": 0}]
                if isinstance(reply, list):
                    data = b"".join(json.dumps(c).encode() + b"\0" for c in reply)
                else:
                    data = json.dumps(reply).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def count(self, path: str) -> int:
        return sum(p == path for p, _ in self.requests)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(script):
        servers.append(ScriptedServer(script))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def fastchat_script(server_address_holder, generate_replies):
    return {
        "/get_worker_address": [(200, server_address_holder)],
        "/worker_get_conv_template": [(200, {"conv": {"name": "chatml", "stop_token_ids": [2]}})],
        "/worker_generate_stream": generate_replies,
    }


def start_fastchat(serve, generate_replies):
    address = {"address": ""}
    server = serve(fastchat_script(address, generate_replies))
    address["address"] = server.address  # the server is its own worker
    return server


def agent_for(server, **options):
    options = {"max_retries": 2, "retry_backoff": 0.05, **options}
    return FastChatAgent("tiny", controller_address=server.address, temperature=0.5, max_new_tokens=32, **options)


def test_fastchat_agent_renders_with_the_worker_template_and_reads_the_stream(serve):
    chunks = [{"text": "Thought: I", "error_code": 0}, {"text": "Thought: I look.\nAction: look ", "error_code": 0}]
    server = start_fastchat(serve, [(200, chunks)])
    answer = agent_for(server)(MESSAGES)
    assert answer == "Thought: I look.\nAction: look"
    (_, payload), = [r for r in server.requests if r[0] == "/worker_generate_stream"]
    assert payload["prompt"] == render(TEMPLATES["chatml"], MESSAGES, add_generation_prompt=True).text
    # the template's stop, then the original's: never run into an imagined observation or task
    assert payload["stop"] == ["<|im_end|>", "\nObservation:", "\nTask:", "\n---"]
    assert payload["stop_token_ids"] == [2]
    assert payload["echo"] is False and payload["truncate"] is False
    assert (payload["temperature"], payload["max_new_tokens"], payload["model"]) == (0.5, 32, "tiny")


def test_fastchat_agent_retries_server_failures(serve):
    replies = [(500, {"detail": "boom"}), (200, [{"text": "oom", "error_code": ErrorCode.CUDA_OUT_OF_MEMORY}]),
               (200, []), (200, [{"text": "Action: look", "error_code": 0}])]
    server = start_fastchat(serve, replies)
    assert agent_for(server, max_retries=3)(MESSAGES) == "Action: look"
    assert server.count("/worker_generate_stream") == 4
    assert server.count("/get_worker_address") == 4  # a fresh worker address for every attempt
    assert server.count("/worker_get_conv_template") == 1


def test_fastchat_agent_raises_context_overflow_at_once(serve):
    server = start_fastchat(serve, [(200, [{"text": "too long", "error_code": ErrorCode.CONTEXT_OVERFLOW}])])
    with pytest.raises(ContextOverflowError):
        agent_for(server)(MESSAGES)
    assert server.count("/worker_generate_stream") == 1


def test_fastchat_agent_gives_up_with_model_error(serve):
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    agent = FastChatAgent("tiny", controller_address=dead, max_retries=2, retry_backoff=0.1)
    start = time.monotonic()
    with pytest.raises(ModelError, match="3 attempts failed"):
        agent(MESSAGES)
    assert time.monotonic() - start >= 0.1 + 0.2  # exponential backoff between the attempts

    no_worker = serve({"/get_worker_address": [(200, {"address": ""})]})
    with pytest.raises(ModelError, match="no worker for model 'tiny'"):
        agent_for(no_worker)(MESSAGES)


def test_fastchat_agent_times_out_a_stalled_request(serve):
    server = start_fastchat(serve, [("sleep", 3.0)])
    start = time.monotonic()
    with pytest.raises(ModelError):
        agent_for(server, timeout=0.3, max_retries=1)(MESSAGES)
    assert time.monotonic() - start < 2.5


def chat_completion(text):
    return {"id": "c1", "object": "chat.completion", "created": 0, "model": "tiny",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}


def test_openai_agent_uses_the_environment_and_maps_errors(serve, monkeypatch):
    server = serve({"/v1/chat/completions": [
        (200, chat_completion(" Action: look \n")),
        (400, {"object": "error", "message": "prompt too long", "code": ErrorCode.CONTEXT_OVERFLOW}),
        (503, {"object": "error", "message": "overloaded", "code": ErrorCode.ENGINE_OVERLOADED}),
    ]})
    monkeypatch.setenv("OPENAI_BASE_URL", server.address + "/v1")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    agent = OpenAIAgent("tiny", max_retries=1, max_new_tokens=16)
    assert agent(MESSAGES) == "Action: look"
    path, body = server.requests[0]
    assert body["messages"] == MESSAGES and body["max_tokens"] == 16 and body["model"] == "tiny"
    with pytest.raises(ContextOverflowError):
        agent(MESSAGES)
    with pytest.raises(ModelError):
        agent(MESSAGES)
    assert server.count("/v1/chat/completions") == 4  # the 503 was retried once by the client


def test_agent_configs_load_and_flags_override(tmp_path):
    path, raw = load_agent_config("fastchat")
    agent = make_agent(path, raw, model_name="other", temperature=None, max_new_tokens=7)
    assert isinstance(agent, FastChatAgent)
    assert (agent.model_name, agent.max_new_tokens, agent.temperature) == ("other", 7, 0.0)

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"agent_class": "FastChatAgent", "config": {"model_name": "m", "colour": 1}}))
    with pytest.raises(ConfigError, match="bad.json.*colour"):
        make_agent(*load_agent_config(str(bad)))
    with pytest.raises(ConfigError, match="not found"):
        load_agent_config("no-such-agent")
