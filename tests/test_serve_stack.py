"""Controller, model worker and OpenAI API server as real processes on loopback."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import requests

from fastchat.constants import ErrorCode
from tests.conftest import bound_url, listen_flags
from tests.test_serve_engine import make_varied_model

pytestmark = pytest.mark.slow
MODEL = "tiny-chat"


def wait_until(check, timeout: float, what: str, proc: subprocess.Popen | None = None, log=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}\n{log.read_text() if log else ''}")
        try:
            result = check()
            if result:
                return result
        except (requests.RequestException, ValueError, KeyError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{what} not ready after {timeout}s\n{log.read_text() if log else ''}")


class Procs:
    def __init__(self, log_dir):
        self.procs: list[subprocess.Popen] = []
        self.log_dir = log_dir

    def start(self, name: str, *args: str) -> tuple[subprocess.Popen, object]:
        log = self.log_dir / f"{name}.log"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        p = subprocess.Popen([sys.executable, "-m", *args], stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
        self.procs.append(p)
        return p, log

    def start_server(self, name: str, module: str, *args: str) -> tuple[subprocess.Popen, object, str]:
        """One of our fastchat servers on a port it binds itself: its process, log and URL."""
        port_file = self.log_dir / f"{name}.port"
        proc, log = self.start(name, module, *listen_flags(port_file), *args)
        return proc, log, bound_url(proc, port_file, log=log)

    def stop_all(self):
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.fixture(scope="module")
def stack(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stack")
    model = make_varied_model(tiny_model_dir, tmp / "model")
    procs = Procs(tmp)
    try:
        cp, clog, controller = procs.start_server("controller", "fastchat.serve.controller",
                                                  "--heart-beat-expiration", "3")
        _, _, worker = procs.start_server("worker", "fastchat.serve.model_worker", "--model-path", str(model),
                                          "--model-names", f"{MODEL},tiny-alias", "--controller-address", controller,
                                          "--heart-beat-interval", "0.5", "--context-len", "256", "--num-threads",
                                          "1")
        _, _, api = procs.start_server("api", "fastchat.serve.openai_api_server", "--controller-address",
                                       controller)
        wait_until(lambda: MODEL in requests.post(controller + "/list_models", timeout=2).json()["models"],
                   120, "worker registration", cp, tmp / "worker.log")
        wait_until(lambda: requests.get(api + "/v1/models", timeout=2).ok, 60, "api server", None, tmp / "api.log")
        yield {"controller": controller, "worker": worker, "api": api, "procs": procs, "model_dir": model}
    finally:
        procs.stop_all()


def fastchat_stream(url: str, params: dict) -> list[dict]:
    """Exactly how FastChat clients (and ETO's agent) read a worker stream."""
    r = requests.post(url + "/worker_generate_stream", headers={"User-Agent": "FastChat Client"}, json=params,
                      stream=True, timeout=60)
    return [json.loads(c.decode()) for c in r.iter_lines(decode_unicode=False, delimiter=b"\0") if c]


def test_fastchat_client_request_through_controller_streams_well_formed_chunks(stack):
    params = {"model": MODEL, "prompt": "<|im_start|>user\nlook around<|im_end|>\n<|im_start|>assistant\n",
              "temperature": 0.0, "top_p": 1.0, "max_new_tokens": 16, "stop": "<|im_end|>",
              "stop_token_ids": None, "echo": False}
    chunks = fastchat_stream(stack["controller"], params)
    assert chunks and all(c["error_code"] == 0 and isinstance(c["text"], str) for c in chunks)
    final = chunks[-1]
    assert final["finish_reason"] in ("stop", "length")
    assert final["usage"]["completion_tokens"] > 0
    assert final["usage"]["total_tokens"] == final["usage"]["prompt_tokens"] + final["usage"]["completion_tokens"]
    direct = requests.post(stack["worker"] + "/worker_generate", json=params, timeout=60).json()
    assert direct["text"] == final["text"]


def test_controller_routes_by_model_name_and_reports_missing_models(stack):
    c = stack["controller"]
    assert requests.post(c + "/list_models").json()["models"] == sorted([MODEL, "tiny-alias"])
    assert requests.post(c + "/get_worker_address", json={"model": "tiny-alias"}).json()["address"] == stack["worker"]
    assert requests.post(c + "/get_worker_address", json={"model": "nope"}).json()["address"] == ""
    status = requests.post(c + "/worker_get_status").json()
    assert MODEL in status["model_names"] and status["speed"] >= 1
    assert MODEL in requests.post(c + "/refresh_all_workers").json()["models"]
    chunks = fastchat_stream(c, {"model": "nope", "prompt": "hi"})
    assert chunks[-1]["error_code"] == ErrorCode.CONTROLLER_NO_WORKER


def test_worker_metadata_endpoints(stack):
    w = stack["worker"]
    assert requests.post(w + "/model_details", json={"model": MODEL}).json()["context_length"] == 256
    count = requests.post(w + "/count_token", json={"model": MODEL, "prompt": "look around"}).json()
    assert count["error_code"] == 0 and count["count"] > 0
    conv = requests.post(w + "/worker_get_conv_template", json={"model": MODEL}).json()["conv"]
    assert conv["name"] == "chatml" and "<|im_end|>" in conv["stop_str"] and conv["stop_token_ids"]
    status = requests.post(w + "/worker_get_status").json()
    assert status["model_names"] == [MODEL, "tiny-alias"] and status["queue_length"] == 0


def test_openai_client_chat_completion_plain_and_streaming(stack):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=stack["api"] + "/v1", api_key="EMPTY", timeout=60)
    assert MODEL in [m.id for m in client.models.list()]
    messages = [{"role": "system", "content": "You act in a text world."},
                {"role": "user", "content": "You are in a kitchen. What do you do?"}]
    resp = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=12)
    choice = resp.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert resp.usage.completion_tokens > 0
    stream = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=12,
                                            stream=True)
    pieces, finish = [], None
    for event in stream:
        pieces.append(event.choices[0].delta.content or "")
        finish = event.choices[0].finish_reason or finish
    assert "".join(pieces) == choice.message.content and finish == choice.finish_reason

    comp = client.completions.create(model=MODEL, prompt="look around", max_tokens=5, temperature=0)
    assert comp.choices[0].finish_reason in ("stop", "length") and comp.usage.completion_tokens > 0


def test_openai_streams_every_choice_as_its_plain_answer(stack):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=stack["api"] + "/v1", api_key="EMPTY", timeout=60)

    def streamed(events) -> tuple[dict, dict]:
        texts, finishes = {}, {}
        for event in events:
            choice = event.choices[0]
            piece = choice.text if hasattr(choice, "text") else choice.delta.content
            texts[choice.index] = texts.get(choice.index, "") + (piece or "")
            finishes[choice.index] = choice.finish_reason or finishes.get(choice.index)
        return texts, finishes

    prompts = ["look around", "go to table 1"]
    plain = client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0)
    assert streamed(client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0,
                                              stream=True)) == (
        {c.index: c.text for c in plain.choices}, {c.index: c.finish_reason for c in plain.choices})
    messages = [{"role": "user", "content": "look around"}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
    answer = chat.choices[0]
    assert streamed(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                                   n=2, stream=True)) == (
        {0: answer.message.content, 1: answer.message.content}, {0: answer.finish_reason, 1: answer.finish_reason})


def test_openai_chat_uses_the_workers_template(stack):
    """The API server's prompt is the chat template rendering, so it matches a raw completion on that text."""
    openai = pytest.importorskip("openai")
    from fastchat.conversation import TEMPLATES, render

    client = openai.OpenAI(base_url=stack["api"] + "/v1", api_key="EMPTY", timeout=60)
    messages = [{"role": "user", "content": "take apple 1 from table 1"}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=10)
    prompt = render(TEMPLATES["chatml"], messages, add_generation_prompt=True).text
    raw = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0, stop=["<|im_end|>"])
    assert chat.choices[0].message.content == raw.choices[0].text


def test_openai_errors_are_clear(stack):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=stack["api"] + "/v1", api_key="EMPTY", timeout=60, max_retries=0)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "look around " * 400}])
    with pytest.raises(openai.BadRequestError, match="not served"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])


def test_killed_worker_is_dropped_after_heartbeat_expiry(stack, tmp_path):
    c = stack["controller"]
    doomed, log, _ = stack["procs"].start_server("doomed", "fastchat.serve.model_worker", "--model-path",
                                                 str(stack["model_dir"]), "--model-names", "doomed",
                                                 "--controller-address", c, "--heart-beat-interval", "0.5",
                                                 "--num-threads", "1")
    wait_until(lambda: "doomed" in requests.post(c + "/list_models", timeout=2).json()["models"], 120,
               "second worker", doomed, log)
    doomed.kill()
    doomed.wait()
    killed_at = time.time()
    wait_until(lambda: "doomed" not in requests.post(c + "/list_models", timeout=2).json()["models"], 20,
               "controller dropping the dead worker")
    assert time.time() - killed_at >= 1.0  # dropped by expiry, not at once
    assert requests.post(c + "/get_worker_address", json={"model": "doomed"}).json()["address"] == ""
    assert MODEL in requests.post(c + "/list_models").json()["models"]  # the live worker stays
