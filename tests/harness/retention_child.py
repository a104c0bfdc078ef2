"""A retention sweep in its own process that stops at a given point and waits to be killed
(tests/node/test_retention_kill.py). Usage: DB SPOOL NOW POINT, POINT one of ``file:K`` (before
deleting the K-th file, from 0) or ``drop:K`` (before the K-th series' instance rows go)."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from dipnode.node.ops import retention
from dipnode.node.jobs.store import Store


def main() -> None:
    db, spool, now, point = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    where, k = point.split(":")
    calls = {"file": 0, "drop": 0}

    def pause_at(what: str) -> None:
        if what == where and calls[what] == int(k):
            print("paused", flush=True)
            time.sleep(600)  # the test kills us here
        calls[what] += 1

    remove_file = retention._remove_file

    def hooked_remove(path: Path) -> int:
        pause_at("file")
        return remove_file(path)

    retention._remove_file = hooked_remove
    store = Store.open(Path(db))
    drop = store.drop_purged_instances

    def hooked_drop(uid: str) -> int:
        pause_at("drop")
        return drop(uid)

    store.drop_purged_instances = hooked_drop  # type: ignore[method-assign]
    retention.Retention(store, spool, retention.Policy(1, 1, 1, 0)).sweep(now)
    print("finished", flush=True)


if __name__ == "__main__":
    main()
