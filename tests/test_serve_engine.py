"""The continuous-batching engine, in process, on a tiny random-weight model."""
from __future__ import annotations

import shutil
import threading

import pytest
import torch

from fastchat.constants import ErrorCode
from fastchat.serve.model_worker import TransformersBackend


def make_varied_model(tiny_dir, out_dir):
    """The tiny model with larger random weights: the default init makes greedy decoding repeat one token,
    which would hide batching bugs; these weights give varied text."""
    from transformers import AutoModelForCausalLM

    shutil.copytree(tiny_dir, out_dir, dirs_exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.normal_(0, 0.2, generator=gen)
    model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def backend(tiny_model_dir, tmp_path_factory):
    path = make_varied_model(tiny_model_dir, tmp_path_factory.mktemp("varied"))
    return TransformersBackend(path, max_batch_size=8, context_len=256)


def chat_prompt(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


def run(backend, params: dict) -> tuple[dict, list[dict]]:
    chunks = list(backend.engine.generate_stream(params))
    return chunks[-1], chunks


def greedy(prompt: str, n: int = 24, **extra) -> dict:
    return {"prompt": prompt, "temperature": 0, "max_new_tokens": n, "echo": False, "stop_token_ids": [],
            **extra}


PROMPTS = [chat_prompt("look around " * k + f"task {k}") for k in (1, 9, 3, 20, 5, 14)]


def test_greedy_output_is_identical_alone_and_batched(backend):
    alone = [run(backend, greedy(p, 24 + 4 * i))[0] for i, p in enumerate(PROMPTS)]
    assert len({a["text"] for a in alone}) == len(PROMPTS), "prompts should give different outputs"

    engine = backend.engine
    before = dict(engine.stats)
    results: dict[int, dict] = {}
    first_started = threading.Event()

    def worker(i: int):
        for chunk in engine.generate_stream(greedy(PROMPTS[i], 24 + 4 * i)):
            first_started.set()
        results[i] = chunk

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    first_started.wait(timeout=60)  # the rest join a batch that is already decoding
    late = [threading.Thread(target=worker, args=(i,)) for i in range(3, len(PROMPTS))]
    for t in late:
        t.start()
    for t in threads + late:
        t.join(timeout=120)
    assert engine.stats["max_batch"] > 1
    assert engine.stats["decode_steps"] - before["decode_steps"] < sum(a["usage"]["completion_tokens"]
                                                                       for a in alone)
    for i, a in enumerate(alone):
        assert results[i]["text"] == a["text"], f"prompt {i} differs when batched"
        assert results[i]["usage"] == a["usage"]
    assert engine.queue_length() == 0


def test_stop_string_ends_generation_and_is_never_streamed(backend):
    full = run(backend, greedy(PROMPTS[1], 40))[0]["text"]
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip(), f"need a visible stop string in {full!r}"
    final, chunks = run(backend, greedy(PROMPTS[1], 40, stop=["never-there", stop]))
    assert final["text"] == full[: full.find(stop)]
    assert final["finish_reason"] == "stop"
    assert all(stop not in c["text"] for c in chunks)
    texts = [c["text"] for c in chunks]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:])), "streamed text must only grow"


def test_stop_token_id_and_length_finish_reasons(backend):
    final = run(backend, greedy(PROMPTS[0], 7))[0]
    assert final["finish_reason"] == "length" and final["usage"]["completion_tokens"] == 7
    # the first generated token as a stop id: nothing is produced
    first = backend.tokenizer(run(backend, greedy(PROMPTS[0], 1))[0]["text"]).input_ids[0]
    final = run(backend, greedy(PROMPTS[0], 7, stop_token_ids=[first]))[0]
    assert final["finish_reason"] == "stop" and final["usage"]["completion_tokens"] == 0


def test_echo_returns_prompt_plus_output(backend):
    plain = run(backend, greedy(PROMPTS[2], 5))[0]["text"]
    echoed = run(backend, greedy(PROMPTS[2], 5, echo=True))[0]["text"]
    assert echoed == PROMPTS[2] + plain


def test_long_prompt_is_truncated_from_the_left(backend):
    long_prompt = "look around take apple " * 200
    n = backend.count_tokens(long_prompt)
    assert n > 256
    final = run(backend, greedy(long_prompt, 8))[0]
    assert final["error_code"] == 0
    assert final["truncated_prompt_tokens"] == n - (256 - 8)
    assert final["usage"]["prompt_tokens"] == 256 - 8
    tail = backend.tokenizer.decode(backend.tokenizer(long_prompt).input_ids[-(256 - 8):])
    assert final["text"] == run(backend, greedy(tail, 8))[0]["text"]


def test_prompt_that_cannot_fit_is_a_context_overflow(backend):
    refused = run(backend, greedy("look around " * 300, 8, truncate=False))[0]
    assert refused["error_code"] == ErrorCode.CONTEXT_OVERFLOW
    assert "maximum context length is 256" in refused["text"]
    too_many = run(backend, greedy("hi", 256))[0]
    assert too_many["error_code"] == ErrorCode.CONTEXT_OVERFLOW


@pytest.mark.parametrize("bad, code", [({"temperature": "hot"}, ErrorCode.VALIDATION_TYPE_ERROR),
                                       ({"top_p": 1.5}, ErrorCode.PARAM_OUT_OF_RANGE),
                                       ({"stop": [1, 2]}, ErrorCode.VALIDATION_TYPE_ERROR),
                                       ({"prompt": None}, ErrorCode.VALIDATION_TYPE_ERROR)])
def test_bad_parameters_get_error_codes(backend, bad, code):
    final = run(backend, {**greedy(PROMPTS[0], 4), **bad})[0]
    assert final["error_code"] == code and final["text"]


def test_sampling_respects_top_k_one(backend):
    """top_k=1 sampling must equal greedy decoding, whatever the temperature."""
    want = run(backend, greedy(PROMPTS[3], 12))[0]["text"]
    got = run(backend, {**greedy(PROMPTS[3], 12), "temperature": 1.5, "top_k": 1, "top_p": 0.9})[0]["text"]
    assert got == want


def test_prefix_cache_reuse_gives_the_same_output(backend):
    """An agent's next turn starts with its previous prompt: only the new tokens are prefilled, same answer."""
    from fastchat.serve.engine import BatchingEngine

    first = PROMPTS[3]
    follow_up = first + "Thought: go on.<|im_end|>\n<|im_start|>user\nYou see a table 1.<|im_end|>\n" \
                        "<|im_start|>assistant\n"
    run(backend, greedy(first, 4))
    reused = backend.engine.stats["prefix_tokens_reused"]
    with_cache = run(backend, greedy(follow_up, 16))[0]
    assert backend.engine.stats["prefix_tokens_reused"] - reused >= backend.count_tokens(first) - 2
    fresh = BatchingEngine(backend.model, backend.tokenizer, 256, prefix_cache_size=0)
    without = list(fresh.generate_stream(greedy(follow_up, 16)))[-1]
    assert fresh.stats["prefix_tokens_reused"] == 0
    assert with_cache["text"] == without["text"] and with_cache["usage"] == without["usage"]


def test_next_turn_reuses_the_previous_answer(backend):
    """A finished request's prompt and answer stay cached: the agent's next prompt repeats both."""
    from fastchat.serve.engine import BatchingEngine

    first = PROMPTS[3]  # its answer's text tokenizes back to the generated tokens (not so for every random answer)
    answer = run(backend, greedy(first, 12))[0]["text"]
    follow_up = first + answer + "<|im_end|>\n<|im_start|>user\nYou see a table 1.<|im_end|>\n<|im_start|>assistant\n"
    reused = backend.engine.stats["prefix_tokens_reused"]
    with_cache = run(backend, greedy(follow_up, 16))[0]
    assert backend.engine.stats["prefix_tokens_reused"] - reused > backend.count_tokens(first) + 4
    fresh = BatchingEngine(backend.model, backend.tokenizer, 256, prefix_cache_size=0)
    without = list(fresh.generate_stream(greedy(follow_up, 16)))[-1]
    fresh.close()
    assert with_cache["text"] == without["text"] and with_cache["usage"] == without["usage"]


def submit_together(engine, requests: list[dict]) -> list[dict]:
    """Queue all requests while holding the engine's lock, so they are newcomers of one step; their final chunks."""
    import queue

    sinks = [queue.Queue() for _ in requests]
    with engine._wake:
        for params, sink in zip(requests, sinks):
            engine.submit(params, sink.put)
    finals = []
    for sink in sinks:
        chunk = sink.get(timeout=120)
        while not (chunk.get("finish_reason") or chunk["error_code"]):
            chunk = sink.get(timeout=120)
        finals.append(chunk)
    return finals


def test_newcomers_prefilled_together_give_their_alone_output(backend):
    """Requests arriving in one step share prefill passes (their rows right-padded), each as alone."""
    from fastchat.serve.engine import BatchingEngine

    alone = [run(backend, greedy(p, 12))[0] for p in PROMPTS]
    engine = BatchingEngine(backend.model, backend.tokenizer, 256, max_batch_size=8, prefix_cache_size=0)
    together = submit_together(engine, [greedy(p, 12) for p in PROMPTS])
    engine.close()
    assert engine.stats["prefills"] == len(PROMPTS) and engine.stats["prefill_passes"] < len(PROMPTS)
    for got, want in zip(together, alone):
        assert got["text"] == want["text"] and got["usage"] == want["usage"]


def test_newcomers_sharing_an_uncached_prefix_prefill_it_once(backend):
    """Episodes that start together share their instruction: the first prefills it, the others wait one step and
    reuse it, instead of each computing it."""
    from fastchat.serve.engine import BatchingEngine

    instruction = "Interact with a household to solve a task. " * 6
    prompts = [chat_prompt(instruction + f"Your task is to: find object {k}.") for k in range(3)]
    alone = [run(backend, greedy(p, 8))[0] for p in prompts]
    engine = BatchingEngine(backend.model, backend.tokenizer, 256, max_batch_size=8)
    together = submit_together(engine, [greedy(p, 8) for p in prompts])
    engine.close()
    shared = backend.count_tokens(chat_prompt(instruction))
    assert engine.stats["prefix_tokens_reused"] >= 2 * (shared - 8)
    assert engine.stats["prefill_tokens"] <= sum(backend.count_tokens(p) for p in prompts) - 2 * (shared - 8)
    for got, want in zip(together, alone):
        assert got["text"] == want["text"] and got["usage"] == want["usage"]


def test_rows_moving_and_cache_growth_keep_greedy_output(backend, monkeypatch):
    """Requests queue for 3 rows, finish at different steps (later rows move into freed ones, newcomers take the
    rest) and the preallocated KV cache grows several times: each output is still the one-at-a-time output."""
    from fastchat.serve import kv_cache
    from fastchat.serve.engine import BatchingEngine

    monkeypatch.setattr(kv_cache, "MIN_CAPACITY", 4)
    alone = [run(backend, greedy(p, 10 + 5 * i))[0] for i, p in enumerate(PROMPTS)]
    engine = BatchingEngine(backend.model, backend.tokenizer, 256, max_batch_size=3, prefix_cache_size=0)
    results: dict[int, dict] = {}

    def worker(i: int):
        results[i] = list(engine.generate_stream(greedy(PROMPTS[i], 10 + 5 * i)))[-1]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    engine.close()
    assert engine.stats["max_batch"] == 3
    assert engine._kv.layers[0].keys.shape[2] >= max(a["usage"]["total_tokens"] for a in alone) - 1
    for i, a in enumerate(alone):
        assert results[i]["text"] == a["text"] and results[i]["usage"] == a["usage"], f"prompt {i}"


def test_prepacked_linear_matches_and_rows_do_not_depend_on_the_batch():
    from fastchat.serve.prepack import PackedLinear

    linear = torch.nn.Linear(96, 40)
    packed = PackedLinear(linear, batch_hint=8)
    x = torch.randn(5, 3, 96)
    with torch.inference_mode():
        y = packed(x)
        assert torch.allclose(y, linear(x), atol=1e-5)
        assert torch.equal(y, torch.cat([packed(x[i:i + 1]) for i in range(5)]))


def test_prefills_of_any_length_reach_onednn_in_a_bounded_set_of_shapes(monkeypatch):
    """oneDNN caches a primitive per input shape: a serving worker fed prompts of every length grew by ~1 MB per
    request until prefills were cut into fixed-size products. Results stay those of one whole product."""
    from fastchat.serve import prepack

    shapes = set()
    real = prepack.packed_product
    monkeypatch.setattr(prepack, "packed_product", lambda rows, w, b: shapes.add(tuple(rows.shape)) or real(rows, w, b))
    linear = torch.nn.Linear(48, 24)
    packed = prepack.PackedLinear(linear)
    with torch.inference_mode():
        for rows in range(1, 1200, 23):
            x = torch.randn(1, rows, 48)
            y = packed(x)
            assert y.shape == (1, rows, 24) and torch.allclose(y, linear(x), atol=1e-5)
            assert torch.equal(y[0, :1], packed(x[:, :1])[0])  # a row's result does not depend on the product
    exact = set(range(1, prepack.EXACT_ROWS + 1))
    padded = set(range(2 * prepack.EXACT_ROWS, prepack.CHUNK_ROWS + 1, prepack.EXACT_ROWS))
    assert {r for r, _ in shapes} <= exact | padded and prepack.CHUNK_ROWS in {r for r, _ in shapes}


def test_a_slow_stream_consumer_gets_the_latest_text(backend):
    """Chunks carry the whole text so far: a consumer that falls behind skips to the newest one."""
    import asyncio

    async def consume() -> list[dict]:
        chunks = []
        async for chunk in backend.engine.agenerate_stream(greedy(PROMPTS[1], 30)):
            chunks.append(chunk)
            while backend.engine.queue_length():  # busy while the engine finishes the request
                await asyncio.sleep(0.01)
        return chunks

    chunks = asyncio.run(consume())
    final = run(backend, greedy(PROMPTS[1], 30))[0]
    # the first chunk, perhaps one sent while the engine was setting the final one, and the final chunk
    assert len(chunks) <= 3 and chunks[-1] == final
