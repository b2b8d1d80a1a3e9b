"""Multi-hop retrieval QA: an agent that searches an invented passage collection with BM25 over
up to three hops (query -> retrieve -> decide), then answers; rewarded by answer format and
SQuAD-style word F1. Everything (corpus, questions) is generated from a seed in `data.py`."""
