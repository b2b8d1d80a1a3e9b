"""The example's SQLite databases: schemas and contents generated from code, built on first use.

Three databases, three tables each, small enough that their CREATE statements fit a small
model's context next to a question:

- `shop`: customers, products, orders (one product per order line);
- `school`: students, courses, enrollments;
- `library`: authors, books, loans.

A database's contents depend only on its `db_id` (each one has a fixed seed), so a dataset row
needs nothing but the `db_id` to find its database: `database_path(db_id)` returns the file,
building it first when it is missing. Files go to a cache directory (`cache_dir()`), named by a
hash of the schema and the rows, and appear by an atomic rename: concurrent rollout workers
either find a complete file or build an identical one, and a change to the generator gives a
new file instead of silently reusing a stale one. No database file is committed.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import random
import sqlite3
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable

Row = tuple[Any, ...]
Tables = dict[str, list[Row]]

# Bump when the generator changes in a way the content hash would not see (it sees every row).
FORMAT_VERSION = 1
CACHE_ENV = "RELAYRL_EXAMPLES_CACHE"

SCHEMAS: dict[str, tuple[str, ...]] = {
    "shop": (
        "CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT NOT NULL, city TEXT NOT NULL,"
        " signup_year INTEGER NOT NULL)",
        "CREATE TABLE products (id INTEGER PRIMARY KEY, name TEXT NOT NULL, category TEXT NOT NULL,"
        " price REAL NOT NULL)",
        "CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER NOT NULL REFERENCES customers(id),"
        " product_id INTEGER NOT NULL REFERENCES products(id), quantity INTEGER NOT NULL,"
        " order_year INTEGER NOT NULL, status TEXT NOT NULL)",
    ),
    "school": (
        "CREATE TABLE students (id INTEGER PRIMARY KEY, name TEXT NOT NULL, major TEXT NOT NULL,"
        " enrollment_year INTEGER NOT NULL)",
        "CREATE TABLE courses (id INTEGER PRIMARY KEY, title TEXT NOT NULL, department TEXT NOT NULL,"
        " credits INTEGER NOT NULL)",
        "CREATE TABLE enrollments (student_id INTEGER NOT NULL REFERENCES students(id),"
        " course_id INTEGER NOT NULL REFERENCES courses(id), term TEXT NOT NULL, grade INTEGER NOT NULL,"
        " PRIMARY KEY (student_id, course_id))",
    ),
    "library": (
        "CREATE TABLE authors (id INTEGER PRIMARY KEY, name TEXT NOT NULL, country TEXT NOT NULL,"
        " birth_year INTEGER NOT NULL)",
        "CREATE TABLE books (id INTEGER PRIMARY KEY, title TEXT NOT NULL, author_id INTEGER NOT NULL"
        " REFERENCES authors(id), genre TEXT NOT NULL, published_year INTEGER NOT NULL, pages INTEGER NOT NULL)",
        "CREATE TABLE loans (id INTEGER PRIMARY KEY, book_id INTEGER NOT NULL REFERENCES books(id),"
        " member TEXT NOT NULL, loan_year INTEGER NOT NULL, returned INTEGER NOT NULL)",
    ),
}
DB_IDS: tuple[str, ...] = tuple(SCHEMAS)

# Value pools. No apostrophes: generated questions quote values in SQL string literals.
FIRST_NAMES = (
    "Ada", "Ben", "Cora", "Dev", "Elena", "Farid", "Grace", "Hugo", "Iris", "Jonas", "Kira", "Liam",
    "Maya", "Nils", "Olga", "Pablo", "Quinn", "Rosa", "Sami", "Tara", "Umar", "Vera", "Wes", "Yara",
)  # fmt: skip
LAST_NAMES = (
    "Adams", "Berg", "Chen", "Diaz", "Evans", "Fischer", "Garcia", "Hansen", "Ito", "Jones", "Khan",
    "Lopez", "Moreau", "Novak", "Okafor", "Patel", "Rossi", "Silva", "Tanaka", "Weber",
)  # fmt: skip
CITIES = ("Austin", "Berlin", "Cairo", "Dublin", "Lima", "Madrid", "Osaka", "Toronto")
PRODUCT_WORDS = {
    "books": ("Atlas", "Cookbook", "Diary", "Novel", "Journal"),
    "electronics": ("Camera", "Headset", "Monitor", "Router", "Speaker"),
    "garden": ("Hose", "Rake", "Planter", "Shovel", "Sprinkler"),
    "kitchen": ("Blender", "Kettle", "Skillet", "Toaster", "Whisk"),
    "toys": ("Kite", "Puzzle", "Robot", "Yo-yo", "Train"),
    "sports": ("Ball", "Helmet", "Racket", "Skates", "Tent"),
}
PRODUCT_ADJECTIVES = ("Basic", "Classic", "Compact", "Deluxe", "Pro", "Smart")
ORDER_STATUSES = ("delivered", "delivered", "delivered", "shipped", "shipped", "cancelled", "returned")
MAJORS = ("Biology", "Computer Science", "Economics", "History", "Mathematics", "Physics")
COURSES = {
    "Biology": ("Genetics", "Ecology", "Cell Biology"),
    "Computer Science": ("Databases", "Algorithms", "Operating Systems"),
    "Economics": ("Microeconomics", "Econometrics"),
    "History": ("Ancient Rome", "Modern Europe", "World Wars"),
    "Mathematics": ("Linear Algebra", "Calculus", "Statistics"),
    "Physics": ("Mechanics", "Optics", "Quantum Physics"),
}
TERMS = ("Fall 2023", "Spring 2024", "Fall 2024")
COUNTRIES = ("Brazil", "Canada", "France", "India", "Japan", "Kenya", "Norway", "Peru")
GENRES = ("fantasy", "fiction", "history", "mystery", "poetry", "science")
TITLE_FIRST = ("Silent", "Hidden", "Broken", "Golden", "Last", "Distant", "Secret", "Frozen", "Burning", "Quiet")
TITLE_SECOND = ("River", "Garden", "Empire", "Winter", "Harbor", "Mountain", "Letter", "Orchard", "Bridge", "Island")
MEMBERS = ("Alba", "Bruno", "Chloe", "Dario", "Emil", "Fiona", "Gus", "Hana", "Ivan", "Jade", "Kofi", "Lena")


def _people(rng: random.Random, n: int) -> list[str]:
    """`n` distinct "First Last" names."""
    pairs = rng.sample(list(itertools.product(FIRST_NAMES, LAST_NAMES)), n)
    return [f"{first} {last}" for first, last in pairs]


def _shop(rng: random.Random) -> Tables:
    customers = [
        (i, name, rng.choice(CITIES), rng.randint(2015, 2024)) for i, name in enumerate(_people(rng, 40), start=1)
    ]
    names = [
        (cat, f"{adj} {noun}") for cat, nouns in PRODUCT_WORDS.items() for adj in PRODUCT_ADJECTIVES for noun in nouns
    ]
    chosen = rng.sample(names, 30)
    # Distinct prices: "the most expensive product" and top-k questions then have one answer.
    cents = rng.sample(range(199, 49999, 100), len(chosen))
    products = [(i, name, cat, c / 100) for i, ((cat, name), c) in enumerate(zip(chosen, cents), start=1)]
    # Customers 37-40 never order, so "customers without orders" has answers.
    orders = [
        (i, rng.randint(1, 36), rng.randint(1, len(products)), rng.randint(1, 5), rng.randint(2019, 2024),
         rng.choice(ORDER_STATUSES))
        for i in range(1, 161)
    ]  # fmt: skip
    return {"customers": customers, "products": products, "orders": orders}


def _school(rng: random.Random) -> Tables:
    students = [
        (i, name, rng.choice(MAJORS), rng.randint(2019, 2024)) for i, name in enumerate(_people(rng, 50), start=1)
    ]
    titles = [(dept, title) for dept, ts in COURSES.items() for title in ts]
    courses = [(i, title, dept, rng.randint(2, 5)) for i, (dept, title) in enumerate(titles, start=1)]
    enrollments = []
    for sid, *_ in students:
        for cid in sorted(rng.sample(range(1, len(courses) + 1), rng.randint(2, 6))):
            enrollments.append((sid, cid, rng.choice(TERMS), rng.randint(45, 100)))
    return {"students": students, "courses": courses, "enrollments": enrollments}


def _library(rng: random.Random) -> Tables:
    authors = [
        (i, name, rng.choice(COUNTRIES), rng.randint(1920, 1990)) for i, name in enumerate(_people(rng, 20), start=1)
    ]
    titles = rng.sample([f"The {a} {b}" for a in TITLE_FIRST for b in TITLE_SECOND], 60)
    pages = rng.sample(range(90, 900), len(titles))  # distinct: "the longest book" has one answer
    books = [
        (i, title, rng.randint(1, len(authors)), rng.choice(GENRES), rng.randint(1950, 2023), p)
        for i, (title, p) in enumerate(zip(titles, pages), start=1)
    ]
    loans = [
        (i, rng.randint(1, len(books)), rng.choice(MEMBERS), rng.randint(2020, 2024), int(rng.random() < 0.8))
        for i in range(1, 181)
    ]
    return {"authors": authors, "books": books, "loans": loans}


_GENERATORS: dict[str, Callable[[random.Random], Tables]] = {"shop": _shop, "school": _school, "library": _library}
# One fixed seed per database: its contents are a function of its db_id alone.
_SEEDS = {"shop": 11, "school": 23, "library": 37}


def _check_db_id(db_id: str) -> None:
    if db_id not in SCHEMAS:
        raise KeyError(f"unknown db_id {db_id!r}; the generated databases are {list(DB_IDS)}")


@functools.lru_cache(maxsize=None)
def table_rows(db_id: str) -> Tables:
    """Every table's rows of database `db_id`, in insertion order (deterministic)."""
    _check_db_id(db_id)
    return _GENERATORS[db_id](random.Random(f"text-to-sql:{db_id}:{_SEEDS[db_id]}"))


@functools.lru_cache(maxsize=None)
def content_hash(db_id: str) -> str:
    """sha256 over the format version, the schema and every row of `db_id`."""
    payload = json.dumps([FORMAT_VERSION, SCHEMAS[db_id], table_rows(db_id)], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def cache_dir() -> Path:
    """Where generated databases live: `$RELAYRL_EXAMPLES_CACHE/text_to_sql`, else under the temp dir."""
    root = os.environ.get(CACHE_ENV) or os.path.join(tempfile.gettempdir(), "relayrl-examples")
    return Path(root) / "text_to_sql"


def fill(conn: sqlite3.Connection, db_id: str) -> None:
    """Create `db_id`'s tables in `conn` and insert its rows."""
    for statement in SCHEMAS[db_id]:
        conn.execute(statement)
    for table, rows in table_rows(db_id).items():
        if rows:
            marks = ", ".join("?" * len(rows[0]))
            conn.executemany(f"INSERT INTO {table} VALUES ({marks})", rows)
    conn.commit()


def memory_database(db_id: str) -> sqlite3.Connection:
    """An in-memory copy of `db_id` (the dataset generator reads it; nothing touches the cache)."""
    _check_db_id(db_id)
    conn = sqlite3.connect(":memory:")
    fill(conn, db_id)
    return conn


def generated_path(db_id: str) -> Path:
    """Where generated database `db_id` lives in `cache_dir()` (built or not: nothing is touched)."""
    _check_db_id(db_id)
    return cache_dir() / f"{db_id}-{content_hash(db_id)[:16]}.sqlite"


def database_path(db_id: str) -> Path:
    """The SQLite file of generated database `db_id`, built into `cache_dir()` if it is missing."""
    path = generated_path(db_id)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        conn = sqlite3.connect(tmp)
        try:
            fill(conn, db_id)
        finally:
            conn.close()
        # Atomic: readers see no file or a complete one. Two racing builders write the same bytes'
        # worth of rows, so whichever rename lands last is as good as the first.
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
