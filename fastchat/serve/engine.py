"""Continuous-batching generation engine for a transformers causal LM.

One background thread owns the model. Each step it admits waiting requests
into free rows of the running batch's preallocated KV cache
(fastchat.serve.kv_cache) and prefills them together in one forward pass
(prompts of similar remaining length; their rows right-padded), then runs one
decode forward pass for every running sequence together. Finished sequences
leave the batch at once. Positions come from each row's own length, and the
attention mask shows each row only its own tokens, so a row's greedy output
does not depend on its neighbours (up to float rounding: some kernels sum in a
different order for another batch size, ~1e-5 in the logits; greedy texts are
tested equal).
`max_batch_size=1` gives one-request-at-a-time serving.
The KV caches of the last few prompts are kept (with its answer once a request
finishes), and a new prompt starting with one of them (an agent's next turn, or
another episode with the same instruction) prefills only the tokens after the
shared prefix.
New weights (`swap_weights`, online RL) go in between two steps once the running
batch has finished; requests arriving meanwhile wait and run on the new weights,
so one request never mixes two weight versions. Every chunk names the version
(`policy_version`) its request was generated with.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from fastchat.constants import ErrorCode
from fastchat.serve.kv_cache import SlotCache

log = logging.getLogger(__name__)
MIN_PREFIX_REUSE = 16  # shorter shared prefixes are not worth a cache lookup


class GenerationError(Exception):
    def __init__(self, error_code: int, message: str):
        super().__init__(message)
        self.error_code = error_code

    def chunk(self) -> dict:
        return {"text": f"NETWORK ERROR DUE TO HIGH TRAFFIC. PLEASE REGENERATE OR REFRESH THIS PAGE. ({self})"
                if self.error_code == ErrorCode.INTERNAL_ERROR else str(self),
                "error_code": self.error_code}


@dataclass
class GenParams:
    """FastChat's worker request parameters. The defaults are the worker API's, FastChat's own, for a request that
    leaves a field out; the agents send temperature, top_p and max_new_tokens with every request (their one default
    is in the agent package's base module), so these never apply to an episode."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    repetition_penalty: float = 1.0
    max_new_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    echo: bool = True
    truncate: bool = True  # left-truncate an over-long prompt (FastChat's behaviour) instead of refusing it
    ignore_eos: bool = False  # keep generating past the EOS token (benchmarks)

    @classmethod
    def parse(cls, params: dict) -> "GenParams":
        def num(name, kind, default, lo=None, hi=None):
            v = params.get(name)
            if v is None:
                return default
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and float(v) != int(v)):
                raise GenerationError(ErrorCode.VALIDATION_TYPE_ERROR, f"{name!r} must be a {kind.__name__}, got {v!r}")
            v = kind(v)
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                raise GenerationError(ErrorCode.PARAM_OUT_OF_RANGE, f"{name!r}={v} is out of range [{lo}, {hi}]")
            return v

        stop = params.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise GenerationError(ErrorCode.VALIDATION_TYPE_ERROR, "'stop' must be a string or a list of strings")
        stop_ids = params.get("stop_token_ids") or []
        if not isinstance(stop_ids, list) or not all(isinstance(i, int) for i in stop_ids):
            raise GenerationError(ErrorCode.VALIDATION_TYPE_ERROR, "'stop_token_ids' must be a list of integers")
        return cls(
            temperature=num("temperature", float, cls.temperature, 0.0),
            top_p=num("top_p", float, cls.top_p, 0.0, 1.0),
            top_k=num("top_k", int, cls.top_k),
            repetition_penalty=num("repetition_penalty", float, cls.repetition_penalty, 1e-6),
            max_new_tokens=num("max_new_tokens", int, cls.max_new_tokens, 1),
            stop=[s for s in stop if s], stop_token_ids=list(stop_ids),
            echo=bool(params.get("echo", True)), truncate=bool(params.get("truncate", True)),
            ignore_eos=bool(params.get("ignore_eos", False)),
        )

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5 or self.top_p < 1e-8

    def processors(self) -> LogitsProcessorList:
        procs = LogitsProcessorList()
        if self.repetition_penalty != 1.0:
            procs.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        if not self.greedy:
            if self.temperature != 1.0:
                procs.append(TemperatureLogitsWarper(self.temperature))
            if self.top_p < 1.0:
                procs.append(TopPLogitsWarper(self.top_p))
            if self.top_k > 0:
                procs.append(TopKLogitsWarper(self.top_k))
        return procs


class Sequence:
    def __init__(self, prompt: str, ids: list[int], params: GenParams, truncated: int, sink: Callable[[dict], None]):
        self.prompt, self.prompt_ids, self.params, self.truncated, self.sink = prompt, ids, params, truncated, sink
        self.output_ids: list[int] = []
        self.text = ""          # decoded output, cut at a stop string
        self.sent = None        # last visible text sent
        self.finish_reason: str | None = None
        self.cancelled = False
        self.policy_version: int | None = None  # the weights it runs on, set when it enters the batch
        self.processors = params.processors()

    def usage(self) -> dict:
        n = len(self.output_ids)
        return {"prompt_tokens": len(self.prompt_ids), "completion_tokens": n,
                "total_tokens": len(self.prompt_ids) + n}


class BatchingEngine:
    def __init__(self, model, tokenizer, context_len: int, max_batch_size: int = 8, prefix_cache_size: int = 8,
                 policy_version: int = 0):
        self.model, self.tokenizer = model, tokenizer
        self.context_len, self.max_batch_size = context_len, max(1, max_batch_size)
        self.device = next(model.parameters()).device
        # the forward's name for the KV cache: `cache` in newer transformers 5.x, `past_key_values` in older ones
        # (5.17, on the lent GPU machine), which would take `cache=` silently into **kwargs and fill no cache
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.eos_token_id = tokenizer.eos_token_id
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._num_layers = model.config.get_text_config().num_hidden_layers
        self._kv = self._new_cache()  # row i = self._running[i]
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.stats = {"prefills": 0, "prefill_passes": 0, "prefill_tokens": 0, "prefix_tokens_reused": 0,
                      "prefill_seconds": 0.0, "decode_steps": 0, "decoded_tokens": 0, "decode_seconds": 0.0,
                      "max_batch": 0}
        self.prefix_cache_size = prefix_cache_size
        self._prefixes: list[tuple[list[int], list]] = []  # (prompt ids, per-layer (keys, values)), LRU last
        self.policy_version = policy_version  # the version of the weights the model holds now
        self._swaps: deque[tuple[Callable[[], None], int, Future]] = deque()  # weight loads waiting for a drain

    def _new_cache(self) -> SlotCache:
        return SlotCache(self._num_layers, self.max_batch_size, self.device, next(self.model.parameters()).dtype)

    # ---- submission -------------------------------------------------------------------------
    def submit(self, params: dict, sink: Callable[[dict], None]) -> Sequence:
        """Validate and queue a request; chunks go to `sink` from the engine thread."""
        prompt = params.get("prompt")
        if not isinstance(prompt, str):
            raise GenerationError(ErrorCode.VALIDATION_TYPE_ERROR, "'prompt' must be a string")
        gp = GenParams.parse(params)
        if self.eos_token_id is not None and self.eos_token_id not in gp.stop_token_ids and not gp.ignore_eos:
            gp.stop_token_ids.append(self.eos_token_id)
        ids = self.tokenizer(prompt).input_ids
        if not ids:
            raise GenerationError(ErrorCode.VALIDATION_TYPE_ERROR, "the prompt is empty")
        budget = self.context_len - gp.max_new_tokens
        truncated = 0
        if budget < 1:
            raise GenerationError(ErrorCode.CONTEXT_OVERFLOW,
                                  f"This model's maximum context length is {self.context_len} tokens; "
                                  f"max_new_tokens={gp.max_new_tokens} leaves no room for the prompt.")
        if len(ids) > budget:
            if not gp.truncate:
                raise GenerationError(ErrorCode.CONTEXT_OVERFLOW,
                                      f"This model's maximum context length is {self.context_len} tokens. However, "
                                      f"the prompt has {len(ids)} tokens and max_new_tokens is {gp.max_new_tokens}. "
                                      "Please reduce the length of the messages.")
            truncated = len(ids) - budget
            ids = ids[-budget:]
            log.warning("prompt of %d tokens truncated from the left by %d to fit the context of %d with "
                        "max_new_tokens=%d", len(ids) + truncated, truncated, self.context_len, gp.max_new_tokens)
        seq = Sequence(prompt, ids, gp, truncated, sink)
        with self._wake:
            self._start_thread()
            self._waiting.append(seq)
            self._wake.notify()
        return seq

    def swap_weights(self, load: Callable[[], None], version: int) -> None:
        """Run `load` (it changes the model's weights in place) on the generation thread once every running
        request has finished; requests waiting meanwhile enter the batch after it, on the new weights. Then the
        cached prefixes (KV of the old weights) are dropped and `policy_version` becomes `version`. Blocks until
        done; re-raises what `load` raised (the version then stays)."""
        done: Future = Future()
        with self._wake:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self._start_thread()
            self._swaps.append((load, version, done))
            self._wake.notify()
        done.result()

    def _start_thread(self) -> None:  # (holding self._wake)
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="generation", daemon=True)
            self._thread.start()

    def cancel(self, seq: Sequence) -> None:
        seq.cancelled = True

    def close(self) -> None:
        """Stop the generation thread after its current step. A process that exits while that daemon thread is
        inside torch can abort ("terminate called without an active exception")."""
        with self._wake:
            self._closed = True
            self._wake.notify_all()
            for _, _, done in self._swaps:
                done.set_exception(RuntimeError("the engine closed before the weights were loaded"))
            self._swaps.clear()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def queue_length(self) -> int:
        return len(self._waiting) + sum(1 for s in self._running if s.finish_reason is None)

    def count_tokens(self, prompt: str) -> int:
        return len(self.tokenizer(prompt).input_ids)

    def generate_stream(self, params: dict) -> Iterator[dict]:
        """Blocking iterator over chunks (for in-process use such as the CLI)."""
        q: queue.Queue = queue.Queue()
        try:
            seq = self.submit(params, q.put)
        except GenerationError as e:
            yield e.chunk()
            return
        try:
            while True:
                chunk = q.get()
                yield chunk
                if _final(chunk):
                    return
        finally:
            self.cancel(seq)

    async def agenerate_stream(self, params: dict):
        """Async iterator over chunks (for the HTTP worker); cancels the request if the consumer goes away."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        try:
            seq = self.submit(params, lambda c: loop.call_soon_threadsafe(q.put_nowait, c))
        except GenerationError as e:
            yield e.chunk()
            return
        try:
            while True:
                chunk = await q.get()
                while not _final(chunk) and not q.empty():  # behind: chunks carry all the text, send the latest
                    chunk = q.get_nowait()
                yield chunk
                if _final(chunk):
                    return
        finally:
            self.cancel(seq)

    # ---- generation loop --------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._waiting and not self._running and not self._swaps and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return
                swap = self._swaps.popleft() if self._swaps and not self._running else None
                newcomers = []
                while swap is None and not self._swaps and self._waiting and \
                        len(self._running) + len(newcomers) < self.max_batch_size:  # none enters while a swap waits
                    newcomers.append(self._waiting.popleft())
                for seq in newcomers:
                    seq.policy_version = self.policy_version
            if swap is not None:
                self._swap(*swap)
                continue
            try:
                with torch.inference_mode():
                    start = time.perf_counter()
                    for group in self._plan_prefill([s for s in newcomers if not s.cancelled]):
                        self._prefill(group)
                    self._drop_finished()
                    now = time.perf_counter()
                    self.stats["prefill_seconds"] += now - start
                    if self._running:
                        self._decode_step()
                        self._drop_finished()
                        self.stats["decode_seconds"] += time.perf_counter() - now
            except Exception as e:  # a failed step fails its requests, never the worker
                log.exception("generation step failed")
                err = GenerationError(ErrorCode.INTERNAL_ERROR, f"{type(e).__name__}: {e}").chunk()
                for seq in self._running + [s for s in newcomers if s not in self._running and s not in self._waiting]:
                    if seq.finish_reason is None:
                        seq.sink(err)
                self._running, self._kv = [], self._new_cache()

    def _swap(self, load: Callable[[], None], version: int, done: Future) -> None:
        try:
            load()
        except Exception as e:
            done.set_exception(e)
        else:
            self.policy_version = version
            done.set_result(None)
        finally:
            self._prefixes.clear()

    def _prefill(self, group: list[tuple[Sequence, int, tuple | None]]) -> None:
        """One forward pass for newcomers (sequence, tokens reused from a cached prefix, that prefix's entry): each
        prefix is copied into a free row, then the rest of every prompt runs into its row, right-padded to the
        longest (the mask keeps each row's tokens to themselves, as alone)."""
        first = self._kv.n
        for seq, reuse, entry in group:
            self._kv.add(entry[1] if entry else None, reuse)
            if entry:
                self.stats["prefix_tokens_reused"] += reuse
                at = [i for i, e in enumerate(self._prefixes) if e is entry]  # (a group before may have replaced it)
                if at:
                    self._prefixes.append(self._prefixes.pop(at[0]))  # most recently used last
        new = [len(seq.prompt_ids) - reuse for seq, reuse, _ in group]
        longest = max(new)
        pad = self.eos_token_id or 0  # never attended to (masked), never kept (overwritten)
        ids = torch.tensor([seq.prompt_ids[reuse:] + [pad] * (longest - n) for (seq, reuse, _), n in zip(group, new)],
                           device=self.device)
        ends = sorted({n - 1 for n in new})  # the last prompt token of each row gives its first new token
        positions, mask = self._kv.step_inputs(new, first)
        if len(group) == 1 and not group[0][1]:  # one prompt, nothing cached: plain causal attention (faster)
            mask = None
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, **{self._cache_arg: self._kv},
                         use_cache=True, logits_to_keep=torch.tensor(ends, device=self.device))
        self._kv.advance()
        self.stats["prefills"] += len(group)
        self.stats["prefill_passes"] += 1
        self.stats["prefill_tokens"] += sum(new)
        seqs = [seq for seq, _, _ in group]
        for i, seq in enumerate(seqs):
            self._remember_prefix(seq.prompt_ids, first + i)
        self._running.extend(seqs)
        self._advance(seqs, out.logits[torch.arange(len(group)), [ends.index(n - 1) for n in new]])

    def _plan_prefill(self, newcomers: list[Sequence]) -> list[list[tuple[Sequence, int, tuple | None]]]:
        """Newcomers in groups for `_prefill`, each with its cached prefix. One that shares a longer prefix with
        an earlier newcomer than with the cache waits for the next step, when that prompt is cached (episodes
        starting together share their instruction and example, K samples of a task their prompt: prefilled once,
        not once each). Shortest
        remaining prompt first, a group grows while padding to its longest prompt at most doubles the tokens it
        computes (a long cold prompt runs alone rather than padding many short ones)."""
        found, deferred = [], []
        for seq in newcomers:
            reuse, entry = self._cached_prefix(seq.prompt_ids)
            shared = max((_common_prefix_len(seq.prompt_ids, f[0].prompt_ids) for f in found), default=0)
            if self.prefix_cache_size > 0 and shared - reuse >= MIN_PREFIX_REUSE:
                deferred.append(seq)
            else:
                found.append((seq, reuse, entry))
        if deferred:
            with self._wake:
                self._waiting.extendleft(reversed(deferred))
        found.sort(key=lambda f: len(f[0].prompt_ids) - f[1])
        groups, tokens = [], 0
        for item in found:
            n = len(item[0].prompt_ids) - item[1]
            if groups and (len(groups[-1]) + 1) * n <= 2 * (tokens + n):
                groups[-1].append(item)
                tokens += n
            else:
                groups.append([item])
                tokens = n
        return groups

    def _cached_prefix(self, ids: list[int]) -> tuple[int, tuple | None]:
        """The longest cached prefix of `ids` (agent prompts repeat the instruction and the conversation so far):
        how many tokens it covers and its entry (prompt ids, per-layer (keys, values))."""
        best, best_len = None, 0
        for entry in self._prefixes:
            n = _common_prefix_len(entry[0], ids)
            if n > best_len:
                best, best_len = entry, n
        best_len = min(best_len, len(ids) - 1)  # at least one token must run to give the next-token logits
        if best is None or best_len < MIN_PREFIX_REUSE:
            return 0, None
        return best_len, best

    def _remember_prefix(self, ids: list[int], row: int) -> None:
        """Keep a copy of the KV cache of `ids` (the first tokens of `row`) for prompts that share their prefix."""
        if self.prefix_cache_size <= 0 or len(ids) < MIN_PREFIX_REUSE:
            return
        self._prefixes = [e for e in self._prefixes if _common_prefix_len(e[0], ids) < len(e[0])]
        self._prefixes.append((list(ids), self._kv.row(row, len(ids))))
        del self._prefixes[:-self.prefix_cache_size]

    def _decode_step(self) -> None:
        seqs = self._running
        self.stats["decode_steps"] += 1
        self.stats["decoded_tokens"] += len(seqs)
        self.stats["max_batch"] = max(self.stats["max_batch"], len(seqs))
        input_ids = torch.tensor([[s.output_ids[-1]] for s in seqs], device=self.device)
        positions, mask = self._kv.step_inputs()
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                         **{self._cache_arg: self._kv}, use_cache=True)
        self._kv.advance()
        self._advance(seqs, out.logits[:, -1, :])

    def _drop_finished(self) -> None:
        keep = [i for i, s in enumerate(self._running) if s.finish_reason is None and not s.cancelled]
        if len(keep) == len(self._running):
            return
        for i, seq in enumerate(self._running):  # an agent's next prompt is this prompt, this answer and more
            if seq.finish_reason:  # (its consumer may have cancelled it since: harmless once finished)
                self._remember_prefix((seq.prompt_ids + seq.output_ids)[:self._kv.lengths[i]], i)
        self._running = [self._running[i] for i in self._kv.keep(keep)]

    # ---- sampling and stopping --------------------------------------------------------------
    def _advance(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        logits = logits.float()
        if all(s.params.greedy and not s.processors for s in seqs):
            tokens = logits.argmax(dim=-1).tolist()
        else:
            tokens = [self._sample(s, row.unsqueeze(0)) for s, row in zip(seqs, logits)]
        for seq, tok in zip(seqs, tokens):
            self._append(seq, tok)

    def _sample(self, seq: Sequence, logits: torch.Tensor) -> int:
        if seq.processors:
            history = torch.tensor([seq.prompt_ids + seq.output_ids], device=logits.device)
            logits = seq.processors(history, logits)
        if seq.params.greedy:
            return int(logits.argmax(dim=-1))
        return int(torch.multinomial(torch.softmax(logits, dim=-1), 1))

    def _append(self, seq: Sequence, tok: int) -> None:
        p = seq.params
        if tok in p.stop_token_ids:
            seq.finish_reason = "stop"
        else:
            seq.output_ids.append(tok)
            seq.text = self.tokenizer.decode(seq.output_ids, skip_special_tokens=True)
            for s in p.stop:
                pos = seq.text.find(s)
                if pos >= 0:
                    seq.text, seq.finish_reason = seq.text[:pos], "stop"
            if seq.finish_reason is None and (len(seq.output_ids) >= p.max_new_tokens or
                                              len(seq.prompt_ids) + len(seq.output_ids) >= self.context_len):
                seq.finish_reason = "length"
        if seq.cancelled:
            return
        visible = seq.text if seq.finish_reason else _hold_back(seq.text, p.stop)
        if visible == seq.sent and seq.finish_reason is None:
            return
        seq.sent = visible
        chunk: dict[str, Any] = {"text": (seq.prompt + visible) if p.echo else visible, "error_code": 0,
                                 "usage": seq.usage(), "finish_reason": seq.finish_reason,
                                 "policy_version": seq.policy_version}
        if seq.truncated:
            chunk["truncated_prompt_tokens"] = seq.truncated
        seq.sink(chunk)


def _final(chunk: dict) -> bool:
    return bool(chunk.get("finish_reason") or chunk["error_code"])


def _common_prefix_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _hold_back(text: str, stops: list[str]) -> str:
    """Text safe to stream: without a trailing partial UTF-8 character or a possible stop-string prefix."""
    text = text.rstrip("\ufffd")
    held = max((k for s in stops for k in range(1, min(len(s) - 1, len(text)) + 1) if text.endswith(s[:k])),
               default=0)
    return text[:len(text) - held]
