"""Short content keys: the first hex characters of a sha256, the one way caches and fingerprints are named.

A key's bytes are fixed by its input: a string is hashed as its UTF-8 bytes, bytes as they are, any other
value as its canonical JSON (`json.dumps(value, sort_keys=True)`), and `parts_key` hashes a sequence of
byte strings as their concatenation without copying them. Keys already written to disk (run fingerprints,
cache names) depend on these rules, so they never change.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable


def parts_key(parts: Iterable[bytes], chars: int = 16) -> str:
    """First `chars` hex characters of the sha256 of the concatenated byte strings `parts` (fed in order)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()[:chars]


def content_key(value: Any, chars: int = 16) -> str:
    """First `chars` hex characters of the sha256 of `value`: a str as UTF-8, bytes as is, else sorted-key JSON."""
    if isinstance(value, str):
        data = value.encode()
    elif isinstance(value, bytes):
        data = value
    else:
        data = json.dumps(value, sort_keys=True).encode()
    return parts_key([data], chars)
