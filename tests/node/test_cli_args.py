"""Arguments the command line must refuse cleanly: a job ID no database can hold, a FWHM or
alpha that is not a finite number. Usage errors exit 2 with one message, never a traceback."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from nodeproc import write_settings


def dipnode(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dipnode.node.cli.main", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    return write_settings(tmp_path / "dipnode.toml", {
        "node": {"allowed_calling_aets": ["*"]},
        "storage": {"spool_dir": str(tmp_path / "spool"), "database": str(tmp_path / "db.sqlite")}})


@pytest.mark.parametrize("command", ["rerun", "resend"])
@pytest.mark.parametrize("job", ["99999999999999999999", "0", "-3"])
def test_job_id_out_of_range_is_a_usage_error(cfg: Path, command: str, job: str) -> None:
    r = dipnode(command, job, "--config", str(cfg))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and "JOB" in r.stderr


@pytest.mark.parametrize(("flag", "value"), [("--fwhm", "inf"), ("--fwhm", "nan"), ("--alpha", "inf"),
                                             ("--alpha", "-inf")])
def test_non_finite_numbers_are_a_usage_error(tmp_path: Path, flag: str, value: str) -> None:
    r = dipnode("denoise", str(tmp_path), "--out", str(tmp_path / "out"), "--method", "gaussian",
                f"{flag}={value}")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and "finite" in r.stderr
