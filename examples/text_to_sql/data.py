"""The example's dataset: questions with gold SQL, from templates over the generated databases.

Each row is one agent input:

    {"db_id": "shop", "question": "How many customers live in Lima?",
     "gold_sql": "SELECT COUNT(*) FROM customers WHERE city = 'Lima'", "kind": "count"}

`db_id` names a database of `databases.py` (the agent finds the file with
`database_path(db_id)`); `kind` is the template family, for slicing results: count, filter,
aggregate, join, group_by, order_limit, nested.

Templates read the database to pick their values, and reject a pick whose question would be
ambiguous, so every gold query has one right answer:

- its result is non-empty and not a lone NULL or 0;
- top-k questions have no tie at the k-th place (else two correct queries could disagree);
- "list the X of ..." questions have no duplicate X in the answer (else DISTINCT or not would
  both be defensible).

`make_dataset(n, seed)` is deterministic for `seed`; rows cycle shop, school, library and,
within a database, through its templates in a shuffled order, so every slice of the file mixes
databases and kinds. Questions do not repeat.

    python -m examples.text_to_sql.data --n 300 --seed 0 --out examples/text_to_sql/rows.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from examples.text_to_sql.databases import DB_IDS, memory_database

Pick = Optional[tuple[str, str]]  # (question, gold SQL), or None: this pick was ambiguous, try again


class Db:
    """Read helpers over one in-memory database for the templates."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        return self.conn.execute(sql).fetchall()

    def column(self, sql: str) -> list[Any]:
        return [r[0] for r in self.rows(sql)]

    def choice(self, rng: random.Random, sql: str) -> Any:
        """One value of `sql`'s first column, picked by `rng` (rows sorted first: deterministic)."""
        return rng.choice(sorted(set(self.column(sql))))


@dataclass(frozen=True)
class Template:
    db_id: str
    kind: str
    fill: Callable[[random.Random, Db], Pick]


def lit(value: str) -> str:
    """A SQL string literal."""
    return "'" + value.replace("'", "''") + "'"


def strict_top(keys: list[Any], k: int) -> bool:
    """`keys` sorted best first (at least k+1 of them when there are): the k-th is not tied with the next."""
    return len(keys) >= k and (len(keys) == k or keys[k - 1] != keys[k])


def no_duplicates(db: Db, sql: str) -> bool:
    values = db.rows(sql)
    return len(values) == len(set(values))


TEMPLATES: list[Template] = []


def template(db_id: str, kind: str) -> Callable[[Callable[[random.Random, Db], Pick]], Callable[..., Pick]]:
    def register(fill: Callable[[random.Random, Db], Pick]) -> Callable[..., Pick]:
        TEMPLATES.append(Template(db_id, kind, fill))
        return fill

    return register


# --- shop -------------------------------------------------------------------------------


@template("shop", "count")
def _shop_city_count(rng: random.Random, db: Db) -> Pick:
    city = db.choice(rng, "SELECT city FROM customers")
    return f"How many customers live in {city}?", f"SELECT COUNT(*) FROM customers WHERE city = {lit(city)}"


@template("shop", "count")
def _shop_year_orders(rng: random.Random, db: Db) -> Pick:
    year = db.choice(rng, "SELECT order_year FROM orders")
    status = rng.choice(["delivered", "cancelled", "returned", "shipped"])
    return (
        f"How many orders placed in {year} have the status {status}?",
        f"SELECT COUNT(*) FROM orders WHERE order_year = {year} AND status = {lit(status)}",
    )


@template("shop", "filter")
def _shop_cheap_products(rng: random.Random, db: Db) -> Pick:
    category = db.choice(rng, "SELECT category FROM products")
    price = rng.choice([50, 100, 150, 200, 300])
    sql = f"SELECT name FROM products WHERE category = {lit(category)} AND price < {price}"
    return f"List the names of the products in the {category} category that cost less than {price} dollars.", sql


@template("shop", "filter")
def _shop_recent_customers(rng: random.Random, db: Db) -> Pick:
    year = rng.randint(2019, 2023)
    city = db.choice(rng, "SELECT city FROM customers")
    return (
        f"Which customers from {city} signed up after {year}? Give their names.",
        f"SELECT name FROM customers WHERE city = {lit(city)} AND signup_year > {year}",
    )


@template("shop", "aggregate")
def _shop_avg_price(rng: random.Random, db: Db) -> Pick:
    category = db.choice(rng, "SELECT category FROM products")
    fn, word = rng.choice([("AVG", "average"), ("MAX", "highest"), ("MIN", "lowest")])
    return (
        f"What is the {word} price of a product in the {category} category?",
        f"SELECT {fn}(price) FROM products WHERE category = {lit(category)}",
    )


@template("shop", "join")
def _shop_customer_products(rng: random.Random, db: Db) -> Pick:
    name = db.choice(rng, "SELECT c.name FROM customers c JOIN orders o ON o.customer_id = c.id")
    sql = (
        "SELECT p.name FROM orders o JOIN products p ON o.product_id = p.id"
        f" JOIN customers c ON o.customer_id = c.id WHERE c.name = {lit(name)}"
    )
    return (f"What are the names of the products that {name} ordered?", sql) if no_duplicates(db, sql) else None


@template("shop", "join")
def _shop_city_units(rng: random.Random, db: Db) -> Pick:
    city = db.choice(rng, "SELECT city FROM customers")
    year = db.choice(rng, "SELECT order_year FROM orders")
    return (
        f"How many units in total did customers from {city} order in {year}?",
        "SELECT SUM(o.quantity) FROM orders o JOIN customers c ON o.customer_id = c.id"
        f" WHERE c.city = {lit(city)} AND o.order_year = {year}",
    )


@template("shop", "join")
def _shop_category_buyers(rng: random.Random, db: Db) -> Pick:
    category = db.choice(rng, "SELECT category FROM products")
    return (
        f"How many different customers have ordered a product from the {category} category?",
        "SELECT COUNT(DISTINCT o.customer_id) FROM orders o JOIN products p ON o.product_id = p.id"
        f" WHERE p.category = {lit(category)}",
    )


@template("shop", "group_by")
def _shop_status_counts(rng: random.Random, db: Db) -> Pick:
    year = db.choice(rng, "SELECT order_year FROM orders")
    return (
        f"For each order status, how many orders were placed in {year}? Give the status and the count.",
        f"SELECT status, COUNT(*) FROM orders WHERE order_year = {year} GROUP BY status",
    )


@template("shop", "group_by")
def _shop_category_revenue(rng: random.Random, db: Db) -> Pick:
    status = rng.choice(["delivered", "shipped"])
    return (
        f"For each product category, how many units were sold in orders with status {status}?"
        " Give the category and the number of units, sorted by category name.",
        "SELECT p.category, SUM(o.quantity) FROM orders o JOIN products p ON o.product_id = p.id"
        f" WHERE o.status = {lit(status)} GROUP BY p.category ORDER BY p.category",
    )


@template("shop", "order_limit")
def _shop_top_prices(rng: random.Random, db: Db) -> Pick:
    k = rng.randint(2, 5)
    category = db.choice(rng, "SELECT category FROM products")
    where = f" WHERE category = {lit(category)}"
    if len(db.rows(f"SELECT 1 FROM products{where}")) < k:
        return None
    return (
        f"What are the names of the {k} most expensive products in the {category} category, most expensive first?",
        f"SELECT name FROM products{where} ORDER BY price DESC LIMIT {k}",
    )


@template("shop", "order_limit")
def _shop_top_city(rng: random.Random, db: Db) -> Pick:
    year = rng.randint(2015, 2020)
    where = f" WHERE signup_year >= {year}"
    keys = db.column(f"SELECT COUNT(*) AS n FROM customers{where} GROUP BY city ORDER BY n DESC")
    if not strict_top(keys, 1):
        return None
    return (
        f"Which city has the most customers who signed up in {year} or later?",
        f"SELECT city FROM customers{where} GROUP BY city ORDER BY COUNT(*) DESC LIMIT 1",
    )


@template("shop", "nested")
def _shop_never_ordered(rng: random.Random, db: Db) -> Pick:
    category = db.choice(rng, "SELECT category FROM products")
    return (
        f"Which products in the {category} category have never been ordered? List their names.",
        f"SELECT name FROM products WHERE category = {lit(category)}"
        " AND id NOT IN (SELECT product_id FROM orders)",
    )


@template("shop", "nested")
def _shop_above_average(rng: random.Random, db: Db) -> Pick:
    category = db.choice(rng, "SELECT category FROM products")
    return (
        f"Which products cost more than the average price of a product in the {category} category? List their names.",
        f"SELECT name FROM products WHERE price > (SELECT AVG(price) FROM products WHERE category = {lit(category)})",
    )


@template("shop", "nested")
def _shop_inactive_customers(rng: random.Random, db: Db) -> Pick:
    return (
        "Which customers have never placed an order? List their names.",
        "SELECT name FROM customers WHERE id NOT IN (SELECT customer_id FROM orders)",
    )


# --- school -----------------------------------------------------------------------------


@template("school", "count")
def _school_major_count(rng: random.Random, db: Db) -> Pick:
    major = db.choice(rng, "SELECT major FROM students")
    year = db.choice(rng, "SELECT enrollment_year FROM students")
    return (
        f"How many students majoring in {major} enrolled in {year}?",
        f"SELECT COUNT(*) FROM students WHERE major = {lit(major)} AND enrollment_year = {year}",
    )


@template("school", "filter")
def _school_dept_courses(rng: random.Random, db: Db) -> Pick:
    dept = db.choice(rng, "SELECT department FROM courses")
    credits = rng.randint(2, 4)
    return (
        f"List the titles of the {dept} courses worth at least {credits} credits.",
        f"SELECT title FROM courses WHERE department = {lit(dept)} AND credits >= {credits}",
    )


@template("school", "filter")
def _school_major_students(rng: random.Random, db: Db) -> Pick:
    major = db.choice(rng, "SELECT major FROM students")
    year = rng.randint(2019, 2023)
    return (
        f"What are the names of the {major} students who enrolled before {year}?",
        f"SELECT name FROM students WHERE major = {lit(major)} AND enrollment_year < {year}",
    )


@template("school", "aggregate")
def _school_course_grade(rng: random.Random, db: Db) -> Pick:
    title = db.choice(rng, "SELECT title FROM courses")
    fn, word = rng.choice([("AVG", "average"), ("MAX", "highest"), ("MIN", "lowest")])
    return (
        f"What is the {word} grade in the course {title}?",
        f"SELECT {fn}(e.grade) FROM enrollments e JOIN courses c ON e.course_id = c.id WHERE c.title = {lit(title)}",
    )


@template("school", "aggregate")
def _school_term_max(rng: random.Random, db: Db) -> Pick:
    term = db.choice(rng, "SELECT term FROM enrollments")
    fn, word = rng.choice([("MAX", "highest"), ("MIN", "lowest"), ("COUNT", "number of")])
    target = "*" if fn == "COUNT" else "grade"
    noun = "enrollments" if fn == "COUNT" else "grade given"
    return (
        f"What is the {word} {noun} in the {term} term?",
        f"SELECT {fn}({target}) FROM enrollments WHERE term = {lit(term)}",
    )


@template("school", "join")
def _school_student_courses(rng: random.Random, db: Db) -> Pick:
    name = db.choice(rng, "SELECT name FROM students")
    return (
        f"Which courses does {name} take? Give the course titles.",
        "SELECT c.title FROM enrollments e JOIN courses c ON e.course_id = c.id"
        f" JOIN students s ON e.student_id = s.id WHERE s.name = {lit(name)}",
    )


@template("school", "join")
def _school_course_term_students(rng: random.Random, db: Db) -> Pick:
    title, term = rng.choice(
        sorted(set(db.rows("SELECT c.title, e.term FROM enrollments e JOIN courses c ON e.course_id = c.id")))
    )
    return (
        f"List the names of the students who took {title} in {term}.",
        "SELECT s.name FROM enrollments e JOIN students s ON e.student_id = s.id"
        f" JOIN courses c ON e.course_id = c.id WHERE c.title = {lit(title)} AND e.term = {lit(term)}",
    )


@template("school", "join")
def _school_student_credits(rng: random.Random, db: Db) -> Pick:
    name = db.choice(rng, "SELECT name FROM students")
    return (
        f"How many credits does {name} take in total?",
        "SELECT SUM(c.credits) FROM enrollments e JOIN courses c ON e.course_id = c.id"
        f" JOIN students s ON e.student_id = s.id WHERE s.name = {lit(name)}",
    )


@template("school", "group_by")
def _school_dept_enrollments(rng: random.Random, db: Db) -> Pick:
    dept = db.choice(rng, "SELECT department FROM courses")
    where = f"WHERE c.department = {lit(dept)} GROUP BY c.title"
    inner = f"SELECT c.title, COUNT(*) FROM courses c JOIN enrollments e ON e.course_id = c.id {where}"
    outer = f"SELECT c.title, COUNT(e.course_id) FROM courses c LEFT JOIN enrollments e ON e.course_id = c.id {where}"
    if sorted(db.rows(inner)) != sorted(db.rows(outer)):
        return None  # a course nobody takes: an inner and an outer join would both be defensible
    return f"How many students are enrolled in each {dept} course? Give the course title and the count.", inner


@template("school", "group_by")
def _school_major_average(rng: random.Random, db: Db) -> Pick:
    term = db.choice(rng, "SELECT term FROM enrollments")
    return (
        f"For each major, what is the average grade of its students in the {term} term?"
        " Give the major and the average.",
        "SELECT s.major, AVG(e.grade) FROM enrollments e JOIN students s ON e.student_id = s.id"
        f" WHERE e.term = {lit(term)} GROUP BY s.major",
    )


@template("school", "group_by")
def _school_busy_students(rng: random.Random, db: Db) -> Pick:
    n = rng.randint(4, 6)
    return (
        f"Which students take at least {n} courses? List their names.",
        "SELECT s.name FROM students s JOIN enrollments e ON e.student_id = s.id"
        f" GROUP BY s.id, s.name HAVING COUNT(*) >= {n}",
    )


@template("school", "order_limit")
def _school_top_grade(rng: random.Random, db: Db) -> Pick:
    title = db.choice(rng, "SELECT title FROM courses")
    join = (
        "FROM enrollments e JOIN students s ON e.student_id = s.id JOIN courses c ON e.course_id = c.id"
        f" WHERE c.title = {lit(title)}"
    )
    if not strict_top(db.column(f"SELECT e.grade {join} ORDER BY e.grade DESC"), 1):
        return None
    return (
        f"Which student got the highest grade in {title}? Give the name.",
        f"SELECT s.name {join} ORDER BY e.grade DESC LIMIT 1",
    )


@template("school", "order_limit")
def _school_best_students(rng: random.Random, db: Db) -> Pick:
    k = rng.randint(2, 4)
    major = db.choice(rng, "SELECT major FROM students")
    join = f"FROM students s JOIN enrollments e ON e.student_id = s.id WHERE s.major = {lit(major)} GROUP BY s.id"
    if not strict_top(db.column(f"SELECT AVG(e.grade) AS g {join} ORDER BY g DESC"), k):
        return None
    return (
        f"Which {k} {major} students have the highest average grade? List their names, best first.",
        f"SELECT s.name {join} ORDER BY AVG(e.grade) DESC LIMIT {k}",
    )


@template("school", "nested")
def _school_above_course_average(rng: random.Random, db: Db) -> Pick:
    title = db.choice(rng, "SELECT title FROM courses")
    return (
        f"Which students got a grade above the average grade of {title} in that course? List their names.",
        "SELECT s.name FROM enrollments e JOIN students s ON e.student_id = s.id JOIN courses c ON e.course_id = c.id"
        f" WHERE c.title = {lit(title)} AND e.grade > (SELECT AVG(e2.grade) FROM enrollments e2"
        f" JOIN courses c2 ON e2.course_id = c2.id WHERE c2.title = {lit(title)})",
    )


# --- library ----------------------------------------------------------------------------


@template("library", "count")
def _library_genre_count(rng: random.Random, db: Db) -> Pick:
    genre = db.choice(rng, "SELECT genre FROM books")
    year = rng.choice([1960, 1970, 1980, 1990, 2000, 2010])
    return (
        f"How many {genre} books were published after {year}?",
        f"SELECT COUNT(*) FROM books WHERE genre = {lit(genre)} AND published_year > {year}",
    )


@template("library", "count")
def _library_country_authors(rng: random.Random, db: Db) -> Pick:
    country = db.choice(rng, "SELECT country FROM authors")
    return f"How many authors are from {country}?", f"SELECT COUNT(*) FROM authors WHERE country = {lit(country)}"


@template("library", "filter")
def _library_long_books(rng: random.Random, db: Db) -> Pick:
    genre = db.choice(rng, "SELECT genre FROM books")
    pages = rng.choice([200, 300, 400, 500, 600])
    return (
        f"Which {genre} books have more than {pages} pages? Give their titles.",
        f"SELECT title FROM books WHERE genre = {lit(genre)} AND pages > {pages}",
    )


@template("library", "filter")
def _library_authors_born(rng: random.Random, db: Db) -> Pick:
    year = rng.choice([1930, 1940, 1950, 1960, 1970, 1980])
    word, op = rng.choice([("before", "<"), ("after", ">")])
    return (
        f"List the names of the authors born {word} {year}.",
        f"SELECT name FROM authors WHERE birth_year {op} {year}",
    )


@template("library", "aggregate")
def _library_avg_pages(rng: random.Random, db: Db) -> Pick:
    genre = db.choice(rng, "SELECT genre FROM books")
    fn, word = rng.choice([("AVG", "average"), ("SUM", "total"), ("MAX", "largest")])
    return (
        f"What is the {word} number of pages of the {genre} books?",
        f"SELECT {fn}(pages) FROM books WHERE genre = {lit(genre)}",
    )


@template("library", "join")
def _library_author_books(rng: random.Random, db: Db) -> Pick:
    name = db.choice(rng, "SELECT a.name FROM authors a JOIN books b ON b.author_id = a.id")
    return (
        f"List the titles of the books written by {name}.",
        f"SELECT b.title FROM books b JOIN authors a ON b.author_id = a.id WHERE a.name = {lit(name)}",
    )


@template("library", "join")
def _library_author_members(rng: random.Random, db: Db) -> Pick:
    name = db.choice(
        rng, "SELECT a.name FROM authors a JOIN books b ON b.author_id = a.id JOIN loans l ON l.book_id = b.id"
    )
    return (
        f"Which members borrowed books by {name}? List each member once.",
        "SELECT DISTINCT l.member FROM loans l JOIN books b ON l.book_id = b.id"
        f" JOIN authors a ON b.author_id = a.id WHERE a.name = {lit(name)}",
    )


@template("library", "join")
def _library_open_loans(rng: random.Random, db: Db) -> Pick:
    genre = db.choice(rng, "SELECT genre FROM books")
    return (
        f"How many loans of {genre} books have not been returned yet?",
        "SELECT COUNT(*) FROM loans l JOIN books b ON l.book_id = b.id"
        f" WHERE b.genre = {lit(genre)} AND l.returned = 0",
    )


@template("library", "group_by")
def _library_genre_counts(rng: random.Random, db: Db) -> Pick:
    year = rng.choice([1960, 1970, 1980, 1990, 2000])
    return (
        f"For each genre, how many books were published after {year}? Give the genre and the count.",
        f"SELECT genre, COUNT(*) FROM books WHERE published_year > {year} GROUP BY genre",
    )


@template("library", "group_by")
def _library_member_loans(rng: random.Random, db: Db) -> Pick:
    year = db.choice(rng, "SELECT loan_year FROM loans")
    return (
        f"How many books did each member borrow in {year}? Give the member and the number of loans,"
        " sorted by member name.",
        f"SELECT member, COUNT(*) FROM loans WHERE loan_year = {year} GROUP BY member ORDER BY member",
    )


@template("library", "order_limit")
def _library_longest(rng: random.Random, db: Db) -> Pick:
    k = rng.randint(2, 5)
    word, order = rng.choice([("longest", "DESC"), ("shortest", "ASC")])
    return (
        f"What are the titles of the {k} {word} books, {word} first?",
        f"SELECT title FROM books ORDER BY pages {order} LIMIT {k}",
    )


@template("library", "order_limit")
def _library_prolific_author(rng: random.Random, db: Db) -> Pick:
    genre = db.choice(rng, "SELECT genre FROM books")
    join = f"FROM books b JOIN authors a ON b.author_id = a.id WHERE b.genre = {lit(genre)} GROUP BY a.id"
    if not strict_top(db.column(f"SELECT COUNT(*) AS n {join} ORDER BY n DESC"), 1):
        return None
    return (
        f"Which author has written the most {genre} books? Give the name.",
        f"SELECT a.name {join} ORDER BY COUNT(*) DESC LIMIT 1",
    )


@template("library", "nested")
def _library_never_borrowed(rng: random.Random, db: Db) -> Pick:
    genre = db.choice(rng, "SELECT genre FROM books")
    return (
        f"Which {genre} books have never been borrowed? List their titles.",
        f"SELECT title FROM books WHERE genre = {lit(genre)} AND id NOT IN (SELECT book_id FROM loans)",
    )


# --- generation -------------------------------------------------------------------------


def answerable(db: Db, sql: str) -> bool:
    """The gold query returns something other than nothing, a lone NULL or a lone 0 (answers a
    wrong query hits by accident: a misspelt value matches no row)."""
    rows = db.rows(sql)
    if rows in ([(None,)], [(0,)]):
        return False
    return bool(rows) and any(v is not None for row in rows for v in row)


def make_dataset(n: int, seed: int = 0) -> list[dict[str, str]]:
    """`n` rows `{db_id, question, gold_sql, kind}`, deterministic for `seed`, no question twice."""
    rng = random.Random(seed)
    dbs = {db_id: Db(memory_database(db_id)) for db_id in DB_IDS}
    by_db = {db_id: [t for t in TEMPLATES if t.db_id == db_id] for db_id in DB_IDS}
    queues: dict[str, list[Template]] = {db_id: [] for db_id in DB_IDS}
    seen: set[tuple[str, str]] = set()
    rows: list[dict[str, str]] = []
    try:
        while len(rows) < n:
            db_id = DB_IDS[len(rows) % len(DB_IDS)]
            for _attempt in range(200):  # bounded: a db whose questions ran out fails loudly below
                if not queues[db_id]:
                    queues[db_id] = rng.sample(by_db[db_id], len(by_db[db_id]))
                tpl = queues[db_id].pop()
                picked = tpl.fill(rng, dbs[db_id])
                if picked is None or (db_id, picked[0]) in seen or not answerable(dbs[db_id], picked[1]):
                    continue
                seen.add((db_id, picked[0]))
                rows.append({"db_id": db_id, "question": picked[0], "gold_sql": picked[1], "kind": tpl.kind})
                break
            else:
                raise RuntimeError(f"could not make a new question for {db_id!r} after 200 tries (n={n} too large?)")
    finally:
        for db in dbs.values():
            db.conn.close()
    return rows


def write_jsonl(rows: list[dict[str, Any]], path: Path) -> None:
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="write the text-to-SQL example dataset as JSONL")
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("rows.jsonl"))
    args = parser.parse_args(argv)
    write_jsonl(make_dataset(args.n, args.seed), args.out)


if __name__ == "__main__":
    main()
