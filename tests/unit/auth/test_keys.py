"""Keys: hashing, sources (env vars, files), length rule, constant-time lookup."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import pytest

from serve_app.auth import keys
from serve_app.auth.keys import KeyRing, bearer_token, hash_key, new_key, read_hashes


def test_hash_is_sha256_hex_with_prefix_and_keys_are_random() -> None:
    key = new_key()
    assert len(key) >= 43
    assert key != new_key()
    assert hash_key(key) == "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def test_plain_keys_come_from_env_and_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    a, b = new_key(), new_key()
    monkeypatch.setenv("TENANT_A_KEY", a)
    (tmp_path / "b.key").write_text(b + "\n")
    got = read_hashes([hash_key("x" * 20)], ["TENANT_A_KEY"], [str(tmp_path / "b.key")])
    assert got == [hash_key("x" * 20), hash_key(a), hash_key(b)]


@pytest.mark.parametrize("problem", ["unset", "short", "missing file"])
def test_bad_key_sources_fail_without_showing_the_key(
    problem: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    monkeypatch.setenv("SHORT_KEY", "tiny-secret")
    sources = {
        "unset": (["NO_SUCH_KEY"], []),
        "short": (["SHORT_KEY"], []),
        "missing file": ([], [str(tmp_path / "absent")]),
    }[problem]
    with pytest.raises(ValueError, match="key") as caught:
        read_hashes([], *sources)
    assert "tiny-secret" not in str(caught.value)


def test_bearer_token() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer  abc ") == "abc"
    assert bearer_token("Basic abc") is None
    assert bearer_token("Bearer ") is None
    assert bearer_token(None) is None


def test_key_ring_finds_owners_and_compares_every_key(monkeypatch: pytest.MonkeyPatch) -> None:
    ring: KeyRing[str] = KeyRing()
    first, second = new_key(), new_key()
    ring.add(hash_key(first), "one")
    ring.add(hash_key(second), "two")
    compared = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        compared.append(b)
        return real(a, b)

    monkeypatch.setattr(keys.hmac, "compare_digest", counting)
    assert ring.find(first) == "one"
    assert len(compared) == 2  # no early exit on the first match
    assert ring.find(second) == "two"
    assert ring.find("not-a-key-of-ours-at-all") is None
    assert ring.find("") is None
    assert ring.find(None) is None
