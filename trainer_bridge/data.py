"""The offline training corpus: the Python standard library's own top-level `.py` files (about 4.7 MB on
every machine that has Python), tokenized as bytes and cut into fixed-length blocks.

Deterministic by construction: files are read in sorted order, the train/eval split is decided per file
by a hash of its name (so a Python version with an extra module does not shift the others), and the
blocks are contiguous slices of the concatenation. Shuffling is the Trainer's job (seeded sampler).
"""

from __future__ import annotations

import functools
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

# Byte-level vocabulary: ids 0..255 are the bytes, 256 separates files.
EOS_ID = 256
VOCAB_SIZE = 257


@dataclass(frozen=True)
class CorpusSpec:
    """What the `data:` section of a recipe says."""

    corpus: str = "stdlib"
    block_size: int = 128
    eval_every: int = 20  # one file in `eval_every` (by name hash) goes to the eval split
    max_train_bytes: int | None = None  # cap for quick runs (tests)
    eval_blocks: int | None = None  # cap on eval blocks, so "evaluate now" stays cheap


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    # Top level only: subpackages pull in tests, idlelib, site-packages, whose size varies by install.
    root = root or stdlib_root()
    return sorted(root.glob("*.py"), key=lambda p: p.name)


def _is_eval(name: str, eval_every: int) -> bool:
    return zlib.crc32(name.encode()) % eval_every == 0


@functools.lru_cache(maxsize=8)
def _token_stream(corpus: str, split: str, eval_every: int) -> torch.Tensor:
    # Cached per process: tests and benchmarks build many trainers over the same bytes.
    if corpus != "stdlib":
        raise ValueError(f"unknown corpus {corpus!r} (known: stdlib)")
    chunks: list[bytes] = []
    for path in stdlib_files():
        if _is_eval(path.name, eval_every) == (split == "eval"):
            chunks.append(path.read_bytes())
    data = bytearray()
    for chunk in chunks:
        data += chunk
        data += b"\0"  # placeholder for EOS, patched below (bytes cannot hold 256)
    tokens = torch.frombuffer(data, dtype=torch.uint8).to(torch.int64)
    ends = torch.tensor([len(c) for c in chunks]).cumsum(0) + torch.arange(len(chunks))
    tokens[ends] = EOS_ID
    return tokens


class BlockDataset(Dataset):
    """Fixed-length blocks of a token stream; each item is {input_ids, labels} (the model shifts)."""

    def __init__(self, tokens: torch.Tensor, block_size: int, max_blocks: int | None = None):
        self.tokens = tokens
        self.block_size = block_size
        n = len(tokens) // block_size
        self.n_blocks = n if max_blocks is None else min(n, max_blocks)

    def __len__(self) -> int:
        return self.n_blocks

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        block = self.tokens[i * self.block_size : (i + 1) * self.block_size]
        return {"input_ids": block, "labels": block}


def load_corpus(spec: CorpusSpec) -> tuple[BlockDataset, BlockDataset]:
    """(train, eval) datasets for a recipe's data section."""
    train_tokens = _token_stream(spec.corpus, "train", spec.eval_every)
    if spec.max_train_bytes is not None:
        train_tokens = train_tokens[: spec.max_train_bytes]
    eval_tokens = _token_stream(spec.corpus, "eval", spec.eval_every)
    return (
        BlockDataset(train_tokens, spec.block_size),
        BlockDataset(eval_tokens, spec.block_size, spec.eval_blocks),
    )


class SwappableDataset(Dataset):
    """A map-style dataset whose contents can be replaced while the Trainer iterates over it.

    The Trainer builds its DataLoader (and sampler) once; `reload_data` swaps what this proxy points at,
    so the next batch comes from the new data. Indices drawn for the old length wrap around the new one.
    Only works with in-process loading (dataloader_num_workers=0): workers hold their own copy.
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        self._len = len(dataset)  # the sampler's view: fixed for the life of the DataLoader

    def swap(self, dataset: Dataset) -> None:
        if len(dataset) == 0:
            raise ValueError("the new training data is empty")
        self.dataset = dataset

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int):
        return self.dataset[i % len(self.dataset)]
