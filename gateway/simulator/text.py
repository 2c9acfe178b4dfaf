"""Deterministic content: the same (seed, request) gives the same tokens, ids and vectors.

Tests compare bodies byte for byte (a gateway that assembles a stream into a non-streaming body
must produce exactly what a non-streaming request returns), so nothing here uses global randomness.
The request key leaves out ``stream``, ``stream_options`` and ``ttl``: a streamed request and its
non-streamed twin get the same id and the same words.

Token counting is deliberately crude and documented (one token per four characters, rounded up),
so a test can build a prompt that overflows a context of M tokens: ``"x" * 4 * (M + 1)``.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import string
from typing import Any

_TEXT = (
    "the model answers with plain words that carry no meaning but keep a steady rhythm so a gateway "
    "can count tokens measure time and compare bodies across streamed and whole responses while local "
    "servers load weights warm caches and schedule requests on parallel slots under a simulated clock"
)
_WORDS = _TEXT.split()
_ID_ALPHABET = string.ascii_lowercase + string.digits
_IGNORED_FIELDS = frozenset({"stream", "stream_options", "ttl"})


def request_key(seed: int, route: str, body: dict[str, Any]) -> str:
    """A stable digest of what determines the answer."""
    relevant = {k: v for k, v in body.items() if k not in _IGNORED_FIELDS}
    canonical = json.dumps([seed, route, relevant], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _rng(key: str, purpose: str) -> random.Random:
    return random.Random(hashlib.sha256(f"{purpose}:{key}".encode()).digest())


def make_id(key: str, prefix: str, length: int = 21) -> str:
    """``chatcmpl-`` plus lowercase alphanumerics, as LM Studio's ids look."""
    rng = _rng(key, "id")
    return prefix + "".join(rng.choice(_ID_ALPHABET) for _ in range(length))


def pieces(key: str, purpose: str, count: int) -> list[str]:
    """``count`` tokens of sentence-like text: words with a leading space, capitals, full stops."""
    rng = _rng(key, purpose)
    out: list[str] = []
    sentence_left = 0
    for index in range(count):
        word = rng.choice(_WORDS)
        if sentence_left == 0:
            word = word.capitalize()
            sentence_left = rng.randint(6, 12)
        sentence_left -= 1
        if sentence_left == 0 or index == count - 1:
            word += "."
        out.append(word if index == 0 else " " + word)
    return out


def count_tokens(text: str) -> int:
    """The simulator's tokenizer: ceil(characters / 4)."""
    return math.ceil(len(text) / 4)


def embedding(key: str, text: str, dimensions: int) -> list[float]:
    """A unit vector derived from (key, text), rounded like LM Studio's JSON floats."""
    rng = _rng(key, "embedding:" + text)
    raw = [rng.gauss(0.0, 1.0) for _ in range(dimensions)]
    norm = math.sqrt(sum(v * v for v in raw)) or 1.0
    return [round(v / norm, 8) for v in raw]
