"""API keys: generated, hashed (`sha256:<hex>`), read from env vars or files, verified.

Keys are random tokens (`new_key()`: 256 bits), so one SHA-256 is a sound hash for them (a
slow password hash buys nothing against a 256-bit secret and would cost every request).
Config text holds only hashes; plain keys come from environment variables or files, read
once when the ingress starts. `KeyRing.find()` compares the presented key's hash with every
stored hash by `hmac.compare_digest`, without stopping at a match, so its time does not
depend on which key (if any) matched. Keys are never logged, returned or put in errors.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Generic, TypeVar

from serve_app.auth.settings import MIN_KEY_LENGTH

T = TypeVar("T")
HASH_PREFIX = "sha256:"


def new_key() -> str:
    """A fresh random key (43 URL-safe characters, 256 bits)."""
    return secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """`sha256:<hex>` of `key`: what config stores instead of the key."""
    return HASH_PREFIX + hashlib.sha256(key.encode()).hexdigest()


def check_length(key: str, where: str) -> str:
    """`key`, stripped; refuses keys shorter than MIN_KEY_LENGTH.

    Raises:
        ValueError: the key is too short (the message names `where`, never the key).
    """
    key = key.strip()
    if len(key) < MIN_KEY_LENGTH:
        raise ValueError(f"the key in {where} is shorter than {MIN_KEY_LENGTH} characters")
    return key


def read_hashes(hashes: Iterable[str], env: Iterable[str], files: Iterable[str]) -> list[str]:
    """Every key hash of a principal: given `hashes`, plus the hashes of the plain keys in
    the environment variables `env` and the files `files`.

    Raises:
        ValueError: a variable is unset, a file unreadable, or a key too short.
    """
    out = list(hashes)
    for name in env:
        value = os.environ.get(name)
        if not value:
            raise ValueError(f"environment variable {name} (a key source) is not set")
        out.append(hash_key(check_length(value, f"${name}")))
    for path in files:
        try:
            value = Path(path).read_text()
        except OSError as exc:
            raise ValueError(f"cannot read the key file {path}: {exc.strerror}") from None
        out.append(hash_key(check_length(value, path)))
    return out


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class KeyRing(Generic[T]):
    """Key hashes, each mapped to its owner; lookups in constant time per stored key."""

    def __init__(self) -> None:
        self._entries: list[tuple[bytes, T]] = []

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, key_hash: str, owner: T) -> None:
        """Add a `sha256:<hex>` hash owned by `owner`."""
        self._entries.append((bytes.fromhex(key_hash.removeprefix(HASH_PREFIX)), owner))

    def find(self, key: str | None) -> T | None:
        """The owner of `key`, or None. Compares with every stored hash (no early exit)."""
        if not key:
            return None
        digest = hashlib.sha256(key.encode()).digest()
        found: T | None = None
        for stored, owner in self._entries:
            if hmac.compare_digest(digest, stored) and found is None:
                found = owner
        return found
