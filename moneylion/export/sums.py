"""An aggregate's measures of new rows, summed in Python: what a small increment adds to the
SQLite file's totals (a DuckDB GROUP BY of a few rows costs more than the sums themselves).

The summing function is compiled from the aggregate's declaration (``model.Aggregate``) once,
as ``dataclasses`` compiles its methods: one pass over the rows, one branch per measure, so it
stays as fast as a hand-written loop while the declaration stays the only place a measure is
written. ``tests/test_model.py`` holds it to DuckDB's ``aggregates.aggregate_of`` on the same
rows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from moneylion.model import TYPE_COLUMN, Aggregate, Fold, Measure

Columns = Mapping[str, Sequence[Any]]
Summer = Callable[[Columns], list[list[Any]]]


def cents_of(column: str) -> str:
    """The name a money column's values in integer cents go by."""
    return f"{column}_cents"


def _source(measure: Measure) -> str | None:
    """The column a measure reads (money: in cents), None for a count."""
    if measure.of is None:
        return None
    return cents_of(measure.of) if measure.money else measure.of


def _first(measure: Measure, value: str, kind: str) -> str:
    """The measure of a key's first row."""
    if measure.of is None:
        return "1"
    if measure.only is not None:
        return f"({value} if {kind} == {measure.only!r} else 0)"
    return value


def _update(measure: Measure, slot: str, value: str, kind: str) -> str:
    """The statement folding one more row into the measure held in ``slot``."""
    if measure.of is None:
        return f"{slot} += 1"
    if measure.fold is Fold.MIN:
        return f"if {value} < {slot}: {slot} = {value}"
    if measure.fold is Fold.MAX:
        return f"if {value} > {slot}: {slot} = {value}"
    if measure.only is not None:
        return f"if {kind} == {measure.only!r}: {slot} += {value}"
    return f"{slot} += {value}"


def compile_summer(aggregate: Aggregate) -> Summer:
    """``sums(columns) -> rows``: per key (in key order), the key's values and then each measure
    of its rows. ``columns`` maps a column name to its values; a money column ``c`` is read in
    integer cents, from ``cents_of(c)``."""
    needed = list(aggregate.key)
    for measure in aggregate.measures:
        for name in (_source(measure), TYPE_COLUMN if measure.only else None):
            if name is not None and name not in needed:
                needed.append(name)
    var = {name: f"v{i}" for i, name in enumerate(needed)}
    kind = var.get(TYPE_COLUMN, "None")
    key = (
        var[aggregate.key[0]]
        if len(aggregate.key) == 1
        else "(" + ", ".join(var[name] for name in aggregate.key) + ")"
    )
    first = ", ".join(_first(m, var.get(_source(m) or "", ""), kind) for m in aggregate.measures)
    updates = [
        _update(m, f"entry[{i}]", var.get(_source(m) or "", ""), kind)
        for i, m in enumerate(aggregate.measures)
    ]
    row = "[key, *entry]" if len(aggregate.key) == 1 else "[*key, *entry]"
    source = "\n".join(
        [
            "def sums(columns):",
            "    totals = {}",
            "    get = totals.get",
            f"    for {', '.join(var.values())} in zip("
            + ", ".join(f"columns[{name!r}]" for name in needed)
            + ", strict=True):",
            f"        entry = get({key})",
            "        if entry is None:",
            f"            totals[{key}] = [{first}]",
            "            continue",
            *(f"        {statement}" for statement in updates),
            f"    return [{row} for key, entry in sorted(totals.items())]",
        ]
    )
    namespace: dict[str, Any] = {}
    exec(compile(source, f"<sums of {aggregate.table}>", "exec"), namespace)  # noqa: S102
    summer: Summer = namespace["sums"]
    summer.__doc__ = source
    return summer
