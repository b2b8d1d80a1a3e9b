"""BM25 retrieval over a corpus's passages (`rank_bm25.BM25Okapi`), with the simplest tokenizer
that works for invented names: lowercase words of letters and digits."""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Sequence

from examples.multihop_rag.data import Passage, get_corpus

TOP_K = 3
_WORD = re.compile(r"[a-z0-9]+")


def tokenize(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class Retriever:
    def __init__(self, passages: Sequence[Passage]) -> None:
        # Imported here, not at module top: every rollout worker imports the agent module at
        # start, and that import must stay cheap.
        from rank_bm25 import BM25Okapi

        self.ids = [p.pid for p in passages]
        self.bm25 = BM25Okapi([tokenize(p.text) for p in passages])

    def search(self, query: str, k: int = TOP_K) -> list[str]:
        """Ids of the `k` best passages for `query`, best first (ties: corpus order). Passages
        sharing no word with the query score 0 and are never returned, so a query of unknown
        words retrieves nothing rather than arbitrary passages."""
        words = tokenize(query)
        if not words:
            return []
        scores = self.bm25.get_scores(words)
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
        return [self.ids[i] for i in order[:k] if scores[i] > 0]


@lru_cache(maxsize=8)
def get_retriever(seed: int, size: int) -> Retriever:
    """One index per corpus, built on first use and shared by every rollout of this worker."""
    return Retriever(get_corpus(seed, size).passages)
