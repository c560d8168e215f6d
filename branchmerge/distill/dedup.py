"""Text fingerprints for the selection filters: exact keys, MinHash near-duplicates, n-gram contamination.

    words("What is 2+2?")                   -> ["what", "is", "2", "2"]   (lowercased \\w+ runs)
    exact_key(text)                          -> sha1 hex of the normalised text (whitespace/case folded)
    MinHashIndex(num_perm=64, bands=16, shingle=5, threshold=0.9)
        .add_if_new(key, text, group)        -> None if new, else the key of an earlier near-duplicate
    NgramIndex({"aime24": [texts]}, n=13, threshold=0.5, max_df=10)
        .match(text)                         -> (set_name, item_index, overlap) of the best eval item, or None

MinHash: each text is a set of word `shingle`-grams hashed to 64-bit ints h (shape (S,)); the signature
is min over shingles of (a_p * h + b_p) mod 2^64 >> 32 for p = 1..num_perm (shape (num_perm,)).
Locality-sensitive hashing splits the signature into `bands` bands; two texts sharing a band are
candidates, and a candidate counts as a duplicate when the fraction of equal signature entries (an
unbiased estimate of their Jaccard similarity) is at least `threshold`.

Contamination: an eval item with word n-grams E is found in a candidate with n-grams C when
|E ∩ C| / |E| >= threshold. N-grams shared by more than `max_df` eval items are template text (the
instruction every AIME prompt ends with, the toy world's sentence frames) and are ignored; an item
shorter than n words is one n-gram of all its words.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict

import numpy as np
import xxhash

from branchmerge.errors import ConfigError

_WORD = re.compile(r"\w+", re.UNICODE)


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def exact_key(text: str) -> str:
    return hashlib.sha1(" ".join(text.lower().split()).encode("utf-8")).hexdigest()


def ngrams(tokens: list[str], n: int) -> set[str]:
    """Word n-grams joined by spaces; a text shorter than n words is its single (shorter) n-gram."""
    if len(tokens) < n:
        return {" ".join(tokens)} if tokens else set()
    return {" ".join(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


class MinHashIndex:
    """Streaming near-duplicate detection: keep the first of each cluster, report later members."""

    def __init__(
        self, num_perm: int = 64, bands: int = 16, shingle: int = 5, threshold: float = 0.9, seed: int = 0
    ):
        if num_perm % bands:
            raise ConfigError(f"num_perm ({num_perm}) must be a multiple of bands ({bands})")
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, 2**63, size=num_perm, dtype=np.uint64) | np.uint64(1)
        self.b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
        self.bands, self.rows, self.shingle, self.threshold = bands, num_perm // bands, shingle, threshold
        self.buckets: list[dict[bytes, list[int]]] = [defaultdict(list) for _ in range(bands)]
        self.sigs: list[np.ndarray] = []
        self.keys: list[str] = []
        self.groups: list[str] = []

    def signature(self, text: str) -> np.ndarray:
        grams = ngrams(words(text), self.shingle) or {""}
        h = np.fromiter(
            (xxhash.xxh64_intdigest(g.encode("utf-8")) for g in grams), dtype=np.uint64, count=len(grams)
        )
        with np.errstate(over="ignore"):
            return ((self.a[:, None] * h[None, :] + self.b[:, None]) >> np.uint64(32)).min(axis=1)

    def add_if_new(self, key: str, text: str, group: str | None = None) -> str | None:
        """Add `text` unless it near-duplicates an earlier text of another group; return that text's key."""
        sig = self.signature(text)
        bands = [sig[i * self.rows : (i + 1) * self.rows].tobytes() for i in range(self.bands)]
        seen: set[int] = set()
        for band, bucket in zip(bands, self.buckets):
            for j in bucket.get(band, ()):
                if j in seen or (group is not None and self.groups[j] == group):
                    continue
                seen.add(j)
                if float(np.mean(self.sigs[j] == sig)) >= self.threshold:
                    return self.keys[j]
        idx = len(self.sigs)
        self.sigs.append(sig)
        self.keys.append(key)
        self.groups.append(group if group is not None else key)
        for band, bucket in zip(bands, self.buckets):
            bucket[band].append(idx)
        return None


class NgramIndex:
    """Evaluation items' word n-grams, to find a candidate text that contains most of one of them."""

    def __init__(
        self, eval_sets: dict[str, list[str]], n: int = 13, threshold: float = 0.5, max_df: int = 10
    ):
        self.n, self.threshold = n, threshold
        self.items: list[tuple[str, int, int]] = []  # (set name, index in set, number of kept n-grams)
        grams_of: list[set[str]] = []
        df: dict[str, int] = defaultdict(int)
        self.short: list[tuple[int, str]] = []  # items shorter than n words: matched as a phrase
        for name, texts in eval_sets.items():
            for i, text in enumerate(texts):
                toks = words(text)
                grams = ngrams(toks, n)
                if 0 < len(toks) < n:
                    self.short.append((len(self.items), f" {' '.join(toks)} "))
                grams_of.append(grams)
                self.items.append((name, i, 0))
                for g in grams:
                    df[g] += 1
        self.postings: dict[str, list[int]] = defaultdict(list)
        for j, grams in enumerate(grams_of):
            kept = [g for g in grams if df[g] <= max_df]
            name, i, _ = self.items[j]
            self.items[j] = (name, i, len(kept))
            for g in kept:
                self.postings[g].append(j)

    def __len__(self) -> int:
        return len(self.items)

    def match(self, text: str) -> tuple[str, int, float] | None:
        toks = words(text)
        hits: dict[int, int] = defaultdict(int)
        for g in ngrams(toks, self.n):
            for j in self.postings.get(g, ()):
                hits[j] += 1
        if self.short:
            joined = f" {' '.join(toks)} "
            for j, phrase in self.short:
                if phrase in joined:
                    hits[j] = max(hits[j], self.items[j][2] or 1)
        best = None
        for j, k in hits.items():
            name, i, total = self.items[j]
            frac = min(1.0, k / max(total, 1))
            if frac >= self.threshold and (best is None or frac > best[2]):
                best = (name, i, frac)
        return best
