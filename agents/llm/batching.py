"""What the engine's worker decodes (see `engine.LocalEngine`): the requests (an answer to generate,
options to score) with their decoding state, the batch of answers decoded together (one KV cache,
left-padded to a common length), and the loop tests of the repetition guard.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

# The repetition guard of grammar-constrained answers. The embedded model loops: it writes
# "1.0000000..." or the same sentence again and again into a free-text field until the token budget
# ends. An answer loops when its last tokens repeat a period of at most LOOP_MAX_PERIOD tokens
# LOOP_MIN_REPEATS times over at least LOOP_MIN_SPAN tokens, or, inside a string, when fewer than
# LOOP_MIN_DISTINCT of the 4-token sequences among its last LOOP_WINDOW tokens are distinct (a loop
# that changes a number now and then). Ordinary text has nearly all of them distinct.
LOOP_MIN_SPAN = 24
LOOP_MIN_REPEATS = 3
LOOP_MAX_PERIOD = 32
LOOP_WINDOW = 64
LOOP_MIN_DISTINCT = 0.5


@dataclass
class GenerateRequest:
    """One answer: its options, its future, and (once admitted) its decoding state."""

    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    grammar: object | None  # xgrammar.CompiledGrammar
    stop: tuple[str, ...]
    on_text: Callable[[str], None] | None
    future: Future = field(default_factory=Future)
    # Decoding state, owned by the worker.
    tokens: list[int] = field(default_factory=list)
    prefilled: int = 0  # prompt tokens already in this request's own cache (chunked prefill)
    cache: object | None = None  # its own KV cache until it joins the batch
    sent: str = ""  # text handed to on_text so far
    matcher: object | None = None
    allowed: torch.Tensor | None = None  # the grammar's allowed next tokens (bool, vocab)
    generator: torch.Generator | None = None
    closing: bool = False  # the repetition guard fired: steer to the end of the current value
    guard_from: int = 0  # loop detection looks at tokens[guard_from:]
    in_string: bool = False  # the JSON written so far ends inside a string (since string_from)
    escaped: bool = False
    string_from: int = 0
    done_reason: str | None = None


@dataclass
class ScoreRequest:
    prefix_ids: list[int]  # shared by every option
    option_ids: list[list[int]]  # the tokens of each option after the prefix
    future: Future = field(default_factory=Future)


class Batch:
    """The answers being decoded together: one KV cache, left-padded to a common length.
    Rows join (after their own prefill) and leave (finished or cancelled) between decode steps."""

    def __init__(self):
        self.rows: list[GenerateRequest] = []
        self.cache = None  # DynamicCache, batch = len(rows)
        self.mask: torch.Tensor | None = None  # (rows, columns): 1 where a column is a real token

    def add(self, request: GenerateRequest) -> None:
        cache, length = request.cache, request.prefilled
        request.cache = None
        mask = torch.ones((1, length), dtype=torch.long)
        if not self.rows:
            self.rows, self.cache, self.mask = [request], cache, mask
            return
        width = max(self.mask.shape[1], length)
        layers = []
        for old, new in zip(self.cache.layers, cache.layers, strict=True):
            layers.append(
                (
                    torch.cat([left_pad(old.keys, width), left_pad(new.keys, width)]),
                    torch.cat([left_pad(old.values, width), left_pad(new.values, width)]),
                )
            )
        self.cache = DynamicCache(ddp_cache_data=layers)
        self.mask = torch.cat([left_pad(self.mask, width), left_pad(mask, width)])
        self.rows.append(request)

    def keep(self, keep: list[int]) -> None:
        """Keep only these rows; drop the columns that are padding in every remaining row."""
        if not keep:
            self.rows, self.cache, self.mask = [], None, None
            return
        index = torch.tensor(keep)
        self.rows = [self.rows[i] for i in keep]
        self.mask = self.mask[index]
        start = int(self.mask.any(0).nonzero()[0])
        self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]


def left_pad(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Zeros prepended along the sequence axis (dim 2 of a cache tensor, dim 1 of a mask)."""
    axis = 2 if tensor.dim() == 4 else 1
    missing = width - tensor.shape[axis]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[axis] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=axis)


def loop_period(tokens: list[int]) -> int | None:
    """The period of an exact loop at the end of `tokens` (see LOOP_MIN_SPAN), or None."""
    for period in range(1, LOOP_MAX_PERIOD + 1):
        span = max(LOOP_MIN_SPAN, LOOP_MIN_REPEATS * period)
        if len(tokens) < span:
            return None
        tail = tokens[-span:]
        if tail[period:] == tail[:-period]:
            return period
    return None


def mostly_repeated(tokens: list[int]) -> bool:
    """Whether the last LOOP_WINDOW tokens are mostly 4-token sequences seen before in the window."""
    if len(tokens) < LOOP_WINDOW:
        return False
    window = tokens[-LOOP_WINDOW:]
    grams = [tuple(window[i : i + 4]) for i in range(len(window) - 3)]
    return len(set(grams)) < LOOP_MIN_DISTINCT * len(grams)
