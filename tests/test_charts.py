"""The dashboard's SVG chart and table rows, from rows as the daily query returns them."""

from __future__ import annotations

import datetime as dt
import xml.etree.ElementTree as ET
from decimal import Decimal

from moneylion.api.charts import daily_chart, daily_table_rows, series_of
from moneylion.api.queries import DailyTotal

SVG = "{http://www.w3.org/2000/svg}"
DAY = dt.date(2022, 1, 1)
ROWS = [
    DailyTotal(DAY, "deposit", 2, Decimal("10.50")),
    DailyTotal(DAY + dt.timedelta(2), "deposit", 1, Decimal("0.01")),
    DailyTotal(DAY + dt.timedelta(2), "purchase", 3, Decimal("99999999999999.99")),
]


def parse(svg: str) -> ET.Element:
    """Our own chart (well-formed XML is part of what is tested)."""
    return ET.fromstring(svg)  # noqa: S314 - generated here, not untrusted input


def test_days_without_a_type_are_zero_and_sums_stay_exact() -> None:
    series = series_of(ROWS, DAY, DAY + dt.timedelta(3))
    assert series.days == [DAY + dt.timedelta(n) for n in range(4)]
    assert series.totals["deposit"] == [Decimal("10.50"), 0, Decimal("0.01"), 0]
    assert series.totals["withdrawal"] == [0, 0, 0, 0]
    svg = parse(daily_chart(series))
    assert svg.get("role") == "img"
    desc = svg.find(f"{SVG}desc")
    assert desc is not None
    assert desc.text == (
        "From 2022-01-01 to 2022-01-04 (4 days); totals: deposit 10.51, "
        "withdrawal 0.00, purchase 99999999999999.99."
    )
    lines = svg.findall(f"{SVG}polyline")
    assert [line.get("class") for line in lines] == [
        "line s-deposit",
        "line s-withdrawal",
        "line s-purchase",
    ]
    assert [line.get("stroke-dasharray") for line in lines] == [None, "8 4", "2 3"]
    tooltips = [t.text for t in svg.iter(f"{SVG}title")]
    assert "2022-01-03 purchase: 99999999999999.99 (3 transactions)" in tooltips


def test_an_empty_range_still_draws_a_chart_saying_so() -> None:
    svg = parse(daily_chart(series_of([], DAY, DAY - dt.timedelta(1))))
    desc = svg.find(f"{SVG}desc")
    assert desc is not None
    assert desc.text == "No days in the range."


def test_table_rows_are_exact_and_escaped() -> None:
    odd = DailyTotal(DAY, "<b>deposit</b>", 1, Decimal("1.5"))
    html = daily_table_rows([*ROWS, odd])
    assert '<td class="num">99999999999999.99</td>' in html
    assert "&lt;b&gt;deposit&lt;/b&gt;" in html
    assert "<b>" not in html
    assert '<td class="num">1.50</td>' in html
