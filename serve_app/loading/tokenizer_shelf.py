"""The tokenizer shelf: one tokenizer object per distinct set of tokenizer files.

Fine-tunes of one base model ship its tokenizer files byte for byte. Building a fast
tokenizer parses `tokenizer.json` in one C call that holds the GIL for 7-11 ms (minilm's
30k-entry vocabulary), and freeing it costs again; in a replica that loads and evicts all
the time that was ~16% of the GIL (docs/benchmarks.md, B7). The shelf keys tokenizers by
the sha256 digests that the version's manifest gives for every file the tokenizer may read
(`tokenizer_key`), hands a model the tokenizer already in use by another model with the
same key, and keeps the last few released ones (`keep`, LRU) for a reload or a copy.

A `SharedTokenizer` owns the tokenizer and its lock (HF fast tokenizers are not
thread-safe: concurrent calls with padding/truncation raise "Already borrowed"), so every
model sharing it takes turns on one lock. A model holds a `TokenizerLease`; eviction
releases the lease, and the tokenizer stays as long as any lease on it is held, whatever
the LRU does.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from serve_app.storage.manifest import Manifest

DEFAULT_KEEP = 8
# NOTE: top-level files that only the model reads, never `AutoTokenizer` (config.json is
# read by it, but only for the fields in `_config_fields`). Every other non-weight file at
# the top level counts in the key: an unknown file can cost a build, never a wrong share.
MODEL_ONLY_FILES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "preprocessor_config.json",
        "model.safetensors.index.json",
        "modules.json",
        "config_sentence_transformers.json",
        "sentence_bert_config.json",
        "data_config.json",
        "module.json",
    }
)
# NOTE: transformers patches the pre-tokenizer of these model types when their config.json
# was written by transformers < 5 (`TokenizersBackend._patch_mistral_regex`): for them the
# config's `transformers_version` is part of what the tokenizer depends on.
_VERSIONED_MODEL_TYPES = frozenset({"mistral", "mistral3", "voxtral", "ministral", "pixtral"})


@dataclass(frozen=True)
class TokenizerKey:
    """What a tokenizer built by `AutoTokenizer.from_pretrained(folder)` depends on: the
    digests of the tokenizer files, and the few config.json fields it reads."""

    files: tuple[tuple[str, str], ...]
    config: tuple[str | None, ...]


def tokenizer_key(manifest: Manifest, config: Any) -> TokenizerKey:
    """The shelf key of `manifest`'s tokenizer; `config` is its loaded transformers config.

    Files are taken from the manifest (their sha256 is verified before anything reads
    them): every top-level file except weights and `MODEL_ONLY_FILES`. From the config,
    `AutoTokenizer` reads the config class, `model_type` and `tokenizer_class` to pick the
    tokenizer class (and `_name_or_path`, which for a local folder never matches its list
    of Hub ids), plus `transformers_version` for `_VERSIONED_MODEL_TYPES`.
    """
    files = tuple(
        sorted(
            (f.path, f.sha256)
            for f in manifest.files
            if "/" not in f.path
            and not f.path.endswith(".safetensors")
            and f.path not in MODEL_ONLY_FILES
        )
    )
    return TokenizerKey(files, _config_fields(config))


def _config_fields(config: Any) -> tuple[str | None, ...]:
    model_type = getattr(config, "model_type", None) or None
    tokenizer_class = getattr(config, "tokenizer_class", None)
    version = None
    if model_type is None or model_type in _VERSIONED_MODEL_TYPES:
        version = getattr(config, "transformers_version", None)
    return (
        type(config).__name__,
        model_type,
        str(tokenizer_class) if tokenizer_class else None,
        str(version) if version else None,
    )


class SharedTokenizer:
    """A tokenizer and the lock every caller takes around it."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._lock = threading.Lock()

    def encode(self, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
        """Token ids and attention masks of `texts`, padded to the longest and truncated at
        `max_length`, as CPU tensors; one caller at a time."""
        with self._lock:
            enc = self.tokenizer(
                texts,
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
        return dict(enc)


class TokenizerLease:
    """One model's hold on a shared tokenizer; `release()` (idempotent) at eviction."""

    def __init__(
        self, shared: SharedTokenizer, on_release: Callable[[], None] | None = None
    ) -> None:
        self.shared = shared
        self._on_release = on_release
        self._lock = threading.Lock()

    @classmethod
    def unshared(cls, tokenizer: Any) -> TokenizerLease:
        """A lease on a tokenizer of its own, on no shelf."""
        return cls(SharedTokenizer(tokenizer))

    @property
    def tokenizer(self) -> Any:
        return self.shared.tokenizer

    def encode(self, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
        return self.shared.encode(texts, max_length)

    def release(self) -> None:
        with self._lock:
            on_release, self._on_release = self._on_release, None
        if on_release is not None:
            on_release()


@dataclass
class _InUse:
    shared: SharedTokenizer
    leases: int


class TokenizerShelf:
    """Tokenizers by `TokenizerKey`: those leased by loaded models, and up to `keep`
    released ones, least recently released dropped first. Thread-safe; concurrent
    acquires of one key build it once (the others wait for it)."""

    def __init__(self, keep: int = DEFAULT_KEEP) -> None:
        if keep < 0:
            raise ValueError("keep must be >= 0")
        self.keep = keep
        self._lock = threading.Lock()
        self._in_use: dict[TokenizerKey, _InUse] = {}
        self._idle: OrderedDict[TokenizerKey, SharedTokenizer] = OrderedDict()
        self._building: dict[TokenizerKey, threading.Event] = {}
        self.builds = 0
        self.reuses = 0

    def acquire(self, key: TokenizerKey, build: Callable[[], Any]) -> TokenizerLease:
        """A lease on the tokenizer for `key`: the one in use or kept, else `build()`'s.

        `build` runs outside the shelf's lock; what it raises is raised here (a waiter for
        a build that failed then tries its own)."""
        while True:
            with self._lock:
                lease = self._lease_existing(key)
                if lease is not None:
                    self.reuses += 1
                    return lease
                waiting = self._building.get(key)
                if waiting is None:
                    done = self._building[key] = threading.Event()
                    break
            waiting.wait()
        try:
            shared = SharedTokenizer(build())
        except BaseException:
            with self._lock:
                del self._building[key]
            done.set()
            raise
        with self._lock:
            del self._building[key]
            self._in_use[key] = _InUse(shared, 1)
            self.builds += 1
        done.set()
        return TokenizerLease(shared, lambda: self._release(key))

    def _lease_existing(self, key: TokenizerKey) -> TokenizerLease | None:
        entry = self._in_use.get(key)
        if entry is None:
            shared = self._idle.pop(key, None)
            if shared is None:
                return None
            entry = self._in_use[key] = _InUse(shared, 0)
        entry.leases += 1
        return TokenizerLease(entry.shared, lambda: self._release(key))

    def _release(self, key: TokenizerKey) -> None:
        dropped: list[SharedTokenizer] = []
        with self._lock:
            entry = self._in_use[key]
            entry.leases -= 1
            if entry.leases > 0:
                return
            del self._in_use[key]
            self._idle[key] = entry.shared
            while len(self._idle) > self.keep:
                dropped.append(self._idle.popitem(last=False)[1])
        # NOTE: the dropped tokenizers are freed here, outside the shelf's lock.
        del dropped

    def stats(self) -> dict[str, int]:
        """Counts for logs and tests: tokenizers in use, kept idle, built, reused."""
        with self._lock:
            return {
                "in_use": len(self._in_use),
                "idle": len(self._idle),
                "builds": self.builds,
                "reuses": self.reuses,
            }
