"""`dipnode denoise`, `send`, `echo`, `jobs` as a user runs them (real processes, real peers)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dipnode.dicom_io.series import load_volume, read_datasets, split_series
from dipnode.dicom_io.suv import suv_bw_factor
from dipnode.sim.study import PhantomStudy, write_phantom_study
from peers import OrthancPeer, dciodvfy_errors, free_port

pytestmark = pytest.mark.timeout(300)


def dipnode(*args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "dipnode.node.cli", *args],
                            capture_output=True, text=True, timeout=280)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> PhantomStudy:
    return write_phantom_study(tmp_path_factory.mktemp("study"), voxel_mm=4.0, dose_fraction=0.1)


def _volume(folder: Path, sop_class: str = "1.2.840.10008.5.1.4.1.1.128"):
    groups = split_series([d for d in read_datasets(sorted(folder.rglob("*.dcm")))
                           if d.SOPClassUID == sop_class])
    assert len(groups) == 1, list(groups)
    return load_volume(next(iter(groups.values())))


@pytest.mark.slow
def test_denoise_sdip_keeps_shape_geometry_and_suv_scale(study: PhantomStudy, tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = dipnode("denoise", str(study.pet_dir), str(study.mr_dir), "--out", str(out),
                "--preset", "tiny", "--device", "cpu", check=True)
    assert "derived PET" in r.stdout
    src = _volume(study.pet_dir)
    res = _volume(out / "pet")
    assert res.values.shape == src.values.shape
    np.testing.assert_allclose(res.geometry.affine, src.geometry.affine, atol=1e-4)
    assert res.frame_of_reference_uid == src.frame_of_reference_uid
    assert res.study_instance_uid == src.study_instance_uid
    assert res.series_instance_uid != src.series_instance_uid
    assert suv_bw_factor(res.headers[0]) == pytest.approx(suv_bw_factor(src.headers[0]), rel=1e-12)
    brain = study.phantom.masks["brain"]
    # Denoising moves voxels, not the scale: the brain's mean stays within a few percent.
    assert res.values[brain].mean() == pytest.approx(src.values[brain].mean(), rel=0.05)
    maps = {ds.ContentLabel: (p, ds) for p in out.rglob("*.dcm")
            if (ds := pydicom.dcmread(p, stop_before_pixels=True)).SOPClassUID
            == "1.2.840.10008.5.1.4.1.1.30"}
    assert set(maps) == {"STABILITY", "DATAWEIGHT"}  # two Parametric Map series
    path, weight = maps["DATAWEIGHT"]
    assert dciodvfy_errors(path) == []
    assert "data weight" in weight.SeriesDescription
    # the provenance carries the exact formula, guard included
    derivation = res.headers[0].DerivationDescription
    assert "w = max(S_norm, G)" in derivation and "x = w*x0 + (1-w)*f" in derivation
    w = pydicom.dcmread(path).pixel_array
    assert w.min() >= 0 and w.max() <= 1 and 0 < w.mean() < 1
    assert "data weight map" in r.stdout


@pytest.mark.slow
def test_denoise_sdip_paper_is_the_papers_blend(study: PhantomStudy, tmp_path: Path) -> None:
    out = tmp_path / "paper"
    dipnode("denoise", str(study.pet_dir), str(study.mr_dir), "--out", str(out),
            "--method", "sdip-paper", "--preset", "tiny", "--device", "cpu", check=True)
    derivation = _volume(out / "pet").headers[0].DerivationDescription
    assert "the paper's method" in derivation and "x = S_norm*x0 + (1-S_norm)*f" in derivation
    assert "guard" not in derivation


def test_denoise_gaussian_needs_no_mr(study: PhantomStudy, tmp_path: Path) -> None:
    r = dipnode("denoise", str(study.pet_dir), "--method", "gaussian", "--fwhm", "2",
                "--out", str(tmp_path / "g"), check=True)
    src, res = _volume(study.pet_dir), _volume(tmp_path / "g" / "pet")
    assert res.values.std() < src.values.std()
    assert "stability" not in r.stdout


@pytest.mark.parametrize("argv,message", [
    (["denoise", "{pet}", "--out", "{tmp}/o"], "needs MR_DIR"),
    (["denoise", "{tmp}/nowhere", "--method", "gaussian", "--out", "{tmp}/o"], "no such file or folder"),
    (["denoise", "{mr}", "--method", "gaussian", "--out", "{tmp}/o"], "no PT series"),
    (["denoise", "{pet}", "{mr}", "--alpha", "-1", "--out", "{tmp}/o"], "alpha"),
    (["denoise", "{pet}", "{mr}", "--preset", "huge", "--out", "{tmp}/o"], "unknown preset"),
])
def test_denoise_bad_input_is_one_clear_line_and_exit_1(study: PhantomStudy, tmp_path: Path,
                                                        argv: list[str], message: str) -> None:
    args = [a.format(pet=study.pet_dir, mr=study.mr_dir, tmp=tmp_path) for a in argv]
    r = dipnode(*args)
    assert r.returncode == 1, r.stdout + r.stderr
    assert message in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.network
def test_send_echo_and_summary_against_orthanc(study: PhantomStudy, tmp_path: Path) -> None:
    with OrthancPeer(tmp_path / "orthanc") as orthanc:
        dest = f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}"
        assert "success" in dipnode("echo", dest, check=True).stdout
        junk = tmp_path / "notes.txt"
        junk.write_text("not DICOM")
        r = dipnode("send", str(study.pet_dir), str(junk), "--to", dest)
        assert r.returncode == 1  # one file failed: the summary says so
        assert f"{len(study.pet_files)} sent, 1 failed" in r.stdout
        assert "notes.txt" in r.stderr
        assert orthanc.instance_count() == len(study.pet_files)
    closed = free_port()
    r = dipnode("echo", f"NOBODY@127.0.0.1:{closed}")
    assert r.returncode == 1 and "FAILED" in r.stdout
    r = dipnode("send", str(study.pet_files[0]), "--to", f"NOBODY@127.0.0.1:{closed}")
    assert r.returncode == 1 and "error" in r.stderr


def test_send_rejects_a_malformed_destination(tmp_path: Path) -> None:
    r = dipnode("send", str(tmp_path), "--to", "not-a-destination")
    assert r.returncode == 1 and "AET@HOST:PORT" in r.stderr


def test_jobs_on_an_empty_node(tmp_path: Path) -> None:
    cfg = tmp_path / "n.toml"
    cfg.write_text(f'[node]\nallowed_calling_aets = ["*"]\n[storage]\n'
                   f'spool_dir = "{tmp_path}/spool"\ndatabase = "{tmp_path}/db.sqlite"\n')
    r = dipnode("jobs", "--config", str(cfg), check=True)
    assert "no unfinished jobs" in r.stdout
    r = dipnode("rerun", "7", "--config", str(cfg))
    assert r.returncode == 1 and "7" in r.stderr
