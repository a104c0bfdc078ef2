"""`dipnode demo` end to end with the tiny preset: the report and its DICOM outputs appear."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dipnode.node.cli.demo import run_demo


@pytest.mark.slow
@pytest.mark.network
@pytest.mark.timeout(400)
def test_demo_writes_the_report(tmp_path: Path) -> None:
    out = run_demo(tmp_path / "report", preset_name="tiny", device="cpu")
    for name in ("images.png", "tradeoff.png", "metrics.md", "metrics.json"):
        assert (out / name).stat().st_size > 1000, name
    report = json.loads((out / "metrics.json").read_text())
    rows = report["metrics"]
    assert {"OSEM (1/10 dose)", "conditional DIP", "OSEM full dose (reference)"} <= set(rows)
    sdip = next(v for k, v in rows.items() if k.startswith("SDIP"))
    # The delivered SDIP (read back from the receiving store) is less noisy than the OSEM.
    assert sdip["wm_cov_percent"] < rows["OSEM (1/10 dose)"]["wm_cov_percent"]
    assert {c["method"] for c in report["curves"]} == {"OSEM + Gaussian", "conditional DIP", "SDIP"}
    # 16-bit DICOM round trip of what the PACS received against the fit's float output.
    diff = report["run"]["delivered SDIP (16-bit DICOM) vs the fit's float output (max abs diff / max)"]
    assert float(diff) < 1e-3
    # Folders named for what they hold (before: one folder per UID): derived PET, plain
    # stability map and plain data weight one file per slice, named by instance number; two
    # Parametric Maps.
    folders = {d.name: sorted(f.name for f in d.iterdir()) for d in (out / "dicom").iterdir()}
    assert sorted(folders) == ["data-weight", "data-weight-plain", "pet-sdip", "stability-map",
                               "stability-map-plain"]
    assert folders["pet-sdip"] == folders["stability-map-plain"] == folders["data-weight-plain"] \
        == [f"{i:04d}.dcm" for i in range(1, 44)]
    assert folders["stability-map"] == folders["data-weight"] == ["0001.dcm"]
    assert len(list((out / "dicom").rglob("*.dcm"))) == 3 * 43 + 2
    assert report["run"]["preset"] == "tiny"
    assert not (out / "work").exists()
