"""`dipnode denoise`, `send`, `echo`, `jobs` as a user runs them (real processes, real peers)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dipnode.dicom_io.series import load_volume, read_datasets, split_series
from dipnode.dicom_io.suv import suv_bw_factor
from dipnode.sim.study import PhantomStudy, write_phantom_study
from peers import OrthancPeer, dciodvfy_errors, free_port

pytestmark = pytest.mark.timeout(300)


def dipnode(*args: str, check: bool = False, env: dict[str, str] | None = None,
            ) -> subprocess.CompletedProcess[str]:
    # The user's environment without DIPNODE_* (a test must not read a developer's settings).
    base = {k: v for k, v in os.environ.items() if not k.startswith("DIPNODE_")}
    result = subprocess.run([sys.executable, "-m", "dipnode.node.cli.main", *args],
                            capture_output=True, text=True, timeout=280, env={**base, **(env or {})})
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
    # Progress for a person watching (stderr is a pipe here: lines, not a bar).
    assert "preset tiny, 12 epochs on cpu" in r.stderr
    last = [ln for ln in r.stderr.splitlines() if "epoch " in ln][-1]
    assert "SDIP on cpu: epoch 12/12 (100 %)" in last and "elapsed" in last, r.stderr
    assert any("left" in ln for ln in r.stderr.splitlines()), r.stderr
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
    # What the node sends, series by series: the plain maps (1003, 1005) too, with the descriptions.
    series = {}
    for p in out.rglob("*.dcm"):
        h = pydicom.dcmread(p, stop_before_pixels=True)
        series.setdefault((int(h.SeriesNumber), str(h.SeriesDescription), p.parent.name), []).append(p)
    assert {k: len(v) for k, v in series.items()} == {
        (1001, "dipnode PET SDIP a0.6 [RESEARCH]", "pet"): 43,
        (1002, "dipnode stability map [RESEARCH]", "map"): 1,
        (1003, "dipnode stability map Bq/ml [RESEARCH]", "map-plain"): 43,
        (1004, "dipnode data weight [RESEARCH]", "weight"): 1,
        (1005, "dipnode data weight % [RESEARCH]", "weight-plain"): 43,
    }
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


@pytest.mark.slow
def test_denoise_gaussian_needs_no_mr(study: PhantomStudy, tmp_path: Path) -> None:
    r = dipnode("denoise", str(study.pet_dir), "--method", "gaussian", "--fwhm", "2",
                "--out", str(tmp_path / "g"), check=True)
    src, res = _volume(study.pet_dir), _volume(tmp_path / "g" / "pet")
    assert res.values.std() < src.values.std()
    assert "stability" not in r.stdout


@pytest.mark.slow
@pytest.mark.parametrize("argv,message", [
    (["denoise", "{pet}", "--out", "{tmp}/o"], "--method sdip needs MR_DIR"),
    # Before: "--method sdip needs MR_DIR" for a PET folder that does not exist.
    (["denoise", "{tmp}/nowhere", "--out", "{tmp}/o"], "PET_DIR {tmp}/nowhere: no such file or folder"),
    (["denoise", "{tmp}/nowhere", "--method", "gaussian", "--out", "{tmp}/o"],
     "PET_DIR {tmp}/nowhere: no such file or folder"),
    (["denoise", "{pet}", "{tmp}/nomr", "--out", "{tmp}/o"], "MR_DIR {tmp}/nomr: no such file or folder"),
    (["denoise", "{mr}", "--method", "gaussian", "--out", "{tmp}/o"], "no PT series"),
    # Internal names never leak: the option the user typed is named.
    (["denoise", "{pet}", "{mr}", "--alpha", "-1", "--out", "{tmp}/o"], "--alpha: expected a number >= 0, got -1.0"),
    (["denoise", "{pet}", "--method", "gaussian", "--fwhm", "-1", "--out", "{tmp}/o"],
     "--fwhm: expected a number >= 0, got -1.0"),
    (["denoise", "{pet}", "{mr}", "--epochs", "0", "--out", "{tmp}/o"], "--epochs: expected an integer >= 1, got 0"),
    (["denoise", "{pet}", "{mr}", "--epochs", "3", "--sample-every", "5", "--out", "{tmp}/o"],
     "the stability map needs at least two samples; --epochs 3, --sample-from 1, --sample-every 5 give 0"),
    (["denoise", "{pet}", "{mr}", "--preset", "huge", "--out", "{tmp}/o"], "--preset: unknown preset 'huge'"),
    (["denoise", "{pet}", "{mr}", "--device", "cuda:99", "--out", "{tmp}/o"], "--device cuda:99: "),
])
def test_denoise_bad_input_is_one_clear_line_and_exit_1(study: PhantomStudy, tmp_path: Path,
                                                        argv: list[str], message: str) -> None:
    args = [a.format(pet=study.pet_dir, mr=study.mr_dir, tmp=tmp_path) for a in argv]
    r = dipnode(*args)
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stderr.startswith("dipnode denoise: error: ") and r.stderr.count("\n") == 1, r.stderr
    assert message.format(tmp=tmp_path) in r.stderr
    assert "DipParams" not in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()  # nothing written


@pytest.mark.slow
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
        # Before: "FAILED notes.txt: no response unreadable: InvalidDicomError: File is missing
        # DICOM File Meta Information header ... Use force=True to force reading."
        assert r.stderr.strip() == f"FAILED {junk}: not a DICOM file (no DICOM file meta information, PS3.10 7.1)"
        assert orthanc.instance_count() == len(study.pet_files)


@pytest.mark.slow
@pytest.mark.network
def test_echo_and_send_failures_are_one_line_without_library_logs(study: PhantomStudy) -> None:
    # Before: two "ERROR pynetdicom.transport" lines (and a WARNING from the sender) came first.
    closed = free_port()
    r = dipnode("echo", f"NOBODY@127.0.0.1:{closed}")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == (f"dipnode echo: error: C-ECHO NOBODY@127.0.0.1:{closed}: association with "
                        f"NOBODY@127.0.0.1:{closed} aborted (peer down, refused or not DICOM)\n")
    r = dipnode("send", str(study.pet_files[0]), "--to", f"NOBODY@127.0.0.1:{closed}")
    assert r.returncode == 1
    assert r.stderr.startswith("dipnode send: error: association with") and r.stderr.count("\n") == 1, r.stderr
    # -vv shows what the library says, for whoever debugs the network.
    r = dipnode("-vv", "echo", f"NOBODY@127.0.0.1:{closed}")
    assert "pynetdicom" in r.stderr


@pytest.mark.parametrize("argv,message", [
    (["send", "{tmp}", "--to", "not-a-destination"],
     "dipnode send: error: --to: expected 'AET@HOST:PORT', got 'not-a-destination'"),
    (["echo", "PACS@127.0.0.1:99999"], "dipnode echo: error: AET@HOST:PORT: port: expected 1-65535, got 99999"),
    (["echo", "PACS@127.0.0.1:104", "--aet", "A_TITLE_TOO_LONG_X"], "dipnode echo: error: --aet: expected 1-16"),
    (["send", "{tmp}", "--to", "PACS@127.0.0.1:104", "--aet", "A\\B"], "dipnode send: error: --aet: expected 1-16"),
    (["echo", "PACS@nohost.invalid:104"], "dipnode echo: error: C-ECHO PACS@nohost.invalid:104: association "
     "with PACS@nohost.invalid:104 not established: cannot resolve or use host 'nohost.invalid'"),
])
def test_peer_and_title_mistakes_are_one_line(tmp_path: Path, argv: list[str], message: str) -> None:
    r = dipnode(*[a.format(tmp=tmp_path) for a in argv])
    assert r.returncode == 1 and r.stderr.startswith(message) and r.stderr.count("\n") == 1, r.stderr


def _node_config(tmp_path: Path) -> Path:
    from dipnode.node.jobs.store import Store

    cfg = tmp_path / "n.toml"
    cfg.write_text(f'[node]\nallowed_calling_aets = ["PACS"]\n[storage]\n'
                   f'spool_dir = "{tmp_path}/spool"\ndatabase = "{tmp_path}/db.sqlite"\n')
    Store.open(tmp_path / "db.sqlite").close()  # as `dipnode serve` leaves it
    return cfg


def test_jobs_on_an_empty_node(tmp_path: Path) -> None:
    cfg = _node_config(tmp_path)
    r = dipnode("jobs", "--config", str(cfg), check=True)
    assert "no unfinished jobs" in r.stdout
    r = dipnode("rerun", "7", "--config", str(cfg))
    assert r.returncode == 1 and "7" in r.stderr


def test_settings_found_through_dipnode_config(tmp_path: Path) -> None:
    cfg = _node_config(tmp_path)
    r = dipnode("jobs", env={"DIPNODE_CONFIG": str(cfg)})
    assert r.returncode == 0 and "no unfinished jobs" in r.stdout, r.stderr
    r = dipnode("jobs", env={"DIPNODE_CONFIG": str(tmp_path / "gone.toml")})
    assert r.returncode == 1
    assert r.stderr == (f"dipnode jobs: error: settings file {tmp_path / 'gone.toml'} (from "
                        "DIPNODE_CONFIG): no such file\n")


@pytest.mark.parametrize("command", [["serve"], ["health"], ["jobs"], ["rerun", "1"], ["resend", "1"]])
def test_no_settings_says_what_was_searched(command: list[str], tmp_path: Path, monkeypatch,
                                            capsys) -> None:
    # Before: "settings: invalid settings (DIPNODE_* environment): node: expected a value,
    # got none (required)". In-process, so that the default path can point at a missing file
    # even on a host where /etc/dipnode/dipnode.toml exists.
    from dipnode.node.cli import commands, main

    assert commands.DEFAULT_CONFIG == Path("/etc/dipnode/dipnode.toml")  # as the README says
    for k in [k for k in os.environ if k.startswith("DIPNODE_")]:
        monkeypatch.delenv(k)
    monkeypatch.setattr(commands, "DEFAULT_CONFIG", tmp_path / "dipnode.toml")
    assert main.main(command) == 1
    err = capsys.readouterr().err
    assert err == (f"dipnode {command[0]}: error: no settings file: --config not given, DIPNODE_CONFIG "
                   f"not set, {tmp_path / 'dipnode.toml'} does not exist. Give --config FILE (every "
                   "key: deploy/dipnode.example.toml).\n")
    # The default path is read when it exists.
    _node_config(tmp_path).rename(tmp_path / "dipnode.toml")
    if command[0] == "jobs":
        assert main.main(command) == 0


def test_jobs_before_the_node_ever_ran(tmp_path: Path) -> None:
    cfg = tmp_path / "n.toml"
    cfg.write_text(f'[node]\nallowed_calling_aets = ["PACS"]\n[storage]\n'
                   f'spool_dir = "{tmp_path}/spool"\ndatabase = "{tmp_path}/db.sqlite"\n')
    r = dipnode("jobs", "--config", str(cfg))
    assert r.returncode == 1 and f"storage.database {tmp_path}/db.sqlite: no such file" in r.stderr
    assert not (tmp_path / "db.sqlite").exists()  # not created by a look


def test_settings_errors_name_the_key_not_the_class(tmp_path: Path) -> None:
    cfg = _node_config(tmp_path)
    r = dipnode("jobs", "--config", str(cfg), env={"DIPNODE_METHOD__FWHM_VOXELS": "-1"})
    assert r.returncode == 1
    assert "  method.fwhm_voxels: expected a number >= 0, got -1.0" in r.stderr.splitlines()
    assert "DipParams" not in r.stderr


def test_rerun_names_the_option(tmp_path: Path) -> None:
    from dipnode.models.params import preset
    from dipnode.node.jobs.rows import InstanceRecord
    from dipnode.node.jobs.store import Store

    cfg = _node_config(tmp_path)
    with Store.open(tmp_path / "db.sqlite") as store:
        store.record_instance(InstanceRecord("1.2.3.4", "1.2.840.10008.5.1.4.1.1.128", tmp_path / "1.dcm",
                                             "1.2", "1.2.3", "PT", "1.2.840.10008.1.2.1"), time.time())
        job = store.create_job("1.2.3", method="gaussian", params=preset("tiny"), now=time.time())
    r = dipnode("rerun", str(job.id), "--fwhm", "-1", "--config", str(cfg))
    assert r.returncode == 1
    assert r.stderr == "dipnode rerun: error: --fwhm: expected a number >= 0, got -1.0\n"


@pytest.mark.slow
@pytest.mark.network
def test_serve_with_a_device_that_is_not_there_says_so_once_and_keeps_receiving(tmp_path: Path) -> None:
    # Before: nothing at start; each job failed later. The node must still receive (nothing a
    # scanner sends is lost for a missing GPU): test_bad_studies checks that the job fails.
    from nodeproc import NodeProcess, node_settings

    port = free_port()
    cfg = node_settings(tmp_path, port=port, destinations=[], method={"device": "cuda:99"})
    node = NodeProcess(cfg, port, tmp_path / "node.log")  # ready: it answers C-ECHO
    node.stop()
    text = (tmp_path / "node.log").read_text()
    assert text.count("method.device = 'cuda:99': ") == 1, text
    assert "every job fails until it is fixed (then `dipnode rerun JOB`)" in text


@pytest.mark.slow
@pytest.mark.network
def test_serve_on_a_taken_port_says_so(tmp_path: Path) -> None:
    import socket

    cfg = _node_config(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = dipnode("serve", "--config", str(cfg),
                    env={"DIPNODE_NODE__PORT": str(port), "DIPNODE_METHOD__PRESET": "tiny"})
    assert r.returncode == 1
    assert r.stderr == f"dipnode serve: error: node.host, node.port 127.0.0.1:{port}: Address already in use\n"


@pytest.mark.parametrize("settings,message", [
    ('allowed_calling_aets = []', "node.allowed_calling_aets is []: the node accepts no caller"),
    ('allowed_calling_aets = ["PACS"]\nport = 0', "node.port is 0"),
    ('allowed_calling_aets = ["PACS"]\nallowed_addresses = ["10.0.0.0/8"]',
     "node.allowed_addresses ['10.0.0.0/8'] does not include 127.0.0.1"),
])
def test_health_says_why_it_cannot_check(tmp_path: Path, settings: str, message: str) -> None:
    cfg = tmp_path / "n.toml"
    cfg.write_text(f'[node]\n{settings}\n[storage]\nspool_dir = "{tmp_path}/s"\ndatabase = "{tmp_path}/d"\n')
    r = dipnode("health", "--config", str(cfg))
    assert r.returncode == 1 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_demo_with_a_missing_device_fails_before_any_work(tmp_path: Path) -> None:
    # Before: built the phantom, pushed it, then a 23-line traceback when the job failed.
    r = dipnode("demo", "--device", "cuda:99", "--out", str(tmp_path / "report"))
    assert r.returncode == 1
    assert r.stderr.startswith("dipnode demo: error: --device cuda:99: ") and r.stderr.count("\n") == 1
    assert not (tmp_path / "report").exists()


def test_version() -> None:
    from importlib.metadata import version

    r = dipnode("--version", check=True)
    assert r.stdout.startswith(f"dipnode {version('dipnode')} (Python ")
    assert f"torch {version('torch')}" in r.stdout and r.stdout.count("\n") == 1


def test_every_option_has_help() -> None:
    import argparse

    from dipnode.node.cli.main import build_parser

    parser = build_parser()
    parsers = {"dipnode": parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            parsers.update({f"dipnode {n}": p for n, p in action.choices.items()})
    missing = [f"{name} {a.option_strings or a.dest}" for name, p in parsers.items()
               for a in p._actions
               if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) and not a.help]
    assert missing == []
    assert len(parsers) == 11  # dipnode + 10 commands


@pytest.mark.parametrize("argv,status", [
    ([], 2),                                   # no command
    (["frobnicate"], 2),                       # unknown command
    (["echo"], 2),                             # missing argument
    (["denoise", "x", "--out", "o", "--alpha", "abc"], 2),  # not a number
    (["echo", "not-a-destination"], 1),        # a value the command refuses
    (["--help"], 0),
])
def test_exit_status_as_the_readme_says(argv: list[str], status: int) -> None:
    assert dipnode(*argv).returncode == status
