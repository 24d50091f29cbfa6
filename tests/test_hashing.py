"""`shared.hashing` gives the same keys as the direct hashlib computations that named caches before it."""
from __future__ import annotations

import hashlib
import json

import numpy as np

from shared.hashing import content_key, parts_key


def test_string_key_is_the_sha256_of_its_utf8_bytes():
    text = "shards/0123abcd/split/0/0.1/ünï"
    assert content_key(text, 16) == hashlib.sha256(text.encode()).hexdigest()[:16]


def test_json_key_is_the_sha256_of_sorted_key_json():
    spec = {"teacher_step": 400, "eta": 0.05, "data": "digits", "shape": [1, 8, 8], "nested": {"b": 1, "a": None}}
    assert content_key(spec, 16) == hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    assert content_key(dict(reversed(list(spec.items()))), 16) == content_key(spec, 16)


def test_parts_key_is_the_sha256_of_the_concatenation():
    arrays = [np.arange(12, dtype=np.float32), np.ones(5, dtype=np.float32)]
    parts = [b"digits/1437/360"] + [a.tobytes() for a in arrays]
    digest = hashlib.sha256(parts[0])
    for part in parts[1:]:
        digest.update(part)
    assert parts_key(parts, 12) == digest.hexdigest()[:12]
    assert parts_key(parts, 16) == digest.hexdigest()[:16]
    assert content_key(b"".join(parts), 16) == digest.hexdigest()[:16]
