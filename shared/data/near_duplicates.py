"""Near-duplicate examples: MinHash signatures of word 3-grams, with locality-sensitive banding.

Exact duplicates are counted by hashing whole examples; near duplicates (the same conversation with
a changed word or two, a common leak between train and validation data and a common source of
overfitting) need a similarity. Two examples whose estimated Jaccard similarity of word 3-grams is at
least `threshold` count as near duplicates. Memory and time are bounded: only the first
`max_examples` examples are compared.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

NUM_PERMUTATIONS = 64
BANDS = 16  # 16 bands of 4 rows: pairs above ~0.5 similarity become candidates, then are checked
ROWS = NUM_PERMUTATIONS // BANDS
_PRIME = (1 << 61) - 1
_RNG = np.random.default_rng(20261128)
_A = _RNG.integers(1, _PRIME, size=NUM_PERMUTATIONS, dtype=np.uint64)
_B = _RNG.integers(0, _PRIME, size=NUM_PERMUTATIONS, dtype=np.uint64)
_WORD = re.compile(r"\w+")
SHOWN_PAIRS = 5


def _signature(text: str) -> np.ndarray | None:
    words = _WORD.findall(text.lower())
    if len(words) < 3:
        return None  # too short to call two of them "nearly" the same
    shingles = {" ".join(words[i : i + 3]) for i in range(len(words) - 2)}
    hashes = np.array(
        [int.from_bytes(hashlib.blake2b(s.encode(), digest_size=7).digest(), "big") for s in shingles],
        dtype=np.uint64,
    )
    # (a·h + b) mod p with 64-bit wrap-around: a fast universal-enough family for MinHash.
    return ((_A[:, None] * hashes[None, :] + _B[:, None]) % np.uint64(_PRIME)).min(axis=1)


class NearDuplicates:
    def __init__(self, threshold: float = 0.8, max_examples: int = 50_000):
        self.threshold = threshold
        self.max_examples = max_examples
        self.seen = 0
        self.buckets: list[dict[bytes, int]] = [{} for _ in range(BANDS)]
        self.signatures: list[np.ndarray] = []
        self.sources: list[str] = []
        self.count = 0
        self.pairs: list[tuple[str, str]] = []

    def add(self, text: str, source: str) -> None:
        if self.seen >= self.max_examples:
            return
        self.seen += 1
        signature = _signature(text)
        if signature is None:
            return
        index = len(self.signatures)
        match = None
        for band, bucket in enumerate(self.buckets):
            key = signature[band * ROWS : (band + 1) * ROWS].tobytes()
            other = bucket.get(key)
            similar = (
                other is not None and float((self.signatures[other] == signature).mean()) >= self.threshold
            )
            if similar and match is None:
                match = other
            bucket.setdefault(key, index)
        self.signatures.append(signature)
        self.sources.append(source)
        if match is not None:
            self.count += 1
            if len(self.pairs) < SHOWN_PAIRS:
                self.pairs.append((self.sources[match], source))

    def result(self) -> dict:
        return {
            "near_duplicates": self.count,
            "near_duplicate_pairs": [list(p) for p in self.pairs],
            "compared_examples": self.seen,
            "similarity_threshold": self.threshold,
        }
