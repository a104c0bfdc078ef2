"""Load: many concurrent associations, each a whole PET series, into a node that runs a job.

    .venv/bin/python bench/load.py --associations 8 --slices 112 --size 128 --out /tmp/load

The machinery, what it checks and measures: tests/harness/load.py (tests/node/test_load.py
runs it smaller). Figures: bench/RELIABILITY.md.
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
from harness.load import run_load, table  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--associations", type=int, default=8)
    p.add_argument("--slices", type=int, default=112)
    p.add_argument("--size", type=int, default=64, help="rows = columns")
    p.add_argument("--job-epochs", type=int, default=400,
                   help="epochs of the background job; 0: no job (receive-only memory baseline)")
    p.add_argument("--sender", choices=("storescu", "pynetdicom"), default="storescu",
                   help="SCU: DCMTK storescu processes (default), or pynetdicom threads in this "
                        "process (see RELIABILITY.md: its responses can go missing under load)")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    r = run_load(a.out, associations=a.associations, slices=a.slices, size=a.size,
                 job_epochs=a.job_epochs, sender=a.sender)
    print(table(r))
    for problem in r.problems[:50]:
        print("PROBLEM", problem)
    (a.out / "result.json").write_text(json.dumps(asdict(r), indent=1))
    return 0 if r.ok else 1


if __name__ == "__main__":
    sys.exit(main())
