"""Approximate on-demand prices of the instance types deploy defaults to, for the plan's cost line.

SageMaker real-time/asynchronous inference hosting, us-east-1, USD per instance-hour. The
ml.g5.xlarge and ml.g5.2xlarge figures were checked against public pricing write-ups dated
2025-10 to 2026-03 (~$1.41 and ~$1.52); the others are AWS's long-published list prices, not
re-checked. Other regions cost more and prices change: the plan says "approximate", and the
bill is what AWS charges, not this table.
"""

from __future__ import annotations

PRICES_AS_OF = "approximate: us-east-1 on-demand list prices as of 2025-2026"
USD_PER_HOUR: dict[str, float] = {
    "ml.g4dn.xlarge": 0.736,
    "ml.g4dn.2xlarge": 0.94,
    "ml.g5.xlarge": 1.408,
    "ml.g5.2xlarge": 1.515,
    "ml.g5.4xlarge": 2.03,
    "ml.g5.12xlarge": 7.09,
}


def hourly_usd(instance_type: str) -> float | None:
    """The approximate hourly price, or None for a type not in the table."""
    return USD_PER_HOUR.get(instance_type)


def cost_line(instance_type: str, min_instances: int, max_instances: int) -> dict:
    """Cost per hour at the minimum and at the maximum instance count (None when unknown)."""
    price = hourly_usd(instance_type)
    return {
        "instance_type": instance_type,
        "usd_per_instance_hour": price,
        "min_instances": min_instances,
        "max_instances": max_instances,
        "usd_per_hour_at_min": None if price is None else round(price * min_instances, 3),
        "usd_per_hour_at_max": None if price is None else round(price * max_instances, 3),
        "as_of": PRICES_AS_OF,
    }
