"""The vision bench's traffic: Zipf draws over a shuffled ranking, reproducible by seed."""

from __future__ import annotations

from collections import Counter

from bench.vision import demo_image, zipf_sequence


def test_zipf_sequence_is_skewed_and_seeded() -> None:
    ids = [f"m{i}" for i in range(60)]
    sequence = zipf_sequence(ids, 6000, 1.1, seed=3)
    assert sequence == zipf_sequence(ids, 6000, 1.1, seed=3)
    counts = Counter(sequence).most_common()
    assert counts[0][1] > 10 * counts[-1][1]  # the head is far hotter than the tail


def test_demo_image_is_a_small_jpeg() -> None:
    data = demo_image(1)
    assert data[:2] == b"\xff\xd8"
    assert len(data) < 20_000
