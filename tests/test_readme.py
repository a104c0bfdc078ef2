"""What the README tells people, checked against the code and run as written where it can be.

The README's two commands themselves (the demo line, `bash .ci/run`) run from a fresh clone
outside the suite; here: the install line is the one CI and the image use, the numbers and
lists it quotes are the code's, its settings examples load, its command table is the parser,
and its database backup and restore work on a running node.
"""
from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from pydicom.uid import UID

from dipnode.dicom_io.scp import DEFAULT_SOP_CLASSES, DEFAULT_TRANSFER_SYNTAXES, VERIFICATION, ReceiverConfig
from dipnode.dicom_io.scu import PARAMETRIC_MAP_STORAGE
from dipnode.models.params import PRESETS
from dipnode.node.cli.main import build_parser
from dipnode.node.settings import NodeSettings, Settings, StorageSettings, load_settings

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
TORCH_CPU = "torch==2.13.0 --extra-index-url https://download.pytorch.org/whl/cpu"


def indented_commands() -> list[str]:
    """The README's indented (4-space) code lines: the commands it tells people to type."""
    return [ln[4:] for ln in README.splitlines() if ln.startswith("    ") and not ln.startswith("     ")]


def fenced(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def section(title: str) -> str:
    start = README.index(f"## {title}")
    end = README.find("\n## ", start + 3)
    return README[start:end if end > 0 else None]


# -- install --------------------------------------------------------------------------------
def test_install_line_is_what_ci_the_image_and_pyproject_use() -> None:
    demo = [c for c in indented_commands() if c.endswith("dipnode demo")]
    assert demo == ["python3 -m venv .venv && . .venv/bin/activate && pip install "
                    f"{TORCH_CPU} && pip install -e . && dipnode demo"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert f"python -m pip install -q {TORCH_CPU}\n" in ci
    assert 'python -m pip install -q -e ".[test,ray]"\n' in ci
    # The GPU host's line: the same version, PyPI's (CUDA) build.
    gpu = [c for c in indented_commands() if "pip install torch==2.13.0 &&" in c]
    assert gpu == ["python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e ."]
    assert "RUN pip install --no-cache-dir torch==2.13.0\n" in (ROOT / "deploy" / "Dockerfile").read_text()
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert [d for d in deps if d.startswith("torch")] == ["torch==2.13.0"]


def test_the_ray_extra_pins_one_ray_and_brings_no_torch() -> None:
    # Ray wants one Ray version across the node and the cluster; the extra must not move torch.
    from importlib.metadata import requires, version

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["ray"] == ["ray[client]>=2.60.0,<2.61"]
    assert version("ray").startswith("2.60.")
    assert not [r for r in requires("ray") or [] if r.split()[0].lower().startswith("torch")]


def test_the_tested_torch_is_the_pinned_one() -> None:
    from importlib.metadata import version

    assert version("torch").split("+")[0] == "2.13.0"


def test_license_is_an_spdx_string_with_its_text() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"  # PEP 639
    assert "setuptools>=77" in project["build-system"]["requires"]
    assert "Apache License" in (ROOT / "LICENSE").read_text()


# -- numbers and lists quoted from the code --------------------------------------------------
def _unet(base: int, depth: int) -> str:
    return "/".join(str(base * 2 ** i) for i in range(depth)) + f" + {base * 2 ** depth}"


@pytest.mark.parametrize("name", ["paper", "fast"])
def test_presets_as_the_readme_describes_them(name: str) -> None:
    p = PRESETS[name]
    text = section("Configuration")
    m = re.search(rf"`{name}` \((\d+) (?:L-BFGS )?epochs of up to (\d+) inner\s+iterations, m = (\d+), "
                  rf"M = (\d+), α = ([\d.]+), U-Net\s+([\d/]+ \+ \d+)", text)
    assert m, f"README's {name} preset line not found"
    assert (int(m[1]), int(m[2]), int(m[3]), int(m[4]), float(m[5]), m[6]) == (
        p.epochs, p.max_iter, p.sample_from, p.sample_every, p.alpha, _unet(p.base_channels, p.depth))


def test_node_defaults_as_the_readme_says() -> None:
    n = NodeSettings(allowed_calling_aets=["PACS"])
    assert "listens on `127.0.0.1:11112` by default" in README
    assert (n.host, n.port) == ("127.0.0.1", 11112)
    assert "`[storage] min_free_mb` (default 1024)" in README.replace("\n", " ")
    assert StorageSettings().min_free_mb == 1024


def _table_after(marker: str) -> list[tuple[str, str]]:
    text = README[README.index(marker):]
    rows = re.findall(r"(?m)^\| (.+?) \| `([\d.]+)` \|$", text.split("\n\n", 2)[1])
    return rows


def test_accepted_sop_classes_as_the_code_offers_them() -> None:
    rows = _table_after("**What it accepts**")
    assert [uid for _, uid in rows] == [*DEFAULT_SOP_CLASSES, VERIFICATION]
    for name, uid in rows:
        assert name.startswith(UID(uid).name), (name, uid)


def test_accepted_transfer_syntaxes_as_the_code_offers_them() -> None:
    rows = _table_after("in these transfer syntaxes")
    assert [uid for _, uid in rows] == list(DEFAULT_TRANSFER_SYNTAXES)
    assert all(name == UID(uid).name for name, uid in rows)
    # "the last seven, deflate included, only while accept_compressed = true"
    assert "the last seven, deflate included, only while" in README
    plain = ReceiverConfig(accept_compressed=False).offered_transfer_syntaxes
    assert list(plain) == list(DEFAULT_TRANSFER_SYNTAXES[:-7])
    assert f"Parametric Map Storage\n(`{PARAMETRIC_MAP_STORAGE}`)" in README


# -- the command line -----------------------------------------------------------------------
def test_command_table_is_the_parser() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    rows = re.findall(r"(?m)^\| `dipnode (\w+)([^`]*)` \|", section("Command line"))
    assert sorted(c for c, _ in rows) == sorted(sub.choices)
    for command, usage in rows:
        in_readme = set(re.findall(r"--[a-z-]+", usage))
        in_parser = {o for a in sub.choices[command]._actions for o in a.option_strings
                     if o.startswith("--") and o != "--help"}
        assert in_readme == in_parser, command


def test_container_commands_as_the_compose_file_documents_them() -> None:
    compose = (ROOT / "deploy" / "compose.yaml").read_text()
    line = "docker compose -f deploy/compose.yaml exec dipnode dipnode jobs"
    assert line in indented_commands() and line in compose
    # tests/test_deploy.py runs `dipnode jobs` in the container's environment.


# -- settings examples ----------------------------------------------------------------------
def test_every_toml_example_loads(tmp_path: Path) -> None:
    blocks = fenced("toml")
    assert len(blocks) == 6  # query/retrieve sources, listening, TLS, retention, the HTTP port, Ray
    loaded = []
    for i, block in enumerate(blocks):
        data = tomllib.loads(block)
        data.setdefault("node", {}).setdefault("allowed_calling_aets", ["PACS"])
        path = tmp_path / f"{i}.toml"
        if "allowed_calling_aets" not in block:  # a fragment: the key every file must have
            block = (block.replace("[node]\n", '[node]\nallowed_calling_aets = ["PACS"]\n', 1)
                     if re.search(r"^\[node\]$", block, re.M)
                     else '[node]\nallowed_calling_aets = ["PACS"]\n\n' + block)
        path.write_text(block)
        loaded.append(load_settings(path))
    sources, listening, tls, retention, http, ray = loaded
    # The retention block is the defaults, as the README says.
    assert retention.retention == Settings(node={"allowed_calling_aets": ["PACS"]}).retention
    assert retention.emergency_free_mb == 2 * retention.storage.min_free_mb
    assert http.http.host == "0.0.0.0" and http.http.token and http.http.refresh_s == 15
    assert (ray.workers.executor, ray.workers.ray_address, ray.workers.ray_unreachable) == ("ray", "ray-head:6379", "wait")
    assert sources.sources[0].retrieve == "move" and sources.retrieve.retries == 3
    assert listening.node.host == "0.0.0.0" and listening.node.allowed_calling_aets == ["ORTHANC", "PETMR1"]
    assert tls.node.tls_enabled and tls.node.tls_require_client_cert and tls.sender.tls


def test_http_defaults_and_metric_table_as_the_node_has_them(tmp_path: Path) -> None:
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from dipnode.node.jobs.store import Store
    from dipnode.node.ops.metrics import NodeMetrics

    from dipnode.node.settings import HttpSettings

    h = HttpSettings()  # the section's defaults (tests/conftest.py moves the port through the environment)
    assert "on by default at `http://127.0.0.1:8480/`" in README
    assert (h.enabled, h.host, h.port) == (True, "127.0.0.1", 8480)
    with Store.open(tmp_path / "db.sqlite") as store:
        metrics = NodeMetrics(lambda: store, tmp_path)
        metrics.instances_refused.labels(status="0xA700").inc()  # labelled families show once used
        metrics.series_completed.labels(modality="PT").inc()
        metrics.fit_seconds.labels(method="sdip").observe(1)
        metrics.retention_sweeps.labels(kind="scheduled").inc()
        exposed = set()
        for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
            kind = family.type
            for sample in family.samples:
                name = sample.name
                if kind == "histogram":
                    name = family.name
                elif name.endswith("_created"):
                    continue
                exposed.add(name)
    in_readme = {m for m in re.findall(r"(?m)^\| `(dipnode_\w+)", section("Operations"))}
    # The GPU gauge appears only on CUDA (this test runs where there may be none).
    assert in_readme - {"dipnode_gpu_memory_peak_bytes"} == exposed


# -- database backup and restore, on a running node, as written ------------------------------
def _readme_command(start: str) -> list[str]:
    found = [c for c in indented_commands() if start in c]
    assert len(found) == 1, (start, found)
    return shlex.split(found[0])


@pytest.mark.network
@pytest.mark.timeout(120)
def test_database_backup_and_restore_as_written(tmp_path: Path) -> None:
    from dipnode.dicom_io.scu import Destination, send_files
    from dipnode.node.server import Node
    from peers import require, tiny_pet_files

    require("sqlite3")
    db, spool = tmp_path / "lib" / "dipnode.sqlite", tmp_path / "lib" / "spool"
    backup_cli, backup_py = tmp_path / "bk" / "dipnode.sqlite", tmp_path / "lib" / "backup.sqlite"
    backup_cli.parent.mkdir()
    settings = Settings(node={"host": "127.0.0.1", "port": 0, "allowed_calling_aets": ["SCANNER"]},
                        storage={"spool_dir": spool, "database": db, "min_free_mb": 0},
                        series={"stable_age_s": 3600.0})  # nothing completes: no jobs here

    def push(node: Node, folder: str, n: int) -> None:
        report = send_files(tiny_pet_files(tmp_path / folder, n=n),
                            Destination("DIPNODE", "127.0.0.1", node.port), calling_ae="SCANNER")
        assert report.all_ok, report

    node = Node(settings)
    node.start()
    try:
        push(node, "first", 3)
        assert Path(f"{db}-wal").stat().st_size > 0  # recent commits are in the WAL
        # The README's sqlite3 command, with this node's paths; the node keeps running.
        cli = [a.replace("/var/lib/dipnode/dipnode.sqlite", str(db))
                .replace("/var/backups/dipnode.sqlite", str(backup_cli))
               for a in _readme_command("sqlite3 /var/lib/dipnode/dipnode.sqlite")]
        r = subprocess.run(cli, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        # The container's form: Python's backup API, the command after `exec dipnode`.
        py = _readme_command("exec dipnode python -c")
        py = py[py.index("python"):]
        py = [sys.executable] + [a.replace("/var/lib/dipnode", str(db.parent)) for a in py[1:]]
        r = subprocess.run(py, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        push(node, "second", 2)  # after the backup
    finally:
        node.stop()
    for copy in (backup_cli, backup_py):
        from dipnode.node.jobs.store import Store

        with Store.open(copy) as s:
            assert len(s.indexed_paths()) == 3  # the WAL's commits are in the copy
    # Restore as written: the copy in place, -wal and -shm deleted, start: the two instances
    # received after the backup are indexed again from the spool.
    shutil.copy(backup_cli, db)
    Path(f"{db}-wal").unlink(missing_ok=True)  # a clean stop checkpoints and removes it
    Path(f"{db}-shm").unlink(missing_ok=True)
    node = Node(settings)
    node.start()
    try:
        deadline = time.monotonic() + 30
        while len(node.store.indexed_paths()) < 5 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(node.store.indexed_paths()) == 5
    finally:
        node.stop()
    assert ("put the copy in place of `dipnode.sqlite`, delete\n`dipnode.sqlite-wal` and "
            "`dipnode.sqlite-shm` where they remain") in README
