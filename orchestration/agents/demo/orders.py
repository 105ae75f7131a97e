"""The demo's order system: every order id names one order, the same every time it is looked up.

The demo shop sells to consumers, businesses and enterprises, so refunds land on every approval
tier of the demo policy (above 100, 1,000 and 10,000). Two kinds of order misbehave the way real
back ends do: orders moved to the archive time out on every lookup (the step runs out of retries
and escalates), and orders bought through a marketplace partner come back without a currency
(the refund proposer's input contract refuses them). The simulator picks order ids of the kind it
wants with :func:`order_id_of_kind`; nothing here reads Django.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any, Literal

OrderKind = Literal["small", "consumer", "business", "enterprise", "archived", "marketplace"]
ORDER_KINDS: tuple[OrderKind, ...] = (
    "small",
    "consumer",
    "business",
    "enterprise",
    "archived",
    "marketplace",
)

CONSUMER_CATALOG = (
    ("sku-kettle", "Electric kettle", 39.0),
    ("sku-headset", "Wireless headset", 129.0),
    ("sku-chair", "Desk chair", 189.0),
    ("sku-lamp", "Reading lamp", 24.5),
    ("sku-backpack", "Travel backpack", 74.0),
)
BUSINESS_CATALOG = (
    ("sku-laptop", "Business laptop", 1390.0),
    ("sku-monitor", "27-inch monitor", 329.0),
    ("sku-dock", "Docking station", 219.0),
)
ENTERPRISE_CATALOG = (
    ("sku-server", "Rack server", 12800.0),
    ("sku-switch", "Core network switch", 4650.0),
)
#: Share of order ids of each special kind; the rest are consumer and business orders.
ARCHIVED_SHARE = 0.03
MARKETPLACE_SHARE = 0.03
ENTERPRISE_SHARE = 0.04
BUSINESS_SHARE = 0.15


class OrderArchived(Exception):
    """The order lives in the archive, whose lookups time out (every time)."""


def _random_for(order_id: str) -> random.Random:
    digest = hashlib.sha256(f"demo-order:{order_id}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _items(
    rng: random.Random, catalog: tuple[tuple[str, str, float], ...], count: int, most: int
) -> list[dict[str, Any]]:
    return [
        {"sku": sku, "name": title, "quantity": rng.randint(1, most), "price": price}
        for sku, title, price in rng.sample(catalog, count)
    ]


def order_for(order_id: str, customer_id: str) -> dict[str, Any]:
    """The order ``order_id`` as the order system returns it; :class:`OrderArchived` for an
    archived one. A marketplace order has no currency."""
    rng = _random_for(order_id)
    draw = rng.random()
    if draw < ARCHIVED_SHARE:
        raise OrderArchived(f"order {order_id} is archived; the archive did not answer in time")
    currency: str | None = "EUR"
    if draw < ARCHIVED_SHARE + MARKETPLACE_SHARE:
        items = _items(rng, CONSUMER_CATALOG, rng.randint(1, 2), 1)
        currency = None  # the partner's feed leaves it out
    elif draw < ARCHIVED_SHARE + MARKETPLACE_SHARE + ENTERPRISE_SHARE:
        items = _items(rng, ENTERPRISE_CATALOG, 1, 2)
        if items[0]["sku"] == "sku-switch":
            items[0]["quantity"] = 3  # a switch is ordered in threes: still above 10,000
    elif draw < ARCHIVED_SHARE + MARKETPLACE_SHARE + ENTERPRISE_SHARE + BUSINESS_SHARE:
        items = _items(rng, BUSINESS_CATALOG, rng.randint(1, 2), 3)
        if not any(item["sku"] == "sku-laptop" for item in items):
            items.append(
                {"sku": "sku-laptop", "name": "Business laptop", "quantity": 1, "price": 1390.0}
            )
    else:
        items = _items(rng, CONSUMER_CATALOG, rng.randint(1, 3), 2)
    return {
        "order_id": order_id,
        "customer_id": customer_id,
        "total": round(sum(item["price"] * item["quantity"] for item in items), 2),
        "currency": currency,
        "status": "delivered",
        "items": items,
    }


def order_kind(order_id: str) -> OrderKind:
    """What kind of order ``order_id`` is: its refund's approval tier, or how it misbehaves."""
    try:
        order = order_for(order_id, "")
    except OrderArchived:
        return "archived"
    if order["currency"] is None:
        return "marketplace"
    total = order["total"]
    if total > 10_000:
        return "enterprise"
    if total > 1_000:
        return "business"
    return "consumer" if total > 100 else "small"


def order_id_of_kind(kind: OrderKind, rng: random.Random) -> str:
    """A random order id of ``kind`` (a full refund of it needs that kind's approval tier)."""
    for _ in range(10_000):
        order_id = f"ord_{rng.randint(10000, 99999)}"
        if order_kind(order_id) == kind:
            return order_id
    # Not reached: each kind is at least 3% of the ids drawn.
    raise LookupError(f"no order of kind {kind!r} found")
