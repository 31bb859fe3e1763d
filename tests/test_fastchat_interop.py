"""Interoperating with the real FastChat: our worker's conversation template in FastChat's shape, our API
server in front of workers that lack /worker_render_chat (FastChat's own), API keys, the exposure warning.

`FastChatConversation` below is written from the facts of FastChat's source (fschat 0.2.36: the Conversation
fields its OpenAI server reads from /worker_get_conv_template and how get_prompt renders each separator style),
independently of fastchat.conversation, so the two renderers check each other.
"""
from __future__ import annotations

import logging
import threading
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import pytest
import requests

from fastchat.conversation import TEMPLATES, TemplateError, fastchat_prompt, render
from fastchat.serve.base_worker import Worker, build_app
from fastchat.serve.hosts import listen, warn_if_not_loopback
from fastchat.serve.model_worker import TransformersBackend
from tests.test_serve_stack import Procs, wait_until

# FastChat's SeparatorStyle values as its workers send them (IntEnum, 1-based, in fschat 0.2.36's order)
(ADD_COLON_SINGLE, ADD_COLON_TWO, ADD_COLON_SPACE_SINGLE, NO_COLON_SINGLE, NO_COLON_TWO, ADD_NEW_LINE_SINGLE,
 LLAMA2, CHATGLM, CHATML) = range(1, 10)
# what FastChat's openai_api_server takes from the worker's dict to build its Conversation
FIELDS_FASTCHAT_READS = {"name", "system_template", "system_message", "roles", "messages", "offset", "sep_style",
                         "sep", "sep2", "stop_str", "stop_token_ids"}


@dataclass
class FastChatConversation:
    name: str
    system_template: str
    system_message: str
    roles: tuple[str, str]
    messages: list[list]
    offset: int
    sep_style: int
    sep: str
    sep2: str | None
    stop_str: object = None
    stop_token_ids: list[int] | None = None

    @classmethod
    def from_worker(cls, conv: dict) -> "FastChatConversation":
        return cls(**{k: conv[k] for k in FIELDS_FASTCHAT_READS} | {"messages": list(conv["messages"])})

    def get_prompt(self) -> str:
        system_prompt = self.system_template.format(system_message=self.system_message)
        if self.sep_style == ADD_COLON_SINGLE:
            ret = system_prompt + self.sep
            for role, message in self.messages:
                ret += role + ": " + message + self.sep if message else role + ":"
            return ret
        if self.sep_style == ADD_COLON_TWO:
            ret = system_prompt + self.sep
            for i, (role, message) in enumerate(self.messages):
                ret += role + ": " + message + [self.sep, self.sep2][i % 2] if message else role + ":"
            return ret
        if self.sep_style == ADD_COLON_SPACE_SINGLE:
            ret = system_prompt + self.sep
            for role, message in self.messages:
                ret += role + ": " + message + self.sep if message else role + ": "
            return ret
        if self.sep_style == ADD_NEW_LINE_SINGLE:
            ret = "" if system_prompt == "" else system_prompt + self.sep
            for role, message in self.messages:
                ret += role + "\n" + message + self.sep if message else role + "\n"
            return ret
        if self.sep_style == NO_COLON_SINGLE:
            ret = system_prompt
            for role, message in self.messages:
                ret += role + message + self.sep if message else role
            return ret
        if self.sep_style == NO_COLON_TWO:
            ret = system_prompt
            for i, (role, message) in enumerate(self.messages):
                ret += role + message + [self.sep, self.sep2][i % 2] if message else role
            return ret
        if self.sep_style == LLAMA2:
            ret = system_prompt if self.system_message else "[INST] "
            for i, (role, message) in enumerate(self.messages):
                tag = self.roles[i % 2]
                if message:
                    ret += message + " " if i == 0 else tag + " " + message + [self.sep, self.sep2][i % 2]
                else:
                    ret += tag
            return ret
        if self.sep_style == CHATML:
            ret = "" if system_prompt == "" else system_prompt + self.sep + "\n"
            for role, message in self.messages:
                ret += role + "\n" + message + self.sep + "\n" if message else role + "\n"
            return ret
        raise ValueError(f"style {self.sep_style} is not written out here")


def fastchat_server_prompt(conv: dict, messages: list[dict]) -> str:
    """The prompt FastChat's openai_api_server sends for a chat completion (get_gen_params)."""
    c = FastChatConversation.from_worker(conv)
    for m in messages:
        if m["role"] == "system":
            c.system_message = m["content"]
        else:
            c.messages.append([c.roles[0] if m["role"] == "user" else c.roles[1], m["content"]])
    c.messages.append([c.roles[1], None])
    return c.get_prompt()


USER = {"role": "user", "content": "Your task is to: put a clean mug on the shelf."}
ANSWER = {"role": "assistant", "content": "Thought: I need a mug.\nAction: go to countertop 1"}
OBSERVATION = {"role": "user", "content": "Observation: On the countertop 1, you see a mug 1."}
SYSTEM = {"role": "system", "content": "You act in a text world."}
EMPTY_SYSTEM = {"role": "system", "content": ""}
# conversations, each with the situations it is in
CONVERSATIONS = [
    ([USER], {"no system"}),
    ([USER, ANSWER, OBSERVATION], {"no system", "earlier answer"}),
    ([SYSTEM, USER], set()),
    ([SYSTEM, USER, ANSWER, OBSERVATION], {"earlier answer"}),
    ([EMPTY_SYSTEM, USER], {"empty system"}),
    ([EMPTY_SYSTEM, USER, ANSWER, OBSERVATION], {"empty system", "earlier answer"}),
]
# where FastChat's rendering of our template differs from ours (docs/serving.md's table says the same)
FASTCHAT_DIFFERS = {
    "chatml": {"no system", "empty system"},  # FastChat writes an empty system turn
    "llama-3": {"no system", "empty system"},
    "qwen": {"empty system"},
    "smollm2": {"empty system"},
    "vicuna_v1.1": {"empty system"},
    "mistral": {"earlier answer"},  # LLAMA2 style: "[/INST] answer" where Mistral has "[/INST]answer"
    "llama-2": set(),
}


@contextmanager
def serving(app):
    """An ASGI app served by uvicorn on loopback in this process."""
    import uvicorn

    sock = listen("127.0.0.1", 0)  # bound here: no other process can take the port before uvicorn serves it
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_until(lambda: server.started, 30, "in-process server")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


class RecordingBackend(TransformersBackend):
    """Our transformers backend, keeping the generation requests it receives."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.requests: list[dict] = []

    def agenerate_stream(self, params: dict):
        self.requests.append(params)
        return super().agenerate_stream(params)


def test_every_template_has_a_fastchat_form_pinned_here():
    assert set(FASTCHAT_DIFFERS) == set(TEMPLATES)
    assert all(t.fastchat is not None for t in TEMPLATES.values())


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_worker_conversation_template_renders_in_fastchat_as_ours(name, tiny_model_dir):
    worker = Worker(TransformersBackend(tiny_model_dir, conv_template=name), ["tiny"], "http://127.0.0.1:1",
                    "http://127.0.0.1:1", register=False)
    with serving(build_app(worker)) as url:
        conv = requests.post(url + "/worker_get_conv_template", json={"model": "tiny"}, timeout=10).json()["conv"]
    assert FIELDS_FASTCHAT_READS <= set(conv)
    assert conv["name"] == name and conv["stop_str"] == list(TEMPLATES[name].stop_str) and conv["stop_token_ids"]
    # only styles FastChat 0.2.36 and its main branch number alike (main inserts LLAMA3 at 8)
    assert conv["sep_style"] in (ADD_COLON_TWO, NO_COLON_SINGLE, LLAMA2)
    for messages, situations in CONVERSATIONS:
        ours = render(TEMPLATES[name], messages, add_generation_prompt=True).text
        theirs = fastchat_server_prompt(conv, messages)
        assert (theirs == ours) == (not situations & FASTCHAT_DIFFERS[name]), (situations, theirs, ours)


def test_worker_with_the_tokenizers_own_template_sends_fastchats_raw_form(tiny_model_dir):
    worker = Worker(TransformersBackend(tiny_model_dir, conv_template="hf"), ["tiny"], "http://127.0.0.1:1",
                    "http://127.0.0.1:1", register=False)
    with serving(build_app(worker)) as url:
        conv = requests.post(url + "/worker_get_conv_template", json={}, timeout=10).json()["conv"]
    assert conv["name"] == "hf" and conv["sep_style"] == NO_COLON_SINGLE and conv["roles"] == ["", ""]
    assert fastchat_server_prompt(conv, [USER]) == USER["content"]


# FastChat-style conversation dicts of the kinds its own workers send, one per style we render
FASTCHAT_CONVS = {
    ADD_COLON_SINGLE: dict(system_message="A helpful assistant.", roles=["Human", "Assistant"], sep="\n### ",
                           messages=[["Human", "Hi?"], ["Assistant", "Hello."]], offset=2),
    ADD_COLON_TWO: dict(system_message="Be brief.", roles=["USER", "ASSISTANT"], sep=" ", sep2="</s>"),
    ADD_COLON_SPACE_SINGLE: dict(roles=["Human", "Assistant"], sep="\n"),
    NO_COLON_SINGLE: dict(roles=["<|prompter|>", "<|assistant|>"], sep="<|endoftext|>"),
    NO_COLON_TWO: dict(roles=["<human>:", "<bot>:"], sep="\n", sep2="</s>"),
    ADD_NEW_LINE_SINGLE: dict(system_template="<|im_start|>system\n{system_message}",
                              roles=["<|im_start|>user", "<|im_start|>assistant"], sep="<|im_end|>"),
    LLAMA2: dict(system_template="[INST] <<SYS>>\n{system_message}\n<</SYS>>\n\n", roles=["[INST]", "[/INST]"],
                 sep=" ", sep2=" </s><s>"),
    CHATML: dict(system_template="<|im_start|>system\n{system_message}", system_message="You are helpful.",
                 roles=["<|im_start|>user", "<|im_start|>assistant"], sep="<|im_end|>"),
}


def fastchat_conv(style: int) -> dict:
    return {"name": f"style-{style}", "system_template": "{system_message}", "system_message": "", "messages": [],
            "offset": 0, "sep_style": style, "sep2": None, "stop_str": None, "stop_token_ids": None,
            **FASTCHAT_CONVS[style]}


@pytest.mark.parametrize("style", sorted(FASTCHAT_CONVS))
def test_our_api_servers_renderer_matches_fastchat_get_prompt(style):
    conv = fastchat_conv(style)
    for messages, _ in CONVERSATIONS:
        assert fastchat_prompt(conv, messages) == fastchat_server_prompt(conv, messages)


def test_a_style_we_do_not_render_is_named():
    with pytest.raises(TemplateError, match=f"separator style {CHATGLM} is not rendered here"):
        fastchat_prompt(fastchat_conv(CHATML) | {"sep_style": CHATGLM}, [USER])


def test_warning_when_listening_beyond_loopback(caplog):
    with caplog.at_level(logging.WARNING, logger="fastchat.serve"):
        for host in ("127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"):
            warn_if_not_loopback(host, "controller")
        assert not caplog.records
        for host in ("0.0.0.0", "::", "192.168.1.20", "gpu-node-3"):
            warn_if_not_loopback(host, "controller")
    assert len(caplog.records) == 4
    assert all("no authentication between the controller and its workers" in r.getMessage() for r in caplog.records)


# ---- real servers: our controller and API server as processes, FastChat-like workers in process ------------
KEYS = ["key-one", "key-two"]
# templates whose FastChat form renders every conversation below as ours does
FALLBACK_TEMPLATES = ["vicuna_v1.1", "llama-2", "smollm2"]


@pytest.fixture(scope="module")
def stack(tiny_model_dir, tmp_path_factory):
    """Our controller and API server (with --api-keys) in front of workers without /worker_render_chat."""
    tmp = tmp_path_factory.mktemp("interop")
    procs = Procs(tmp)
    with ExitStack() as workers:
        workers.callback(procs.stop_all)
        cp, clog, controller = procs.start_server("controller", "fastchat.serve.controller")
        ap, alog, api = procs.start_server("api", "fastchat.serve.openai_api_server", "--controller-address",
                                           controller, "--api-keys", ",".join(KEYS))
        wait_until(lambda: requests.post(controller + "/list_models", timeout=2).ok, 60, "controller", cp, clog)
        wait_until(lambda: requests.get(api + "/v1/models", timeout=2).status_code == 401, 60, "api server", ap,
                   alog)
        backends = {}
        for name in FALLBACK_TEMPLATES:
            backends[name] = RecordingBackend(tiny_model_dir, conv_template=name, context_len=256)
            worker = Worker(backends[name], [f"fc-{name}"], "", controller, register=False)
            app = build_app(worker)
            # what FastChat's own workers serve: the same protocol without our rendering endpoint
            app.router.routes = [r for r in app.router.routes if getattr(r, "path", "") != "/worker_render_chat"]
            worker.worker_address = workers.enter_context(serving(app))
            worker.register_to_controller()
        yield {"api": api, "backends": backends, "api_log": alog}


@pytest.mark.slow
@pytest.mark.parametrize("name", FALLBACK_TEMPLATES)
def test_chat_through_a_worker_without_render_endpoint_sends_our_prompt(stack, name):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=stack["api"] + "/v1", api_key=KEYS[1], timeout=60, max_retries=0)
    messages = [SYSTEM, USER, ANSWER, OBSERVATION]
    backend = stack["backends"][name]
    backend.requests.clear()
    plain = client.chat.completions.create(model=f"fc-{name}", messages=messages, temperature=0, max_tokens=6,
                                           stop=["\n\n"])
    streamed = "".join(e.choices[0].delta.content or "" for e in client.chat.completions.create(
        model=f"fc-{name}", messages=messages, temperature=0, max_tokens=6, stop=["\n\n"], stream=True))
    assert streamed == plain.choices[0].message.content
    prompt = render(TEMPLATES[name], messages, add_generation_prompt=True).text
    assert [r["prompt"] for r in backend.requests] == [prompt, prompt]
    sent = backend.requests[0]
    assert set(TEMPLATES[name].stop_str) | {"\n\n"} <= set(sent["stop"]) and sent["stop_token_ids"]


@pytest.mark.slow
def test_api_keys_are_required(stack):
    api = stack["api"]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEYS[0]}):
        r = requests.get(api + "/v1/models", headers=headers, timeout=10)
        assert r.status_code == 401, headers
        assert r.json()["error"]["code"] == "invalid_api_key" and r.json()["error"]["type"] == "invalid_request_error"
    chat = {"model": "fc-llama-2", "messages": [USER], "max_tokens": 2}
    assert requests.post(api + "/v1/chat/completions", json=chat, timeout=10).status_code == 401
    for key in KEYS:
        r = requests.get(api + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10)
        assert r.status_code == 200 and "fc-llama-2" in [m["id"] for m in r.json()["data"]]
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=api + "/v1", api_key="EMPTY", max_retries=0).models.list()


@pytest.mark.slow
def test_servers_warn_only_when_listening_beyond_loopback(stack, tmp_path):
    assert "not a loopback address" not in stack["api_log"].read_text()
    procs = Procs(tmp_path)
    try:
        controller, log, url = procs.start_server("exposed", "fastchat.serve.controller", "--host", "0.0.0.0")
        wait_until(lambda: requests.post(f"{url}/list_models", timeout=2).ok, 60,
                   "controller on 0.0.0.0", controller, log)
        assert "controller listening on 0.0.0.0, which is not a loopback address" in log.read_text()
    finally:
        procs.stop_all()
