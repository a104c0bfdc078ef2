"""The reliability harness: crash soak, load and hostile peers against a real `dipnode serve`.

The bench scripts (bench/crash_soak.py, bench/load.py, bench/hostile.py) are its command lines
and write the figures of bench/RELIABILITY.md; the tests (tests/node/test_crash.py,
test_load.py, test_hostile.py) run the same machinery smaller. Shared pieces live beside it in
tests/: real peers and the one free-port helper (peers.py), the node as a process and the one
settings writer (nodeproc.py), crafted DICOM (craft.py). The node's database is only read,
through a read-only Store (node/jobs/store.py), never with SQL of its own.
"""
