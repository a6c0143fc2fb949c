"""Aggregates computed from CSV files with the csv module and Decimal, never from the warehouse:
the independent side of every "equals the seed's answer to the cent" check."""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

TX_COLUMNS = ("transaction_id", "user_id", "transaction_date", "amount", "transaction_type")


@dataclass
class Expected:
    """Per-user and per-day totals of clean inputs. The same transaction id with the same
    content counts once (a re-sent row); with other content it is a mistake in the test."""

    countries: dict[int, str] = field(default_factory=dict)
    seen: dict[int, tuple[str, ...]] = field(default_factory=dict)
    count: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    total: dict[int, Decimal] = field(default_factory=lambda: defaultdict(Decimal))
    by_type: dict[tuple[int, str], Decimal] = field(default_factory=lambda: defaultdict(Decimal))
    daily: dict[tuple[str, str], Decimal] = field(default_factory=lambda: defaultdict(Decimal))
    daily_count: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))

    def add_users(self, text: str) -> None:
        for row in csv.DictReader(io.StringIO(text)):
            self.countries[int(row["user_id"])] = row["country"].strip()

    def add_users_file(self, path: Path) -> None:
        self.add_users(path.read_text(encoding="utf-8-sig"))

    def add_transactions(self, text: str) -> None:
        for row in csv.DictReader(io.StringIO(text)):
            key = tuple(row[c].strip() for c in TX_COLUMNS)
            ident = int(key[0])
            if ident in self.seen:
                assert self.seen[ident] == key, f"conflicting copies of {ident} in the inputs"
                continue
            self.seen[ident] = key
            self.add_transaction(int(key[1]), key[2], Decimal(key[3]), key[4].lower())

    def add_transactions_file(self, path: Path) -> None:
        self.add_transactions(path.read_text(encoding="utf-8-sig"))

    def add_transaction(self, user_id: int, day: str, amount: Decimal, kind: str) -> None:
        self.count[user_id] += 1
        self.total[user_id] += amount
        self.by_type[user_id, kind] += amount
        self.daily[day, kind] += amount
        self.daily_count[day, kind] += 1

    def top(self, n: int, *, known_only: bool = False) -> list[tuple[int, int]]:
        """The ``n`` users with the most transactions, ties by smaller id."""
        users = [u for u in self.count if not known_only or u in self.countries]
        ranked = sorted(users, key=lambda u: (-self.count[u], u))[:n]
        return [(u, self.count[u]) for u in ranked]

    @property
    def transactions(self) -> int:
        return sum(self.count.values())

    @property
    def grand_total(self) -> Decimal:
        return sum(self.total.values(), Decimal(0))
