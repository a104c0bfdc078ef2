"""Crash soak: SIGKILL a running `dipnode serve` at random moments while several senders stream
studies in and jobs run, restart it, and check after every kill that nothing acknowledged was
lost and nothing partial is taken for whole.

    .venv/bin/python bench/crash_soak.py --kills 20 --seed 1 --studies 6 --out /tmp/soak

The machinery and what it checks: tests/harness/soak.py (tests/node/test_crash.py runs it
smaller). Figures: bench/RELIABILITY.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

# The harness lives with the tests (tests/ is not a package; pytest puts it on the path too).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from harness.soak import run_soak, table  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--studies", type=int, default=6)
    p.add_argument("--senders", type=int, default=3)
    p.add_argument("--slices", type=int, default=16)
    p.add_argument("--size", type=int, default=16, help="rows = columns")
    p.add_argument("--method", choices=("sdip", "sdip-paper", "cdip", "gaussian"), default="sdip")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--gap", type=float, default=10.0, help="seconds between a sender's studies")
    p.add_argument("--no-pacs", action="store_true", help="no storescp destination")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    r = run_soak(a.out, kills=a.kills, seed=a.seed, studies=a.studies, senders=a.senders,
                 slices=a.slices, size=a.size, method=a.method, epochs=a.epochs, gap_s=a.gap,
                 pacs=not a.no_pacs)
    print(table(r))
    for problem in r.problems[:50]:
        print("PROBLEM", problem)
    (a.out / "result.json").write_text(json.dumps(asdict(r), indent=1))
    return 0 if r.ok else 1


if __name__ == "__main__":
    sys.exit(main())
