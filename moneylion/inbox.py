"""Where an inbox file goes once its outcome is committed: ``done/<day>/`` or ``failed/<day>/``.

Files are set aside in a folder per UTC day (``done/2026-12-01/x.csv``), so no folder grows
with the ledger and nothing ever lists the old ones; ``done_retention_days`` prunes loaded
files by day. Only the ingest worker writes into these folders, so choosing a free name and
then taking it cannot race. A file is set aside by ``link`` + ``unlink`` rather than ``rename``:
a rename out of the (watched) inbox into an unwatched folder is an unpaired IN_MOVED_FROM,
which watchdog holds back 0.5 s waiting for its pair, delaying every event queued behind it;
an unlink is an IN_DELETE, passed on at once.
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import itertools
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from moneylion.source import csv_name

log = logging.getLogger(__name__)

# The longest name the usual file systems take (ext4, xfs, btrfs, tmpfs: 255 bytes), and what a
# name in done/ or failed/ may have to carry besides its own: ".<n>" on a clash, ".reason.json".
NAME_MAX_BYTES = 255
REASON_SUFFIX = ".reason.json"
_NAME_RESERVE = len(REASON_SUFFIX) + len(".9999")
_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")
# A hard link is refused by some file systems: then a rename does (on the same one).
_NO_LINK = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS}
_temp_names = itertools.count()


def day_folder(root: Path, when: dt.datetime | None = None) -> Path:
    """``root/<YYYY-MM-DD>`` for the UTC day of ``when`` (now by default)."""
    when = when or dt.datetime.now(dt.UTC)
    return root / when.strftime("%Y-%m-%d")


def safe_name(name: str) -> str:
    """``name`` if it fits a folder of set-aside files with its suffixes, else a shortened
    name that stays unique and traceable: a prefix of it, ``~`` and 12 hex digits of its
    sha256, its extension (``.csv.gz`` for a compressed one). The ledger and the reason file keep
    the full name."""
    raw = os.fsencode(name)
    if len(raw) + _NAME_RESERVE <= NAME_MAX_BYTES:
        return name
    plain = csv_name(name)  # a compressed file keeps both suffixes: x.csv.gz
    stem, suffix = os.path.splitext(plain)
    suffix += name[len(plain) :]
    if len(os.fsencode(suffix)) > 16:
        stem, suffix = name, ""
    tag = "~" + hashlib.sha256(raw).hexdigest()[:12]
    budget = NAME_MAX_BYTES - _NAME_RESERVE - len(tag) - len(os.fsencode(suffix))
    prefix = os.fsencode(stem)[:budget].decode("utf-8", errors="ignore")
    return prefix + tag + suffix


def move_without_overwrite(path: Path, folder: Path, *, companion_suffix: str = "") -> Path:
    """Move ``path`` into ``folder`` under its own name (shortened by ``safe_name`` if it is
    too long), or ``<stem>.<n><suffix>`` on a clash; the path it now has.

    With ``companion_suffix`` (".reason.json") the companion's name must be free as well. A
    link or a pipe is moved itself (neither link nor rename follows a link). If a crash came
    between the link and the unlink, the file is found under its own name already and only the
    inbox's name is removed. The link itself is the test for a free name (it never replaces
    one), and ``folder`` is made only when the link says it is missing: a stream of files pays
    two system calls a file.
    """
    name = safe_name(path.name)
    stem, suffix = os.path.splitext(name)
    n = 0
    while True:
        target = folder / (f"{stem}.{n}{suffix}" if n else name)
        if companion_suffix and os.path.lexists(target.with_name(target.name + companion_suffix)):
            n += 1
            continue
        try:
            os.link(path, target, follow_symlinks=False)
        except FileExistsError:
            if _same_file(path, target):
                os.unlink(path)
                return target
            n += 1
            continue
        except FileNotFoundError:
            if folder.is_dir():
                raise  # the file itself is gone
            folder.mkdir(parents=True, exist_ok=True)
            continue
        except OSError as exc:
            if exc.errno not in _NO_LINK:
                raise
            if os.path.lexists(target):  # a rename would replace it
                n += 1
                continue
            folder.mkdir(parents=True, exist_ok=True)
            os.rename(path, target)
            return target
        os.unlink(path)
        return target


def candidate_names(name: str, folder: Path) -> Iterator[Path]:
    """The paths ``move_without_overwrite`` may have given a file of this name in ``folder``:
    its own (shortened) name, then ``<stem>.<n><suffix>`` while those exist."""
    name = safe_name(name)
    stem, suffix = os.path.splitext(name)
    for n in itertools.count():
        target = folder / (f"{stem}.{n}{suffix}" if n else name)
        if n and not os.path.lexists(target):
            return
        yield target


def _same_file(a: Path, b: Path) -> bool:
    try:
        first, second = os.lstat(a), os.lstat(b)
    except OSError:
        return False
    return (first.st_dev, first.st_ino) == (second.st_dev, second.st_ino)


def write_reason(target: Path, document: dict[str, object]) -> Path:
    """Write ``<target>.reason.json`` atomically (a short hidden temp name, then rename)."""
    reason = target.with_name(target.name + REASON_SUFFIX)
    temp = reason.with_name(f".reason-{os.getpid()}-{next(_temp_names)}.tmp")
    temp.write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(temp, reason)
    return reason


def set_aside_files(root: Path) -> list[Path]:
    """Every file under ``root`` (done/ or failed/, their day folders included), by name.

    For tests and tools: the daemon itself never lists these folders.
    """
    found: list[Path] = []
    for folder, dirs, files in os.walk(root):  # never into a linked folder
        names = files + [d for d in dirs if os.path.islink(os.path.join(folder, d))]
        found += [Path(folder, name) for name in names]
    return sorted(found, key=lambda p: (p.name, str(p)))


def prune_days(root: Path, keep_days: int, today: dt.date | None = None) -> list[Path]:
    """Remove the day folders of ``root`` older than ``keep_days`` days; the ones removed.

    Lists ``root`` itself only (one entry per day), never the files inside a day it keeps.
    """
    if keep_days <= 0 or not root.is_dir():
        return []
    today = today or dt.datetime.now(dt.UTC).date()
    oldest = today - dt.timedelta(days=keep_days)
    removed: list[Path] = []
    for entry in os.scandir(root):
        if not (_DAY.match(entry.name) and entry.is_dir(follow_symlinks=False)):
            continue
        try:
            day = dt.date.fromisoformat(entry.name)
        except ValueError:
            continue
        if day < oldest:
            shutil.rmtree(entry.path)
            removed.append(Path(entry.path))
            log.info("done_day_pruned", extra={"fields": {"folder": entry.path}})
    return removed
