"""Helpers shared by the bench scripts: cached generated inputs, peak RSS, a figures table.

A bench script puts the repository on ``sys.path`` and imports what it needs::

    REPO = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(REPO))
    from bench.common import cached_transactions, peak_rss_mb, print_table  # noqa: E402

Generated CSVs live in ``bench/out/generated/`` (git-ignored), named by every argument that
shapes their bytes (and moneylion.generate.FORMAT_VERSION), so a rerun reuses them. They are
written by a child process, so the generator's memory never counts in the caller's peak RSS.
"""

from __future__ import annotations

import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from moneylion.generate import FORMAT_VERSION

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "out"
GENERATED = OUT / "generated"


def _cached(name: str, call: str) -> Path:
    """``GENERATED/name``, written first by ``moneylion.generate.<call>`` in a child process."""
    path = GENERATED / name
    if path.exists():
        return path
    GENERATED.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".part")
    script = (
        "import sys\nfrom pathlib import Path\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from moneylion import generate as g\n"
        f"g.{call.format(path=f'Path({str(partial)!r})')}\n"
    )
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", script], check=True)
    partial.rename(path)  # only a complete file gets the cached name
    print(f"generated {name} in {time.perf_counter() - started:.1f} s", flush=True)
    return path


def cached_users(users: int, *, seed: int = 1, first_id: int = 1) -> Path:
    """A users CSV of ids ``first_id`` .. ``first_id + users - 1``."""
    return _cached(
        f"users-v{FORMAT_VERSION}-n{users}-first{first_id}-seed{seed}.csv",
        f"write_users({{path}}, {users}, seed={seed}, first_id={first_id})",
    )


def cached_transactions(
    transactions: int, *, users: int, first_id: int, seed: int = 1, bad_rate: float = 0.0
) -> Path:
    """A transactions CSV of ids ``first_id`` on, for users 1..``users`` (plus a few orphans)."""
    return _cached(
        f"tx-v{FORMAT_VERSION}-n{transactions}-users{users}-first{first_id}-seed{seed}"
        f"-bad{bad_rate:g}.csv",
        f"write_transactions({{path}}, {transactions}, users={users}, seed={seed}, "
        f"first_id={first_id}, bad_rate={bad_rate!r})",
    )


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MB: the kernel's high-water mark of
    its memory (VmHWM, in KiB), which exec starts afresh; ru_maxrss would not, so a process
    spawned by a large one would report its parent's size."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def ratio(value: float, target: float, *, lower_is_better: bool) -> str:
    """``value / target`` and whether the target is met, e.g. ``0.62 of target (met)``."""
    met = value <= target if lower_is_better else value >= target
    return f"{value / target:.2f} of target ({'met' if met else 'MISSED'})"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A plain left-aligned text table on stdout."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[n]) for row in cells) for n in range(len(headers))]
    for number, row in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if number == 0:
            print("  ".join("-" * w for w in widths))
    sys.stdout.flush()
