"""The shop: generated data, the refund/return policy, the SQLite database and the three tools.

Everything comes from a seed. `build_shop(seed)` makes products (with prices and a
returnable flag), customers and orders (status, dates, items, shipping) in memory;
`ensure_db(seed)` writes them once into a SQLite file under the cache dir, named by a hash of
the content, and `ShopTools` reads that file read-only. The dataset generator and the tools
share the same policy functions (`refund_quote`, `return_label`), so a task's expected answer is
what the tool computes.

Policy (dates are relative to the shop's fixed "today", `TODAY`, so answers never drift):
- refund: only delivered orders; 100% of the item prices within 30 days of delivery, 50%
  within 60 days, nothing after; shipping is never refunded. 50% rounds down to the cent.
- return label: only delivered orders, within 30 days of delivery, with at least one returnable
  item; the label id is a hash of the shop seed and the order id (the same call gives the same id).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import random
import sqlite3
import tempfile
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

TODAY = dt.date(2024, 6, 1)
REFUND_FULL_DAYS = 30
REFUND_HALF_DAYS = 60
RETURN_DAYS = 30
SCHEMA_VERSION = 1
CACHE_ENV = "RELAYRL_EXAMPLES_CACHE"
STATUSES = ("processing", "shipped", "delivered", "cancelled")
N_CUSTOMERS = 120
N_ORDERS = 500
FREE_SHIPPING_CENTS = 5000
SHIPPING_CENTS = 499

# (name, returnable): about a quarter of the catalogue cannot be returned (hygiene, perishables,
# personalised goods, gift cards), so return-label refusals have real cases.
CATALOGUE: tuple[tuple[str, bool], ...] = (
    ("Trail Backpack", True), ("Rain Jacket", True), ("Hiking Boots", True), ("Water Bottle", True),
    ("Desk Lamp", True), ("Ceramic Mug", True), ("Throw Blanket", True), ("Yoga Mat", True),
    ("Bluetooth Speaker", True), ("Phone Stand", True), ("Notebook Set", True), ("Chef Knife", True),
    ("Cutting Board", True), ("Running Shorts", True), ("Sun Hat", True), ("Travel Pillow", True),
    ("Board Game", True), ("Plant Pot", True), ("Wireless Earbuds", False), ("Wool Socks", False),
    ("Coffee Beans", False), ("Gift Card", False), ("Engraved Pen", False), ("Face Mask Set", False),
)  # fmt: skip
FIRST_NAMES = ("Ana", "Ben", "Chloe", "Dev", "Emma", "Femi", "Grace", "Hiro", "Isla", "Jonas", "Kira", "Leo",
               "Mia", "Nico", "Olga", "Pablo", "Quinn", "Rosa", "Sam", "Tara")  # fmt: skip
LAST_NAMES = ("Adams", "Brown", "Costa", "Diaz", "Evans", "Fischer", "Garcia", "Haas", "Ito", "Jensen", "Khan",
              "Lopez", "Moreau", "Novak", "Okafor", "Park")  # fmt: skip


@dataclass(frozen=True)
class Product:
    product_id: str
    name: str
    price_cents: int
    returnable: bool


@dataclass(frozen=True)
class Customer:
    customer_id: str
    name: str


@dataclass(frozen=True)
class Item:
    product_id: str
    name: str
    quantity: int
    unit_price_cents: int
    returnable: bool

    @property
    def total_cents(self) -> int:
        return self.quantity * self.unit_price_cents


@dataclass(frozen=True)
class Order:
    order_id: str
    customer_id: str
    status: str
    order_date: dt.date
    ship_date: dt.date | None
    delivery_date: dt.date | None
    shipping_cents: int
    items: tuple[Item, ...] = field(default_factory=tuple)

    @property
    def subtotal_cents(self) -> int:
        return sum(i.total_cents for i in self.items)


@dataclass(frozen=True)
class Shop:
    seed: int
    products: tuple[Product, ...]
    customers: tuple[Customer, ...]
    orders: tuple[Order, ...]

    def order(self, order_id: str) -> Order | None:
        return next((o for o in self.orders if o.order_id == order_id), None)

    def customer(self, customer_id: str) -> Customer:
        return next(c for c in self.customers if c.customer_id == customer_id)


# --- generation ------------------------------------------------------------------------------


def build_shop(seed: int) -> Shop:
    """The whole shop for `seed`, deterministic (stdlib `random.Random(seed)` only)."""
    rng = random.Random(seed)
    products = tuple(
        Product(f"P{i + 1:02d}", name, rng.randrange(5, 160) * 100 + 99, returnable)
        for i, (name, returnable) in enumerate(CATALOGUE)
    )
    customers = tuple(
        Customer(f"C{i + 1:04d}", f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}") for i in range(N_CUSTOMERS)
    )
    orders = []
    next_id = 10000
    for _ in range(N_ORDERS):
        next_id += rng.randint(1, 9)  # gaps, so ids are not guessable by counting
        orders.append(_order(rng, f"A{next_id}", rng.choice(customers).customer_id, products))
    return Shop(seed, products, customers, tuple(orders))


def _order(rng: random.Random, order_id: str, customer_id: str, products: tuple[Product, ...]) -> Order:
    age = rng.randint(1, 110)  # days since the order was placed
    order_date = TODAY - dt.timedelta(days=age)
    ship_date = delivery_date = None
    if rng.random() < 0.07:
        status = "cancelled"
    elif age <= 2:
        status = "processing"
    elif age <= 7 and rng.random() < 0.6:
        status, ship_date = "shipped", order_date + dt.timedelta(days=1)
    else:
        status, ship_date = "delivered", order_date + dt.timedelta(days=1)
        # age >= 3 here, so delivery falls between the ship date and yesterday
        delivery_date = min(order_date + dt.timedelta(days=rng.randint(2, 6)), TODAY - dt.timedelta(days=1))
    picked = rng.sample(products, rng.choice((1, 1, 2, 2, 3)))
    items = tuple(Item(p.product_id, p.name, rng.choice((1, 1, 1, 2)), p.price_cents, p.returnable) for p in picked)
    subtotal = sum(i.total_cents for i in items)
    shipping = 0 if subtotal >= FREE_SHIPPING_CENTS else SHIPPING_CENTS
    return Order(order_id, customer_id, status, order_date, ship_date, delivery_date, shipping, items)


# --- policy ----------------------------------------------------------------------------------


class PolicyRefusal(Exception):
    """The order exists but the request is not allowed by the policy (text goes to the model)."""


@dataclass(frozen=True)
class RefundQuote:
    order_id: str
    refund_cents: int
    percent: int
    days_since_delivery: int


def days_since_delivery(order: Order, today: dt.date = TODAY) -> int | None:
    return None if order.delivery_date is None else (today - order.delivery_date).days


def _not_delivered(order: Order, what: str) -> PolicyRefusal:
    return PolicyRefusal(f"order {order.order_id} is {order.status}, not delivered; {what} only after delivery")


def refund_quote(order: Order, product_ids: list[str] | None = None, today: dt.date = TODAY) -> RefundQuote:
    """The refund for `order` (or only the lines of `product_ids`); raises `PolicyRefusal`.

    100% of the item prices within REFUND_FULL_DAYS of delivery, 50% (rounded down to the
    cent) within REFUND_HALF_DAYS, else refused. Shipping is never refunded. A `ValueError`
    means `product_ids` names an item that is not in the order.
    """
    days = days_since_delivery(order, today)
    if order.status != "delivered" or days is None:
        raise _not_delivered(order, "refunds are possible")
    lines = list(order.items)
    if product_ids is not None:
        wanted = {p.strip().upper() for p in product_ids}
        unknown = sorted(wanted - {i.product_id for i in order.items})
        if unknown or not wanted:
            raise ValueError(f"items {unknown or '[]'} are not in order {order.order_id}")
        lines = [i for i in order.items if i.product_id in wanted]
    if days <= REFUND_FULL_DAYS:
        percent = 100
    elif days <= REFUND_HALF_DAYS:
        percent = 50
    else:
        raise PolicyRefusal(
            f"order {order.order_id} was delivered {days} days ago, beyond the {REFUND_HALF_DAYS}-day refund window"
        )
    subtotal = sum(i.total_cents for i in lines)
    return RefundQuote(order.order_id, subtotal * percent // 100, percent, days)


def return_label(order: Order, seed: int, today: dt.date = TODAY) -> tuple[str, list[str]]:
    """(label id, returnable product ids) for `order`; raises `PolicyRefusal` when not eligible."""
    days = days_since_delivery(order, today)
    if order.status != "delivered" or days is None:
        raise _not_delivered(order, "returns are possible")
    if days > RETURN_DAYS:
        raise PolicyRefusal(
            f"order {order.order_id} was delivered {days} days ago, beyond the {RETURN_DAYS}-day return window"
        )
    returnable = [i.product_id for i in order.items if i.returnable]
    if not returnable:
        raise PolicyRefusal(f"order {order.order_id} has no returnable items")
    return label_id(seed, order.order_id), returnable


def label_id(seed: int, order_id: str) -> str:
    """Deterministic: the same shop and order always get the same label."""
    return "RL-" + hashlib.sha256(f"{seed}:{order_id}".encode()).hexdigest()[:8].upper()


def money(cents: int) -> str:
    return f"{cents // 100}.{cents % 100:02d}"


# --- SQLite ----------------------------------------------------------------------------------

SCHEMA = """
CREATE TABLE products (product_id TEXT PRIMARY KEY, name TEXT NOT NULL, price_cents INTEGER NOT NULL,
                       returnable INTEGER NOT NULL);
CREATE TABLE customers (customer_id TEXT PRIMARY KEY, name TEXT NOT NULL);
CREATE TABLE orders (order_id TEXT PRIMARY KEY, customer_id TEXT NOT NULL REFERENCES customers,
                     status TEXT NOT NULL, order_date TEXT NOT NULL, ship_date TEXT, delivery_date TEXT,
                     shipping_cents INTEGER NOT NULL);
CREATE TABLE order_items (order_id TEXT NOT NULL REFERENCES orders, product_id TEXT NOT NULL REFERENCES products,
                          quantity INTEGER NOT NULL, unit_price_cents INTEGER NOT NULL,
                          PRIMARY KEY (order_id, product_id));
"""

_db_lock = threading.Lock()
_db_paths: dict[tuple[int, str], Path] = {}  # (seed, directory) -> built file, so a rollout skips the rebuild


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(tempfile.gettempdir(), "relayrl-examples")
    return Path(root) / "customer_service"


def content_hash(shop: Shop) -> str:
    """Hash of the schema and every row: a changed generator never reuses a stale file."""
    payload = json.dumps([SCHEMA_VERSION, SCHEMA, asdict(shop)], default=str, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def ensure_db(seed: int, directory: Path | None = None) -> Path:
    """The SQLite file of shop `seed`, built on first use (atomically: written beside, then renamed,
    so concurrent workers never read half a file; two that race both write the same bytes)."""
    directory = Path(directory) if directory is not None else cache_dir()
    key = (seed, str(directory))
    with _db_lock:
        cached = _db_paths.get(key)
        if cached is not None and cached.exists():
            return cached
        shop = build_shop(seed)
        path = directory / f"shop-{seed}-{content_hash(shop)}.sqlite"
        if not path.exists():
            directory.mkdir(parents=True, exist_ok=True)
            tmp = directory / f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp"
            try:
                _write_db(tmp, shop)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
        _db_paths[key] = path
        return path


def _write_db(path: Path, shop: Shop) -> None:
    path.unlink(missing_ok=True)
    conn = sqlite3.connect(path)
    try:
        conn.executescript(SCHEMA)
        conn.executemany("INSERT INTO products VALUES (?,?,?,?)",
                         [(p.product_id, p.name, p.price_cents, int(p.returnable)) for p in shop.products])  # fmt: skip
        conn.executemany("INSERT INTO customers VALUES (?,?)", [(c.customer_id, c.name) for c in shop.customers])
        conn.executemany(
            "INSERT INTO orders VALUES (?,?,?,?,?,?,?)",
            [(o.order_id, o.customer_id, o.status, o.order_date.isoformat(), _iso(o.ship_date),
              _iso(o.delivery_date), o.shipping_cents) for o in shop.orders],
        )  # fmt: skip
        conn.executemany(
            "INSERT INTO order_items VALUES (?,?,?,?)",
            [(o.order_id, i.product_id, i.quantity, i.unit_price_cents) for o in shop.orders for i in o.items],
        )
        conn.commit()
    finally:
        conn.close()


def _iso(d: dt.date | None) -> str | None:
    return None if d is None else d.isoformat()


def _date(s: str | None) -> dt.date | None:
    return None if s is None else dt.date.fromisoformat(s)


class ShopDB:
    """Read-only queries on a shop file (`mode=ro`: the tools can never change the shop)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)

    def order(self, order_id: str) -> Order | None:
        conn = self._connect()
        try:
            row = conn.execute(
                "SELECT order_id, customer_id, status, order_date, ship_date, delivery_date, shipping_cents"
                " FROM orders WHERE order_id = ?",
                (order_id,),
            ).fetchone()
            if row is None:
                return None
            items = conn.execute(
                "SELECT i.product_id, p.name, i.quantity, i.unit_price_cents, p.returnable FROM order_items i"
                " JOIN products p USING (product_id) WHERE i.order_id = ? ORDER BY i.rowid",
                (order_id,),
            ).fetchall()
        finally:
            conn.close()
        return Order(
            row[0], row[1], row[2], dt.date.fromisoformat(row[3]), _date(row[4]), _date(row[5]), row[6],
            tuple(Item(p, n, q, u, bool(r)) for p, n, q, u, r in items),
        )  # fmt: skip


# --- the tools -------------------------------------------------------------------------------

ErrorKind = str  # "unknown_order" | "not_eligible" | "bad_items" | "malformed_arguments" | "unknown_tool"


@dataclass(frozen=True)
class ToolOutcome:
    """One executed tool call: `text` is what the model reads back (the result, or the error)."""

    tool: str
    args: Any  # the parsed arguments (dict), or the raw string when they did not parse
    ok: bool
    text: str
    kind: ErrorKind | None = None  # why it failed (None when ok)
    order_id: str | None = None  # the order it was about (normalised), when one was named
    refund_cents: int | None = None
    label_id: str | None = None


def normalise_order_id(value: Any) -> str | None:
    """'a10482', '#A10482 ', 10482 -> 'A10482'; None for anything that cannot be an order id."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None
    text = str(value).strip().lstrip("#").upper()
    if text.isdigit():
        text = "A" + text
    return text if len(text) > 1 and text[0] == "A" and text[1:].isdigit() else None


class ShopTools:
    """`lookup_order`, `calculate_refund`, `create_return_label` over one shop database.

    `call(name, arguments)` never raises for anything the model sends: bad JSON, a wrong
    type, an unknown tool or order, a refused request all come back as a failed
    `ToolOutcome` whose text the model reads as the tool result.
    """

    NAMES = ("lookup_order", "calculate_refund", "create_return_label")

    def __init__(self, db: ShopDB, seed: int, today: dt.date = TODAY) -> None:
        self.db, self.seed, self.today = db, seed, today

    @classmethod
    def for_seed(cls, seed: int) -> ShopTools:
        return cls(ShopDB(ensure_db(seed)), seed)

    def call(self, name: str, arguments: str | dict[str, Any] | None) -> ToolOutcome:
        args: Any = arguments
        if isinstance(arguments, str):
            try:
                args = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as exc:
                return ToolOutcome(name, arguments, False, f"error: malformed arguments (not JSON: {exc.msg})",
                                   "malformed_arguments")  # fmt: skip
        if args is None:
            args = {}
        if name not in self.NAMES:
            return ToolOutcome(name, args, False, f"error: unknown tool {name!r}; use one of {list(self.NAMES)}",
                               "unknown_tool")  # fmt: skip
        if not isinstance(args, dict):
            return ToolOutcome(name, args, False, "error: malformed arguments (expected a JSON object)",
                               "malformed_arguments")  # fmt: skip
        order_id = normalise_order_id(args.get("order_id"))
        if order_id is None:
            return ToolOutcome(name, args, False, 'error: malformed arguments (need "order_id", e.g. "A10482")',
                               "malformed_arguments")  # fmt: skip
        order = self.db.order(order_id)
        if order is None:
            return ToolOutcome(name, args, False, f"error: unknown order {order_id}", "unknown_order", order_id)
        if name == "lookup_order":
            return ToolOutcome(name, args, True, order_summary(order), order_id=order_id)
        if name == "calculate_refund":
            return self._refund(args, order)
        return self._label(args, order)

    def _refund(self, args: dict[str, Any], order: Order) -> ToolOutcome:
        items = args.get("items")
        if items is not None and not (isinstance(items, list) and all(isinstance(i, str) for i in items)):
            return ToolOutcome("calculate_refund", args, False,
                               'error: malformed arguments ("items" is a list of product ids, e.g. ["P03"])',
                               "malformed_arguments", order.order_id)  # fmt: skip
        try:
            quote = refund_quote(order, items, self.today)
        except PolicyRefusal as exc:
            return ToolOutcome("calculate_refund", args, False, f"not eligible: {exc}", "not_eligible", order.order_id)
        except ValueError as exc:
            return ToolOutcome("calculate_refund", args, False, f"error: {exc}", "bad_items", order.order_id)
        text = (f"order {order.order_id}: refund ${money(quote.refund_cents)} ({quote.percent}% of the items;"
                f" delivered {quote.days_since_delivery} days ago; shipping is not refunded)")
        return ToolOutcome("calculate_refund", args, True, text, order_id=order.order_id,
                           refund_cents=quote.refund_cents)  # fmt: skip

    def _label(self, args: dict[str, Any], order: Order) -> ToolOutcome:
        try:
            label, returnable = return_label(order, self.seed, self.today)
        except PolicyRefusal as exc:
            return ToolOutcome("create_return_label", args, False, f"not eligible: {exc}", "not_eligible",
                               order.order_id)  # fmt: skip
        text = f"order {order.order_id}: return label {label} issued for {', '.join(returnable)}"
        return ToolOutcome("create_return_label", args, True, text, order_id=order.order_id, label_id=label)


def order_summary(order: Order) -> str:
    """What `lookup_order` answers: one line of text, not JSON, because every token of it is in
    the next prompt (the tiny test model's tokenizer spends about one token per character)."""
    if order.status == "delivered":
        when = f"delivered on {_iso(order.delivery_date)} (ordered {order.order_date.isoformat()})"
    elif order.status == "shipped":
        when = f"shipped on {_iso(order.ship_date)} (ordered {order.order_date.isoformat()})"
    else:
        when = f"{order.status} (ordered {order.order_date.isoformat()})"
    items = ", ".join(
        f"{i.product_id} {i.name} x{i.quantity} ${money(i.unit_price_cents)}{'' if i.returnable else ' (final sale)'}"
        for i in order.items
    )
    return f"order {order.order_id} of {order.customer_id}: {when}; items: {items}; shipping ${money(order.shipping_cents)}"
