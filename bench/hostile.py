"""Hostile and buggy peers against a real `dipnode serve`: every attack, the node's answer, and
whether it kept serving (C-ECHO + a DCMTK storescu store) and restarted on the same spool.

    .venv/bin/python bench/hostile.py --out /tmp/hostile              # the attack table
    .venv/bin/python bench/hostile.py --out /tmp/hostile --rss        # + peak RSS under 10
                                                                      #   hostile associations

The attacks, the limits the node runs with and the memory measurement: tests/harness/hostile.py
(tests/node/test_hostile.py runs every attack as a test). Figures: bench/RELIABILITY.md.
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
from harness.hostile import RSS_KINDS, measure_rss, run, table  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rss", action="store_true", help="also measure peak RSS under 10 hostile associations")
    ap.add_argument("--only", nargs="*", help="attack names (default: all)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows, clean = run(args.out / "attacks", args.only)
    print(table(rows))
    print(f"node log free of NUL/ESC bytes and lines over 2000 characters: {clean}")
    result: dict[str, object] = {"attacks": [asdict(r) for r in rows], "log_clean": clean}
    if args.rss:
        result["rss"] = [measure_rss(args.out, kind) for kind in RSS_KINDS]
    (args.out / "hostile.json").write_text(json.dumps(result, indent=2))
    ok = clean and all(r.as_expected and r.kept_serving and r.restarted for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
