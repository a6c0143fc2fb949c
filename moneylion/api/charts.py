"""The dashboard's chart of daily totals, drawn on the server as SVG.

Why SVG from the server rather than a JavaScript chart library: nothing to vendor or fetch, the
figures stay exact (amounts come from DuckDB as Decimal and are printed as decimal strings; only
the coordinates are rounded), the chart refreshes with the htmx partial that holds it, and it is
accessible: ``role="img"`` with a title and a description, series told apart by dash pattern as
well as colour, and the page beside it has the same figures as a table.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from html import escape

from moneylion.api.models import money
from moneylion.api.queries import DailyTotal
from moneylion.model import TRANSACTION_TYPES

WIDTH, HEIGHT = 800, 280
LEFT, RIGHT, TOP, BOTTOM = 110, 12, 12, 36  # margins for the axes' labels
# (dash pattern, its name in the legend) per series, in the types' order: told apart without
# colour too.
LOOKS = (("", "solid"), ("8 4", "dashed"), ("2 3", "dotted"))
# type -> (CSS class, dash pattern, look)
SERIES = {
    kind: (f"s-{kind}", dash, look)
    for kind, (dash, look) in zip(TRANSACTION_TYPES, LOOKS, strict=True)
}
POINTS_MAX = 93  # past this many days, no dot (with its tooltip) per day


@dataclass(frozen=True)
class DailySeries:
    """Totals per type and day over ``days`` (zero where a type had no transaction)."""

    days: list[dt.date]
    totals: dict[str, list[Decimal]]
    counts: dict[str, list[int]]


def series_of(rows: Sequence[DailyTotal], first: dt.date, last: dt.date) -> DailySeries:
    days = [first + dt.timedelta(n) for n in range((last - first).days + 1)]
    index = {day: n for n, day in enumerate(days)}
    totals = {kind: [Decimal("0.00")] * len(days) for kind in TRANSACTION_TYPES}
    counts = {kind: [0] * len(days) for kind in TRANSACTION_TYPES}
    for row in rows:
        n = index.get(row.transaction_date)
        if n is not None and row.transaction_type in totals:
            totals[row.transaction_type][n] = row.total_amount
            counts[row.transaction_type][n] = row.tx_count
    return DailySeries(days, totals, counts)


def daily_chart(series: DailySeries) -> str:
    """An SVG line chart of the series (an empty range gives a chart saying so)."""
    days = series.days
    peak = max((v for values in series.totals.values() for v in values), default=Decimal(0))
    title = "Daily totals per transaction type"
    if not days:
        desc = "No days in the range."
    else:
        sums = ", ".join(f"{k} {money(sum(v, Decimal(0)))}" for k, v in series.totals.items())
        desc = f"From {days[0]} to {days[-1]} ({len(days)} days); totals: {sums}."
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    span = max(len(days) - 1, 1)

    def x(n: int) -> float:
        return LEFT + plot_w * (n / span if len(days) > 1 else 0.5)

    def y(value: Decimal) -> float:
        return TOP + plot_h * (1 - float(value / peak)) if peak > 0 else TOP + plot_h

    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        'aria-labelledby="chart-title chart-desc" xmlns="http://www.w3.org/2000/svg">',
        f'<title id="chart-title">{title}</title><desc id="chart-desc">{escape(desc)}</desc>',
    ]
    for step in range(5):  # horizontal grid with amounts
        value = peak * step / 4
        ty = y(value) if peak > 0 else TOP + plot_h * (1 - step / 4)
        parts.append(
            f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{ty:.1f}" y2="{ty:.1f}"/>'
        )
        parts.append(
            f'<text class="tick" x="{LEFT - 6}" y="{ty + 4:.1f}" text-anchor="end">'
            f"{money(value)}</text>"
        )
    if days:
        for n in sorted({0, len(days) // 2, len(days) - 1}):
            anchor = (
                "start" if n == 0 and len(days) > 1 else "end" if n == len(days) - 1 else "middle"
            )
            parts.append(
                f'<text class="tick" x="{x(n):.1f}" y="{HEIGHT - 12}" text-anchor="{anchor}">'
                f"{days[n].isoformat()}</text>"
            )
    for kind, values in series.totals.items():
        css, dash, _look = SERIES[kind]
        points = " ".join(f"{x(n):.1f},{y(v):.1f}" for n, v in enumerate(values))
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        parts.append(f'<polyline class="line {css}" points="{points}"{dash_attr}/>')
        if len(days) <= POINTS_MAX:
            for n, value in enumerate(values):
                parts.append(
                    f'<circle class="dot {css}" cx="{x(n):.1f}" cy="{y(value):.1f}" r="3">'
                    f"<title>{days[n]} {kind}: {money(value)} "
                    f"({series.counts[kind][n]} transactions)</title></circle>"
                )
    parts.append("</svg>")
    return "".join(parts)


def daily_table_rows(rows: Sequence[DailyTotal]) -> str:
    """The chart's figures as ``<tr>`` rows (date, type, count, exact total), escaped: built once
    per commit with the chart rather than by the template at every request."""
    return "".join(
        f"<tr><td>{r.transaction_date.isoformat()}</td><td>{escape(r.transaction_type)}</td>"
        f'<td class="num">{r.tx_count}</td><td class="num">{money(r.total_amount)}</td></tr>'
        for r in rows
    )
