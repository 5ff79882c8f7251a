"""`LocalEngine`: the embedded model (loaded by `weights`) on one worker thread, shared by every caller.

Callers on any thread submit requests (generate, or score a set of options) and wait on a future (or
cancel it). The worker decodes every answer in progress one token per step, in one padded forward pass
(continuous batching; the requests and the batch: `batching`): new requests join between steps and
finished or cancelled ones leave, so a short answer never waits for a long one. Constrained decoding
(JSON schema) goes through xgrammar's token bitmasks, with a repetition guard that steers a looping
answer to close its value. The process's engines, one per adapter: `local_engines`.
"""

from __future__ import annotations

import atexit
import copy
import json
import queue
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from contextlib import suppress
from dataclasses import dataclass

import torch
import xgrammar as xgr
from transformers import DynamicCache

from selfsteer.agents.llm.batching import Batch, GenerateRequest, ScoreRequest, loop_period, mostly_repeated


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (end of turn, grammar complete or stop string) or "length"
    prompt_tokens: int


GRAMMAR_CACHE_SIZE = 64  # compiled JSON-schema grammars kept (least recently used ones go)
# Below this temperature sampling is greedy decoding (its limit): logits / 1e-38 overflow float32.
MIN_TEMPERATURE = 1e-4


class EngineClosed(RuntimeError):
    """The engine is closed or closing: the request was not (or no longer) served."""


# Engines whose worker may still run. Weak: `atexit.register(engine.close)` held every engine (and its
# model) until the process ended, so each reload or forget_local_engine leaked a model.
_live_engines: weakref.WeakSet[LocalEngine] = weakref.WeakSet()


@atexit.register
def _close_live_engines() -> None:
    """Stop the workers before the interpreter tears down torch under them (which aborts the
    process): whatever is still generating then has nobody to read it."""
    for engine in list(_live_engines):
        engine.close(cancel=True, reason="the process is exiting")


class LocalEngine:
    """Owns the model on one worker thread; thread-safe; concurrent requests share forward passes.

    Scheduling (continuous batching): the worker runs one decode step at a time for every answer in
    progress. Between two steps it takes in new requests (each prompt is encoded in chunks of at most
    `prefill_chunk` tokens per step, so a long prompt does not stall the answers already running),
    lets the finished and the cancelled answers leave, and runs any option-scoring requests. So a
    short request never waits for a long one to finish, and a cancelled one (`future.cancel()`, a
    timeout) stops within a step and frees its place. (transformers' own ContinuousBatchingManager
    is built around paged attention for GPUs and takes per-request logits processors only as int32
    tensor arguments: no per-request grammar matcher, seeded generator or stop strings, which this
    engine needs; so the decode loop is here, on the model's public forward and DynamicCache.)

    max_batch: the most answers decoded together; more wait their turn.
    batch_window_s: how long an idle worker waits for more requests after the first one arrives;
        a `generate_many` call submits all of its prompts at once, so it does not need the window.
    prefix_cache_size: how many recent prompt prefixes keep their KV cache for option scoring.
    prefill_chunk: prompt tokens encoded per step (over all new requests).
    choice_bias: {field: {value: bias}}, added to the log-probability of a value when a structured
        answer picks one of a finite set (`chat.structured_json_text`); an adapter's
        `calibration.json` (see `agents.intervener.calibrate`) sets it.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_batch: int = 32,
        batch_window_s: float = 0.004,
        prefix_cache_size: int = 8,
        prefill_chunk: int = 256,
        choice_bias: dict[str, dict[str, float]] | None = None,
    ):
        self.model = model
        self.choice_bias = choice_bias or {}
        self.prefix_cache_size = prefix_cache_size
        self._prefix_cache: OrderedDict[tuple[int, ...], object] = OrderedDict()
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.batch_window_s = batch_window_s
        self.prefill_chunk = prefill_chunk
        self.eos_ids = {tokenizer.eos_token_id, *_as_list(model.generation_config.eos_token_id)}
        self.vocab_size = model.config.vocab_size
        self._queue: queue.Queue = queue.Queue()
        # requests: served; batches: groups of generate requests that started together (they share
        # every decode step) plus scoring batches; steps: decode forward passes. batches < requests
        # means concurrent callers really shared forward passes. running: answers in progress or
        # waiting; cancelled: answers dropped because their caller cancelled them.
        self.stats = {"requests": 0, "batches": 0, "steps": 0, "running": 0, "cancelled": 0}
        self._grammar_compiler = None
        # Bounded: every new schema a client sends compiles into a new grammar.
        self._grammar_cache: OrderedDict[tuple[str, bool], object] = OrderedDict()
        self._grammar_lock = threading.Lock()
        self._closer_masks: dict | None = None
        self._token_texts: list[str] | None = None
        # Set (never cleared) by close(cancel=True); a plain attribute so that a signal handler may
        # set it without taking a lock.
        self._abort_reason: str | None = None
        self._worker = threading.Thread(target=self._serve, name="selfsteer-llm", daemon=True)
        self._worker.start()
        _live_engines.add(self)

    def close(
        self, timeout: float = 5.0, *, cancel: bool = False, reason: str = "the engine is closed"
    ) -> None:
        """Stop the worker thread. By default once the requests already queued are done; with
        `cancel=True` every request in progress or queued fails at once with EngineClosed(reason)
        (the worker notices between two decode steps). `timeout=0` only asks: it neither queues
        nor waits, so a signal handler may call it."""
        if cancel and self._abort_reason is None:
            self._abort_reason = reason
        if timeout and self._worker.is_alive():
            self._queue.put(None)
            self._worker.join(timeout)

    # -- public API ---------------------------------------------------------------------------------

    @property
    def queued(self) -> int:
        """Requests submitted that the worker has not taken in yet (it takes them between steps)."""
        return self._queue.qsize()

    def chat_prompt_ids(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return list(
            self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=True
            )["input_ids"]
        )

    def submit(
        self,
        prompt_ids: list[int],
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        json_schema: dict | str | None = None,
        grammar=None,
        stop: list[str] | tuple[str, ...] | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> Future:
        """Queue one answer; returns its future (a `Generation`). `future.cancel()` stops it: the
        worker drops it before its next decode step. Options as in `generate_many`."""
        return self._submit_many([prompt_ids], **self._checked(locals()))[0]

    def generate(self, prompt_ids: list[int], **options) -> Generation:
        return self.generate_many([prompt_ids], **options)[0]

    def generate_many(
        self,
        prompts: list[list[int]],
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        json_schema: dict | str | None = None,
        grammar=None,
        stop: list[str] | tuple[str, ...] | None = None,
        on_text: Callable[[str], None] | None = None,
        timeout: float | None = None,
    ) -> list[Generation]:
        """Generate for several prompts; submitted together, they start together and share every
        decode step. `json_schema` constrains every output to valid JSON of that schema (xgrammar);
        `grammar` takes an already compiled xgrammar grammar instead. A grammar-constrained answer
        that starts to loop is steered to close its current value (the repetition guard).
        On timeout the answers still running are cancelled and TimeoutError is raised."""
        options = self._checked(locals())
        futures = self._submit_many(prompts, **options)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            return [
                f.result(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
                for f in futures
            ]
        finally:  # a timeout, an error or an interrupt: nothing keeps generating for nobody
            for future in futures:
                future.cancel()

    def _checked(self, given: dict) -> dict:
        options = {k: v for k, v in given.items() if k not in ("self", "prompt_ids", "prompts", "timeout")}
        if options["max_new_tokens"] < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if options.pop("json_schema") is not None:
            options["grammar"] = self.compile_json_schema(given["json_schema"])
        return options

    def _submit_many(self, prompts: list[list[int]], **options) -> list[Future]:
        if self._abort_reason is not None or not self._worker.is_alive():
            raise EngineClosed(self._abort_reason or "the local engine is closed")
        stop = tuple(s for s in options.pop("stop") or () if s)
        requests = [GenerateRequest(prompt_ids=list(ids), stop=stop, **options) for ids in prompts]
        for request in requests:
            if not request.prompt_ids:
                raise ValueError("the prompt is empty")
            self._queue.put(request)
        return [request.future for request in requests]

    def score_options(
        self, prefix_text_or_ids, options: list[str], timeout: float | None = None
    ) -> list[float]:
        """Log-probability of each option's tokens following the prefix (summed over its tokens).

        The prefix and each option are tokenized together, because BPE may merge across the seam;
        the shared leading tokens form the prefix, the rest belongs to the option."""
        if len(options) < 1:
            raise ValueError("score_options needs at least one option")
        if self._abort_reason is not None or not self._worker.is_alive():
            raise EngineClosed(self._abort_reason or "the local engine is closed")
        if isinstance(prefix_text_or_ids, str):
            prefix_text = prefix_text_or_ids
        else:
            prefix_text = self.tokenizer.decode(prefix_text_or_ids, skip_special_tokens=False)
        full = [self.tokenizer.encode(prefix_text + option, add_special_tokens=False) for option in options]
        shared = (
            _common_prefix_length(full)
            if len(full) > 1
            else len(self.tokenizer.encode(prefix_text, add_special_tokens=False))
        )
        shared = min(shared, min(len(ids) for ids in full) - 1)  # every option keeps at least one token
        request = ScoreRequest(prefix_ids=full[0][:shared], option_ids=[ids[shared:] for ids in full])
        self._queue.put(request)
        try:
            return request.future.result(timeout=timeout)
        finally:
            request.future.cancel()

    def compile_json_schema(self, schema: dict | str, leading_space: bool = False):
        """A compact JSON grammar for the schema (cached). `leading_space` puts one space before the
        value, for continuing after `"key":` the way the model itself tokenizes JSON (` "`)."""
        # Not sort_keys: the grammar emits properties in the schema's order, which the caller chose.
        text = schema if isinstance(schema, str) else json.dumps(schema)
        with self._grammar_lock:
            if self._grammar_compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size)
                # Its own cache has no bound by default; ours below has one.
                self._grammar_compiler = xgr.GrammarCompiler(info, cache_enabled=False)
            key = (text, leading_space)
            if key not in self._grammar_cache:
                grammar = xgr.Grammar.from_json_schema(text, any_whitespace=False, strict_mode=True)
                if leading_space:
                    grammar = xgr.Grammar.concat(xgr.Grammar.from_ebnf('root ::= " "'), grammar)
                self._grammar_cache[key] = self._grammar_compiler.compile_grammar(grammar)
                while len(self._grammar_cache) > GRAMMAR_CACHE_SIZE:
                    self._grammar_cache.popitem(last=False)
            self._grammar_cache.move_to_end(key)
            return self._grammar_cache[key]

    def compile_structural_tag(self, tag: dict | str):
        """A grammar from an xgrammar structural tag (cached with the JSON-schema grammars): e.g. the
        tool-call format of `chat`, tags whose contents are JSON schemas."""
        text = tag if isinstance(tag, str) else json.dumps(tag)
        key = (text, "structural_tag")
        with self._grammar_lock:
            if self._grammar_compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size)
                self._grammar_compiler = xgr.GrammarCompiler(info, cache_enabled=False)
            if key not in self._grammar_cache:
                grammar = xgr.Grammar.from_structural_tag(text)
                self._grammar_cache[key] = self._grammar_compiler.compile_grammar(grammar)
                while len(self._grammar_cache) > GRAMMAR_CACHE_SIZE:
                    self._grammar_cache.popitem(last=False)
            self._grammar_cache.move_to_end(key)
            return self._grammar_cache[key]

    # -- the worker ---------------------------------------------------------------------------------

    def _serve(self):
        waiting: list = []  # generate requests not yet decoding (first in, first served)
        batch = Batch()
        closing = False
        while True:
            closing = self._take_arrivals(waiting, idle=not waiting and not batch.rows) or closing
            if self._abort_reason is not None:
                error = EngineClosed(self._abort_reason)
                for request in [*waiting, *batch.rows]:
                    _fail(request.future, error)
                waiting, batch = [], Batch()
                self.stats["running"] = 0
            if closing and not waiting and not batch.rows:
                return
            try:
                scores = [r for r in waiting if isinstance(r, ScoreRequest) and not r.future.done()]
                waiting = [r for r in waiting if not isinstance(r, ScoreRequest)]
                if scores:
                    for start in range(0, len(scores), self.max_batch):
                        self._guarded(self._run_scores, scores[start : start + self.max_batch])
                self.stats["cancelled"] += sum(r.future.cancelled() for r in waiting)
                waiting = [r for r in waiting if not r.future.done()]  # cancelled while waiting
                self._prefill(waiting, batch)
                if batch.rows:
                    self._decode_step(batch)
                self.stats["running"] = len(waiting) + len(batch.rows)
            except BaseException as error:  # never let the worker die: hand the error to the callers
                for request in [*waiting, *batch.rows]:
                    _fail(request.future, error)
                waiting, batch = [], Batch()
                self.stats["running"] = 0

    def _take_arrivals(self, waiting: list, idle: bool) -> bool:
        """Move queued requests to `waiting` (blocking only when idle, then gathering for the batch
        window); True when close() asked the worker to stop."""
        arrived = []
        if idle:
            arrived.append(self._queue.get())
            deadline = time.monotonic() + self.batch_window_s
            while True:
                try:
                    arrived.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
        while True:
            try:
                arrived.append(self._queue.get_nowait())
            except queue.Empty:
                break
        closing = None in arrived
        arrived = [r for r in arrived if r is not None]
        self.stats["requests"] += len(arrived)
        if any(isinstance(r, GenerateRequest) for r in arrived):
            self.stats["batches"] += 1
        waiting.extend(arrived)
        return closing

    def _guarded(self, run, batch: list) -> None:
        self.stats["batches"] += 1
        try:
            run(batch)
        except BaseException as error:
            for request in batch:
                _fail(request.future, error)

    @torch.inference_mode()
    def _prefill(self, waiting: list, batch: Batch) -> None:
        """Encode up to `prefill_chunk` prompt tokens of the waiting requests (first come first),
        as far as the batch has room; a request whose prompt is complete gets its first token and
        joins the batch."""
        budget = self.prefill_chunk
        for request in list(waiting):
            if budget <= 0 or len(batch.rows) >= self.max_batch:
                break
            if request.cache is None:
                request.cache = DynamicCache()
            start = request.prefilled
            end = min(len(request.prompt_ids), start + budget)
            output = self.model(
                input_ids=torch.tensor([request.prompt_ids[start:end]]),
                position_ids=torch.arange(start, end)[None, :],
                cache=request.cache,
                use_cache=True,
                logits_to_keep=1,
            )
            request.prefilled, budget = end, budget - (end - start)
            if end < len(request.prompt_ids):
                continue
            waiting.remove(request)
            try:
                self._start(request)
                goes_on, _ = self._accept(request, output.logits[:, -1, :].float())
            except Exception as error:  # this answer's failure (it is in no list now: fail it here)
                _fail(request.future, error)
                continue
            if goes_on:
                batch.add(request)

    def _start(self, request: GenerateRequest) -> None:
        if request.temperature >= MIN_TEMPERATURE:
            # A private generator: seeding must not change the randomness of a training run that
            # shares this process (a supervisor beside its Trainer).
            request.generator = torch.Generator()
            if request.seed is not None:
                request.generator.manual_seed(request.seed % 2**63)
            else:
                request.generator.seed()
        if request.grammar is not None:
            request.matcher = xgr.GrammarMatcher(request.grammar)
            self._fill_allowed(request)

    @torch.inference_mode()
    def _decode_step(self, batch: Batch) -> None:
        """One forward pass for every row (its last token), then one new token each; rows that are
        finished or cancelled leave the batch."""
        rows = batch.rows
        positions = torch.tensor([[len(r.prompt_ids) + len(r.tokens) - 1] for r in rows])
        batch.mask = torch.cat([batch.mask, torch.ones((len(rows), 1), dtype=torch.long)], dim=1)
        output = self.model(
            input_ids=torch.tensor([[r.tokens[-1]] for r in rows]),
            attention_mask=batch.mask,
            position_ids=positions,
            cache=batch.cache,
            use_cache=True,
        )
        self.stats["steps"] += 1
        keep = self._accept_rows(rows, output.logits[:, -1, :].float())
        if len(keep) < len(rows):
            batch.keep(keep)

    def _accept_rows(self, rows: list[GenerateRequest], logits: torch.Tensor) -> list[int]:
        """Pick each row's next token; finish the rows that are done. Returns the rows that go on."""
        keep = []
        greedy = logits.argmax(-1).tolist()
        for i, request in enumerate(rows):
            if request.future.done():  # cancelled (or closed) meanwhile
                self.stats["cancelled"] += request.future.cancelled()
                continue
            try:
                goes_on, _ = self._accept(request, logits[i : i + 1], greedy[i])
            except Exception as error:  # one answer's failure is not the batch's
                _fail(request.future, error)
                continue
            if goes_on:
                keep.append(i)
        return keep

    def _accept(self, request: GenerateRequest, logits: torch.Tensor, greedy: int | None = None):
        """Choose the request's next token from its logits (1, vocab) and record it; finish the
        request when it is done. Returns (goes on, token)."""
        if request.future.done():
            return False, None
        plain = request.allowed is None and request.temperature < MIN_TEMPERATURE and greedy is not None
        token = greedy if plain else self._choose(request, logits[0])
        if token in self.eos_ids:
            self._finish(request, "stop")
            return False, token
        request.tokens.append(token)
        text = None
        if request.on_text is not None or request.stop:
            text = self.tokenizer.decode(request.tokens, skip_special_tokens=True)
        if request.stop and any(s in text for s in request.stop):
            self._finish(request, "stop", text)
            return False, token
        if request.on_text is not None and not text.endswith("\ufffd"):  # else: a partial character
            delta, request.sent = text[len(request.sent) :], text
            if delta:
                with suppress(Exception):  # a consumer's error must not end the answer
                    request.on_text(delta)
        if request.matcher is not None:
            request.matcher.accept_token(token)
            self._guard_loops(request)
            self._fill_allowed(request)
            if not bool(request.allowed.any()) or self._only_stop_allowed(request):
                self._finish(request, "stop")  # the value is complete: no step spent on the end token
                return False, token
        if len(request.tokens) >= request.max_new_tokens:
            complete = request.matcher is not None and request.matcher.is_completed()
            self._finish(request, "stop" if complete else "length")
            return False, token
        return True, token

    def _choose(self, request: GenerateRequest, logits: torch.Tensor) -> int:
        if request.allowed is not None:
            logits = logits.masked_fill(~request.allowed, float("-inf"))
            if request.closing:
                logits = self._steer_to_close(logits, request)
        if request.temperature < MIN_TEMPERATURE:
            return int(logits.argmax())
        logits = logits / request.temperature
        if request.top_p < 1.0:  # nucleus: drop the least likely tokens beyond top_p (keep one)
            ordered, order = torch.sort(logits)
            dropped = ordered.softmax(-1).cumsum(-1) <= 1 - request.top_p
            dropped[-1] = False
            logits = logits.clone()
            logits[order[dropped]] = float("-inf")
        return int(torch.multinomial(logits.softmax(-1), 1, generator=request.generator))

    def _fill_allowed(self, request: GenerateRequest) -> None:
        bitmask = xgr.allocate_token_bitmask(1, self.vocab_size)
        request.matcher.fill_next_token_bitmask(bitmask)
        bits = (bitmask[0].unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
        request.allowed = bits.flatten()[: self.vocab_size].bool()

    def _only_stop_allowed(self, request: GenerateRequest) -> bool:
        stops = [t for t in self.eos_ids if t is not None and t < self.vocab_size]
        return int(request.allowed.sum()) == int(request.allowed[stops].sum())

    # -- the repetition guard -----------------------------------------------------------------------

    def _guard_loops(self, request: GenerateRequest) -> None:
        """Turn closing on when the answer loops; off once the value it was in has ended."""
        token = request.tokens[-1]
        was_in_string = request.in_string
        self._track_strings(request, token)
        if request.closing:
            if was_in_string:
                ended = not request.in_string
            else:
                ended = any(bool(kind[token]) for kind in self._closers()["outside"])
            if ended:
                request.closing, request.guard_from = False, len(request.tokens)
            return
        if loop_period(request.tokens[request.guard_from :]) is not None:
            request.closing = True
        elif request.in_string:
            request.closing = mostly_repeated(request.tokens[max(request.guard_from, request.string_from) :])

    def _track_strings(self, request: GenerateRequest, token: int) -> None:
        """Follow JSON's string syntax over the token's characters (a quote opens or closes a string,
        a backslash escapes the next character). Byte-level tokens show `"` and `\\` as themselves."""
        for char in self._token_strings()[token]:
            if not request.in_string:
                if char == '"':
                    request.in_string, request.string_from = True, len(request.tokens) - 1
            elif request.escaped:
                request.escaped = False
            elif char == "\\":
                request.escaped = True
            elif char == '"':
                request.in_string = False

    def _steer_to_close(self, logits: torch.Tensor, request: GenerateRequest) -> torch.Tensor:
        """Keep only the allowed tokens of the best closing kind for where the answer is (see
        `_closers`); where none is allowed, the logits as they are."""
        if request.escaped:  # a quote now would be an escaped one: let the escape end first
            return logits
        for kind in self._closers()["inside" if request.in_string else "outside"]:
            chosen = request.allowed & kind
            if bool(chosen.any()):
                return logits.masked_fill(~chosen, float("-inf"))
        return logits

    def _closers(self) -> dict[str, list[torch.Tensor]]:
        """Token masks by preference. Inside a string: a quote that also ends an object or array
        (`"}`), then any quote (the string ends); no `}` or `]` before the quote (that would be
        written into the string). Outside: `}` or `]`, then a separator `,`. Tokens
        that open something (`{` `[`) or escape (`\\`) never count: they would not bring the answer
        closer to its end; outside a string neither do quotes (they open one)."""
        if self._closer_masks is None:
            texts = self._token_strings()

            def mask(test) -> torch.Tensor:
                return torch.tensor([not any(c in t for c in "{[\\") and test(t) for t in texts])

            def ends_string(t: str) -> bool:  # a quote with no `}` `]` before it (string content)
                return '"' in t and not any(c in t[: t.index('"')] for c in "}]")

            quote = mask(lambda t: '"' in t)
            bracket = mask(lambda t: "}" in t or "]" in t)
            comma = mask(lambda t: "," in t)
            ends = mask(ends_string)
            self._closer_masks = {
                "inside": [ends & bracket, ends],
                "outside": [bracket & ~quote, comma & ~quote & ~bracket],
            }
        return self._closer_masks

    def _token_strings(self) -> list[str]:
        if self._token_texts is None:
            tokens = self.tokenizer.convert_ids_to_tokens(list(range(self.vocab_size)))
            self._token_texts = [token or "" for token in tokens]
        return self._token_texts

    def _finish(self, request: GenerateRequest, reason: str, text: str | None = None) -> None:
        if text is None:
            text = self.tokenizer.decode(request.tokens, skip_special_tokens=True)
        for stop in request.stop:
            if stop in text:
                text, reason = text[: text.index(stop)], "stop"
        result = Generation(
            text=text, token_ids=request.tokens, finish_reason=reason, prompt_tokens=len(request.prompt_ids)
        )
        request.allowed = request.matcher = request.cache = None
        with suppress(InvalidStateError):  # cancelled at the last moment
            request.future.set_result(result)

    @torch.inference_mode()
    def _run_scores(self, batch: list[ScoreRequest]):
        """One forward pass over every prefix (left-padded), then one over every option of every
        request, continuing from the prefix's KV cache: a prefix is encoded once, not once per option.
        The last token of an option is never fed: it is scored by the logits of the token before it."""
        first_logprobs, cache, mask = self._encode_prefixes([r.prefix_ids for r in batch])

        owners = [(row, k) for row, r in enumerate(batch) for k in range(len(r.option_ids))]
        scores: list[list[float]] = [
            [first_logprobs[row, r.option_ids[k][0]].item() for k in range(len(r.option_ids))]
            for row, r in enumerate(batch)
        ]
        tail_length = max(len(batch[row].option_ids[k]) for row, k in owners) - 1
        if tail_length > 0:  # some option has more than one token: one more (small) forward pass
            rows = torch.tensor([row for row, _ in owners])
            cache.batch_select_indices(rows)
            pad = self.tokenizer.pad_token_id
            tail_ids = torch.full((len(owners), tail_length), pad, dtype=torch.long)
            tail_mask = torch.zeros((len(owners), tail_length), dtype=torch.long)
            for i, (row, k) in enumerate(owners):
                feed = batch[row].option_ids[k][:-1]
                tail_ids[i, : len(feed)] = torch.tensor(feed)
                tail_mask[i, : len(feed)] = 1
            positions = mask.sum(-1)[rows][:, None] + torch.arange(tail_length)[None, :]
            logits = self.model(
                input_ids=tail_ids,
                attention_mask=torch.cat([mask[rows], tail_mask], dim=-1),
                position_ids=positions,
                cache=cache,
                use_cache=True,
            ).logits
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            for i, (row, k) in enumerate(owners):
                tokens = batch[row].option_ids[k]
                for j in range(1, len(tokens)):  # token j is predicted by the logits at position j-1
                    scores[row][k] += logprobs[i, j - 1, tokens[j]].item()
        for row, request in enumerate(batch):
            with suppress(InvalidStateError):  # its caller gave up waiting
                request.future.set_result(scores[row])

    def _encode_prefixes(self, prefixes: list[list[int]]):
        """Run the prefixes through the model: (log-probs of each one's next token, KV cache, mask).
        A single prefix reuses the longest KV cache of an earlier prefix it starts with (a supervisor
        asks again and again under the same system prompt), so only its new tokens are encoded."""
        if len(prefixes) == 1:
            ids = prefixes[0]
            reused, cache = self._lookup_prefix_cache(ids)
            out = self.model(
                input_ids=torch.tensor([ids[reused:]]),
                position_ids=torch.arange(reused, len(ids))[None, :],
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            self._store_prefix_cache(ids, out.cache)
            mask = torch.ones((1, len(ids)), dtype=torch.long)
        else:
            pad = self.tokenizer.pad_token_id
            length = max(len(p) for p in prefixes)
            input_ids = torch.full((len(prefixes), length), pad, dtype=torch.long)
            mask = torch.zeros((len(prefixes), length), dtype=torch.long)
            for row, ids in enumerate(prefixes):
                input_ids[row, length - len(ids) :] = torch.tensor(ids)
                mask[row, length - len(ids) :] = 1
            out = self.model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                use_cache=True,
                logits_to_keep=1,
            )
        return torch.log_softmax(out.logits[:, -1, :].float(), dim=-1), out.cache, mask

    def _lookup_prefix_cache(self, ids: list[int]):
        best, best_key = 0, None
        for key in self._prefix_cache:
            shared = _common_prefix_length([key, ids])
            if shared > best:
                best, best_key = shared, key
        best = min(best, len(ids) - 1)  # at least one token must be fed to get the next-token logits
        if best_key is None or best <= 0:
            return 0, None
        self._prefix_cache.move_to_end(best_key)
        cache = copy.deepcopy(self._prefix_cache[best_key])
        if len(best_key) > best:
            cache.crop(best - len(best_key))  # transformers 5 crops by a negative count of tokens
        return best, cache

    def _store_prefix_cache(self, ids: list[int], cache):
        self._prefix_cache[tuple(ids)] = copy.deepcopy(cache)
        while len(self._prefix_cache) > self.prefix_cache_size:
            self._prefix_cache.popitem(last=False)


def _fail(future: Future, error: BaseException) -> None:
    with suppress(InvalidStateError):  # already cancelled or done
        future.set_exception(error)


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def _common_prefix_length(sequences: list[list[int]]) -> int:
    length = 0
    for column in zip(*sequences, strict=False):
        if any(token != column[0] for token in column):
            break
        length += 1
    return length
