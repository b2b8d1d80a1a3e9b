"""The multi-hop QA data: an invented world, its passage collection and questions that chain
two or three of its facts. Everything is generated from a seed; nothing is downloaded.

The world: countries, cities (each in one country), people (each born in one city),
companies (each founded by one person) and inventions (each developed by one company). Every
fact is stated by exactly one passage, and each question starts at an entity the question
names and follows facts to the answer:

    birth_country             person -> city -> country                     2 hops
    founder_city              company -> founder -> city                    2 hops
    developer_founder         invention -> company -> founder               2 hops
    founder_country           company -> founder -> city -> country         3 hops
    developer_founder_city    invention -> company -> founder -> city       3 hops

Distractor passages name the same entities without stating a chain fact ("X was an early
investor in Y" next to "Y was founded by Z"), so a retriever that matches names alone finds
them too. Passage ids (`p042`) are shuffled, so they say nothing about what a passage holds.

A row is one task input: `question`, `answer`, `supporting` (the passage ids of the chain,
in hop order), `chain` (the entity names from the question's entity to the answer), `hops`,
`kind`, and `corpus_seed` / `corpus_size`, from which the agent rebuilds the same corpus
(`get_corpus`, cached in memory, built on first use so importing stays cheap).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable

DEFAULT_CORPUS_SIZE = 100  # people; the other entity counts scale with it (about 380 passages)

_ONSETS = ("b", "br", "c", "d", "dr", "f", "g", "gr", "h", "k", "kr", "l", "m", "n", "p", "pr", "r",
           "s", "sh", "st", "t", "tr", "v", "z")  # fmt: skip
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "ei", "ou")
_CODAS = ("", "n", "r", "l", "s", "m", "th", "nd")  # only after the last syllable: pronounceable names
_CITY_SUFFIXES = ("ford", "holm", "grad", "mere", "wick", "stad", "port", "haven", "burg", "dale")
_COUNTRY_SUFFIXES = ("ia", "land", "stan", "ora", "mark", "ovia")
_COMPANY_SUFFIXES = ("Works", "Dynamics", "Holdings", "Labs", "Industries", "Systems", "Foundry", "Company")
_INVENTION_NOUNS = ("loom", "engine", "lamp", "compass", "press", "valve", "pump", "battery", "kiln", "mill")
_JOBS = ("engineer", "chemist", "painter", "merchant", "architect", "teacher", "sailor", "astronomer", "weaver",
         "physician")  # fmt: skip
_CITY_FEATURES = ("an old harbour", "a famous clock tower", "salt markets", "an ancient university",
                  "many river bridges", "a spring festival", "glassworks", "a botanical garden")  # fmt: skip
_COUNTRY_FEATURES = ("mountain railways", "long winters", "fjords", "olive groves", "horse breeding", "copper mines",
                     "tea plantations", "salt lakes")  # fmt: skip
_PRODUCTS = ("looms", "ship engines", "lenses", "farm tools", "printing presses", "clocks", "radios", "scales")
_USES = ("weaves cloth", "keeps time", "pumps water", "prints books", "guides ships", "lights streets",
         "stores energy", "grinds grain")  # fmt: skip
# Passage templates. A fact passage names its subject twice, so a query with the subject's
# name ranks it above the passages that only mention it; all are short because three hops of
# passages must fit the tiny test model's 1024-token context.
_FACTS = {
    "country": "{k} is a country known for {a}. {k} also has {b}.",
    "city": "{c} is a city in {k}. {c} has {feature}.",
    "person": "{p} was born in {c}. {p} was {job}.",
    "company": "{y} was founded by {p}. {y} builds {product}.",
    "invention": "The {i} was developed by {y}. The {i} {use}.",
}
_DISTRACTORS = (
    "{p} once gave a lecture in {c} about the {i}.",  # p was not born in c
    "{p} was an early investor in {y}.",  # p did not found y
    "{y} opened a factory in {c} to repair the {i}.",  # y did not develop i
    "A museum in {c} displays an early model of the {i}.",
)

# Question kind -> (hops, question templates). `{e}` is the chain's first entity.
KINDS: dict[str, tuple[int, tuple[str, ...]]] = {
    "birth_country": (2, ("In which country was {e} born?", "{e} was born in a city of which country?")),
    "founder_city": (2, ("In which city was the founder of {e} born?", "Where was the person who founded {e} born?")),
    "developer_founder": (2, ("Who founded the company that developed the {e}?",)),
    "founder_country": (3, ("In which country was the founder of {e} born?",)),
    "developer_founder_city": (3, ("In which city was the founder of the company that developed the {e} born?",)),
}


@dataclass(frozen=True)
class Passage:
    pid: str
    text: str


@dataclass(frozen=True)
class Corpus:
    seed: int
    size: int
    passages: tuple[Passage, ...]
    # Every question this corpus supports, as rows (make_dataset samples from them).
    questions: tuple[dict[str, Any], ...]
    by_id: dict[str, Passage] = field(repr=False, compare=False)

    def text(self, pid: str) -> str:
        return self.by_id[pid].text


@dataclass
class _World:
    countries: list[str]
    cities: list[str]
    people: list[str]
    companies: list[str]
    inventions: list[str]
    city_country: dict[str, str] = field(default_factory=dict)
    birth_city: dict[str, str] = field(default_factory=dict)
    founder: dict[str, str] = field(default_factory=dict)
    developer: dict[str, str] = field(default_factory=dict)


class _Namer:
    """Invented names whose distinctive word is never reused, so an entity's name matches only
    the passages about it (first names are the exception: a small shared pool, as in life)."""

    def __init__(self, rng: random.Random, reserved: frozenset[str]) -> None:
        self.rng = rng
        self.used: set[str] = set(reserved)  # a name like "Has" would match every "C has ..." passage

    def stem(self, syllables: int) -> str:
        body = "".join(self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) for _ in range(syllables))
        return body + self.rng.choice(_CODAS)

    def unique(self, make: Callable[[], str]) -> str:
        for _ in range(10_000):
            word = make()
            if word.lower() not in self.used:
                self.used.add(word.lower())
                return word
        raise RuntimeError("ran out of invented names")  # never with the syllable inventory above

    def many(self, n: int, make: Callable[[], str]) -> list[str]:
        return [self.unique(make) for _ in range(n)]


def _reserved_words() -> frozenset[str]:
    """Every word of the fixed text (templates, questions, vocabularies): never a name."""
    fixed = [*_CITY_SUFFIXES, *_COUNTRY_SUFFIXES, *_COMPANY_SUFFIXES, *_INVENTION_NOUNS, *_JOBS, *_CITY_FEATURES,
             *_COUNTRY_FEATURES, *_PRODUCTS, *_USES, *_FACTS.values(), *_DISTRACTORS,
             *(t for _, ts in KINDS.values() for t in ts)]  # fmt: skip
    return frozenset(w for text in fixed for w in re.findall(r"[a-z]+", re.sub(r"\{\w+\}", " ", text).lower()))


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _build_world(rng: random.Random, size: int) -> _World:
    namer = _Namer(rng, _reserved_words())
    n_countries, n_cities, n_things = max(3, size // 8), max(6, size // 3), max(3, size * 2 // 3)

    def word() -> str:
        return namer.unique(lambda: namer.stem(2).capitalize())

    countries = namer.many(n_countries, lambda: namer.stem(2).capitalize() + rng.choice(_COUNTRY_SUFFIXES))
    cities = namer.many(n_cities, lambda: namer.stem(2).capitalize() + rng.choice(_CITY_SUFFIXES))
    # First names are one syllable: names are most of a passage's tokens, and the tiny test
    # model's context must hold nine passages.
    first_names = namer.many(max(5, size // 4), lambda: namer.stem(1).capitalize())
    w = _World(
        countries,
        cities,
        people=[f"{rng.choice(first_names)} {word()}" for _ in range(size)],
        companies=[f"{word()} {rng.choice(_COMPANY_SUFFIXES)}" for _ in range(n_things)],
        inventions=[f"{word()} {rng.choice(_INVENTION_NOUNS)}" for _ in range(n_things)],
    )
    # Round-robin first so every country has a city and every city (nearly) a native.
    w.city_country = {c: countries[i] if i < n_countries else rng.choice(countries) for i, c in enumerate(cities)}
    w.birth_city = {p: cities[i] if i < n_cities else rng.choice(cities) for i, p in enumerate(w.people)}
    w.founder = {y: rng.choice(w.people) for y in w.companies}
    w.developer = {i: rng.choice(w.companies) for i in w.inventions}
    return w


def _fact_passages(rng: random.Random, w: _World) -> dict[tuple[str, str], str]:
    """(kind, entity) -> the passage stating that entity's fact."""
    out: dict[tuple[str, str], str] = {}
    for k in w.countries:
        a, b = rng.sample(_COUNTRY_FEATURES, 2)
        out[("country", k)] = _FACTS["country"].format(k=k, a=a, b=b)
    for c, k in w.city_country.items():
        out[("city", c)] = _FACTS["city"].format(c=c, k=k, feature=rng.choice(_CITY_FEATURES))
    for p, c in w.birth_city.items():
        job = rng.choice(_JOBS)
        out[("person", p)] = _FACTS["person"].format(p=p, c=c, job=f"{_article(job)} {job}")
    for y, p in w.founder.items():
        out[("company", y)] = _FACTS["company"].format(y=y, p=p, product=rng.choice(_PRODUCTS))
    for i, y in w.developer.items():
        out[("invention", i)] = _FACTS["invention"].format(i=i, y=y, use=rng.choice(_USES))
    return out


def _distractors(rng: random.Random, w: _World, n: int) -> list[str]:
    """Passages that mention question entities but state no chain fact: never a person with
    their birth city, a company with its founder, or an invention with its developer."""
    out: list[str] = []
    while len(out) < n:
        template = _DISTRACTORS[len(out) % len(_DISTRACTORS)]
        p, y, c, i = rng.choice(w.people), rng.choice(w.companies), rng.choice(w.cities), rng.choice(w.inventions)
        if c == w.birth_city[p] or p == w.founder[y] or y == w.developer[i]:
            continue  # this draw would state (or suggest) a fact: draw again
        out.append(template.format(p=p, y=y, c=c, i=i))
    return out


def _questions(rng: random.Random, w: _World, pid: dict[tuple[str, str], str], seed: int, size: int
               ) -> list[dict[str, Any]]:  # fmt: skip
    chains: list[tuple[str, list[tuple[str, str]]]] = []  # (kind, [(passage kind, entity), ...] + ("", answer))
    for p in w.people:
        c = w.birth_city[p]
        chains.append(("birth_country", [("person", p), ("city", c), ("", w.city_country[c])]))
    for y in w.companies:
        p = w.founder[y]
        c = w.birth_city[p]
        chains.append(("founder_city", [("company", y), ("person", p), ("", c)]))
        chains.append(("founder_country", [("company", y), ("person", p), ("city", c), ("", w.city_country[c])]))
    for i in w.inventions:
        y = w.developer[i]
        p = w.founder[y]
        chains.append(("developer_founder", [("invention", i), ("company", y), ("", p)]))
        chains.append(
            ("developer_founder_city", [("invention", i), ("company", y), ("person", p), ("", w.birth_city[p])])
        )
    rows = []
    for kind, chain in chains:
        hops, templates = KINDS[kind]
        rows.append({
            "question": rng.choice(templates).format(e=chain[0][1]),
            "answer": chain[-1][1],
            "supporting": [pid[step] for step in chain[:-1]],
            "chain": [entity for _, entity in chain],
            "hops": hops,
            "kind": kind,
            "corpus_seed": seed,
            "corpus_size": size,
        })  # fmt: skip
    return rows


def build_corpus(seed: int = 0, size: int = DEFAULT_CORPUS_SIZE) -> Corpus:
    """The passage collection and every question of the world generated from `seed`, with
    `size` people (a few hundred passages for the default)."""
    if size < 4:
        raise ValueError(f"corpus_size must be at least 4, got {size}")
    rng = random.Random(seed)
    world = _build_world(rng, size)
    texts: list[tuple[tuple[str, str] | None, str]] = list(_fact_passages(rng, world).items())
    texts += [(None, text) for text in _distractors(rng, world, size)]
    rng.shuffle(texts)
    width = max(3, len(str(len(texts) - 1)))
    passages = tuple(Passage(f"p{i:0{width}d}", text) for i, (_, text) in enumerate(texts))
    pid = {key: p.pid for (key, _), p in zip(texts, passages) if key is not None}
    questions = tuple(_questions(rng, world, pid, seed, size))
    return Corpus(seed, size, passages, questions, {p.pid: p for p in passages})


@lru_cache(maxsize=8)
def get_corpus(seed: int = 0, size: int = DEFAULT_CORPUS_SIZE) -> Corpus:
    """`build_corpus`, cached in memory: every rollout of a worker reuses one corpus per seed."""
    return build_corpus(seed, size)


def make_dataset(n: int, seed: int = 0, corpus_size: int = DEFAULT_CORPUS_SIZE) -> list[dict[str, Any]]:
    """`n` question rows over the corpus of `seed`, deterministic. Rows are a shuffle of every
    question the corpus supports; past that many, another shuffle follows (questions repeat)."""
    pool = list(get_corpus(seed, corpus_size).questions)
    rng = random.Random(seed + 7919)  # a stream apart from the corpus's own
    rows: list[dict[str, Any]] = []
    while len(rows) < n:
        block = list(pool)
        rng.shuffle(block)
        rows.extend(dict(row, supporting=list(row["supporting"]), chain=list(row["chain"])) for row in block)
    return rows[:n]


if __name__ == "__main__":  # regenerate the committed rows: python -m examples.multihop_rag.data
    import json
    from pathlib import Path

    out = Path(__file__).with_name("rows.jsonl")
    out.write_text("".join(json.dumps(row) + "\n" for row in make_dataset(300, seed=0)))
    print(f"wrote {out}")
