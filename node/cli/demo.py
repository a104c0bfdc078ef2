"""`dipnode demo`: the whole node on one machine, with no scanner, PACS or GPU.

A phantom brain FDG study at 1/10 dose (MR from another session, in its own frame of
reference) is pushed over real DICOM associations to a node running on loopback; the node
registers the MR, runs SDIP and sends the results to a local receiving store; the report
reads them back and compares the methods on the phantom's ROIs.
"""
from __future__ import annotations

import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pydicom

from dipnode.dicom_io.scp import ReceivedInstance, ReceiverConfig, start_receiver
from dipnode.dicom_io.scp import DEFAULT_SOP_CLASSES
from dipnode.dicom_io.scu import PARAMETRIC_MAP_STORAGE, Destination, send_files
from dipnode.dicom_io.series import load_volume, read_datasets
from dipnode.dicom_io.status import Status
from dipnode.node.jobs import pipeline
from dipnode.node.cli.options import DEFAULT_PRESET, cli_params, describe_device
from dipnode.node.cli.progress import FitProgress, format_seconds
from dipnode.node.cli.report import ReportInputs, write_report
from dipnode.node.server import Node
from dipnode.node.settings import Settings
from dipnode.node.ingest.spool import Spool
from dipnode.node.jobs.rows import JobState
from dipnode.sim.study import write_phantom_study

log = logging.getLogger(__name__)

NODE_AET, PACS_AET, SCANNER_AET = "DIPNODE", "DEMOPACS", "SCANNER"


class DemoError(RuntimeError):
    """The demo could not finish (a push refused, the job failed): the message says where."""


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_demo(out: Path, *, preset_name: str | None = None, voxel_mm: float | None = None,
             device: str = "auto") -> Path:
    """Run the demo into ``out``; the preset is DEFAULT_PRESET ("fast") on every device unless
    ``preset_name`` says otherwise, so that a GPU host runs what the README measured."""
    out = Path(out)
    work = out / "work"
    explicit_preset = preset_name is not None
    preset_name = preset_name or DEFAULT_PRESET
    params = cli_params(preset_name, {"device": device})
    device_text = describe_device(device)  # before any work: a missing GPU fails at once
    shutil.rmtree(work, ignore_errors=True)
    voxel_mm = voxel_mm or (2.0 if preset_name == "paper" else 4.0)
    say(f"[1/5] phantom study: brain FDG at 1/10 dose, {voxel_mm:g} mm voxels "
        "(projection, Poisson counts, OSEM)")
    study = write_phantom_study(work / "input", voxel_mm=voxel_mm, dose_fraction=0.1)

    # The hospital's PACS, played by our own receiver writing durable files.
    pacs_spool = Spool(work / "pacs", min_free_bytes=0)

    def pacs_store(instance: ReceivedInstance) -> Status:
        pacs_spool.store(instance)
        return Status.SUCCESS

    pacs = start_receiver(ReceiverConfig(
        ae_title=PACS_AET, host="127.0.0.1", port=0, allowed_calling_aets=frozenset({NODE_AET}),
        sop_classes=DEFAULT_SOP_CLASSES + (PARAMETRIC_MAP_STORAGE,)), pacs_store)
    settings = Settings(
        node={"ae_title": NODE_AET, "host": "127.0.0.1", "port": 0,
              "allowed_calling_aets": [SCANNER_AET]},
        storage={"spool_dir": work / "node-spool", "database": work / "node.sqlite", "min_free_mb": 0},
        series={"stable_age_s": 2.0, "check_interval_s": 0.5},
        # One MR series, pushed with the PET: no better series of the exam can follow.
        matching={"mr_wait_s": 120.0, "fallback": "fail", "mr_grace_s": 0.0},
        method={"name": "sdip", "preset": preset_name, "device": device},
        destinations=[{"ae_title": PACS_AET, "host": "127.0.0.1", "port": pacs.port}],
        http={"enabled": False},  # a node of a few minutes: no status page
    )
    # The node runs the pipeline as always; the demo also keeps DIP snapshots for its trade-off
    # curves and the fit itself for the report.
    results: list[pipeline.PipelineResult] = []
    snapshots = tuple(range(1, params.epochs + 1))  # every epoch: the DIP curve of the trade-off plot

    def run_and_keep(*args, **kwargs) -> pipeline.PipelineResult:
        result = pipeline.run(*args, snapshot_epochs=snapshots, **kwargs)
        results.append(result)
        return result

    node = Node(settings, run=run_and_keep)
    node.start()
    try:
        say(f"[2/5] pushing {len(study.pet_files)} PET + {len(study.mr_files)} MR images to "
            f"{NODE_AET}@127.0.0.1:{node.port} as {SCANNER_AET}")
        report = send_files(list(study.pet_files) + list(study.mr_files),
                            Destination(NODE_AET, "127.0.0.1", node.port), calling_ae=SCANNER_AET)
        if not report.all_ok:
            raise DemoError(f"push to the node failed: {report.error or f'{report.n_failed} refused'}")
        say(f"[3/5] the node completes the series, registers the MR and runs SDIP: preset "
            f"{preset_name}{'' if explicit_preset else ' (the default; --preset paper for the paper settings)'}, "
            f"{params.epochs} epochs on {device_text}")
        job = _follow_job(node, params.epochs, device_text)
        if job.state is not JobState.DONE:
            raise DemoError(f"job {job.id} ended {job.state.value}: {job.reason}")
    finally:
        node.stop()
        pacs.stop()

    say("[4/5] reading the results back from the receiving store")
    files = sorted((work / "pacs").rglob("*.dcm"))
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    by_number: dict[int, list] = {}
    for h in headers:
        by_number.setdefault(int(h.SeriesNumber), []).append(h)
    pet_files = [f for f, h in zip(files, headers)
                 if int(h.SeriesNumber) == settings.output.series_number_pet]
    sdip_vol = load_volume(read_datasets(pet_files), modality="PT")
    [run] = results  # the node's own fit (its one job), kept in memory for the curves
    fit, pet = run.denoised, run.pet
    # What the PACS got (16-bit DICOM, read back) against the fit's float output.
    agreement = float(np.max(np.abs(fit.denoised - sdip_vol.values)) / np.max(np.abs(fit.denoised)))

    say("[5/5] writing the report")
    dicom_out = out / "dicom"
    shutil.rmtree(dicom_out, ignore_errors=True)
    folders = copy_named(files, headers, dicom_out, output_folder_names(settings, "sdip"))
    inputs = ReportInputs(mr=run.mr_on_pet, osem=pet.values, full_dose=study.osem_full_dose,
                          dip=fit.dip, stability=fit.stability, sdip=sdip_vol.values,
                          snapshots=fit.snapshots, masks=study.phantom.masks, alpha=params.alpha,
                          data_weight=fit.data_weight, network=fit.network_image, guard=fit.guard,
                          truth=study.phantom.activity, affine=pet.geometry.affine)
    notes = {
        "preset": preset_name, "device": fit.device, "epochs": params.epochs,
        "network": f"U-Net base {params.base_channels}, depth {params.depth}",
        "fit seconds": round(fit.timings.get("fit", float("nan")), 1),
        "phantom": f"{study.phantom.shape} voxels of {voxel_mm:g} mm, dose fraction 0.1",
        "registration": f"{run.alignment.method}, Mattes MI {run.alignment.metric:.3f}",
        "delivered SDIP (16-bit DICOM) vs the fit's float output (max abs diff / max)":
            f"{agreement:.2e}",
        "series received": "; ".join(f"{n}: {g[0].SeriesDescription} ({len(g)} instances)"
                                     for n, g in sorted(by_number.items())),
        "DICOM outputs": ", ".join(f"{dicom_out / f}/" for f in folders),
    }
    paths = write_report(inputs, out, notes)
    shutil.rmtree(work, ignore_errors=True)
    say(f"figure: {paths['figure']}\ntrade-off curves: {paths['curves']}\n"
        f"metrics: {paths['metrics_md']}")
    return out


def output_folder_names(settings: Settings, method: str) -> dict[int, str]:
    """Series number -> the folder its files are copied to under ``dicom/``: named for what it
    holds, so that a reader of the report finds the derived PET and the maps without UIDs."""
    o = settings.output
    names = {o.series_number_pet: f"pet-{method}", o.series_number_map: "stability-map",
             o.series_number_map_plain: "stability-map-plain", o.series_number_weight: "data-weight",
             o.series_number_weight_plain: "data-weight-plain"}
    return {n: name for n, name in names.items() if n}


def copy_named(files: list[Path], headers: list, dest: Path, names: dict[int, str]) -> list[str]:
    """Copy each received file to ``dest/<folder>/<instance number>.dcm``; returns the folders."""
    used: set[str] = set()
    for f, h in zip(files, headers):
        number = int(h.SeriesNumber)
        folder = names.get(number, f"series-{number}")
        target = dest / folder / f"{int(h.get('InstanceNumber') or 1):04d}.dcm"
        if target.exists():  # two instances with one number: keep both, by UID
            target = target.with_name(f"{h.SOPInstanceUID}.dcm")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, target)
        used.add(folder)
    return sorted(used)


def _follow_job(node: Node, epochs: int, device: str):
    """Show the job until it ends (done or failed): a line per state, then the fit's progress
    (epochs, elapsed, time left, device: a bar on a terminal, a line per tenth elsewhere)."""
    last_state = None
    fit: FitProgress | None = None
    started = time.monotonic()
    try:
        while True:
            jobs = node.store.jobs()
            if jobs:
                job = jobs[-1]
                if job.state != last_state:
                    if fit is not None:
                        fit.close()
                        fit = None
                    say(f"      job {job.id}: {job.state.value.replace('_', ' ')} "
                        f"({format_seconds(time.monotonic() - started)} since the push)")
                    last_state = job.state
                    if job.state is JobState.RUNNING:
                        fit = FitProgress(epochs, "SDIP fit", device)
                if fit is not None:
                    fit(round(job.progress * epochs), epochs)
                if job.state.terminal:
                    return job
            time.sleep(0.5)
    finally:
        if fit is not None:
            fit.close()
