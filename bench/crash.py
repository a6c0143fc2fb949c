"""Crash trials: a ``moneylion serve`` child SIGKILLed at random moments while it ingests a stream
of small files (fresh, exact re-sends, overlapping), restarted until every file is in; each trial
is exact when every file is in done/ once, verify passes and the totals equal csv + Decimal.

    .venv/bin/python bench/crash.py [--trials 50] [--files 30] [--rows 200]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.daemon_process import TrialResult, crash_trial  # noqa: E402

OUT = REPO / "bench" / "out" / "crash"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--files", type=int, default=30)
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--first-seed", type=int, default=1000)
    args = parser.parse_args()

    exact = kills = recovered = 0
    started = time.perf_counter()
    for n in range(args.trials):
        seed = args.first_seed + n
        base = OUT / f"trial-{seed}"
        shutil.rmtree(base, ignore_errors=True)
        try:
            result = crash_trial(base, seed, files=args.files, rows=args.rows)
        except Exception as exc:  # a trial that cannot finish is not exact; say why, go on
            result = TrialResult(0, False, [f"{type(exc).__name__}: {exc}"])
        exact += result.exact
        kills += result.kills
        recovered += result.recovered
        verdict = "exact" if result.exact else "NOT EXACT: " + "; ".join(result.problems)
        print(
            f"trial {n + 1:>3} (seed {seed}): {result.kills} kills, "
            f"{result.recovered} committed-not-moved recovered, {verdict}",
            flush=True,
        )
        if result.exact:
            shutil.rmtree(base, ignore_errors=True)  # keep only the failures for a look
    print(
        f"crash trials: {exact}/{args.trials} exact, {kills} SIGKILLs, "
        f"{recovered} files committed by a killed run and moved by the next, "
        f"{time.perf_counter() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
