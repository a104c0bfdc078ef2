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
from tqdm import tqdm

from dipnode.dicom_io.scp import ReceivedInstance, ReceiverConfig, start_receiver
from dipnode.dicom_io.scp import DEFAULT_SOP_CLASSES
from dipnode.dicom_io.scu import PARAMETRIC_MAP_STORAGE, Destination, send_files
from dipnode.dicom_io.series import load_volume, read_datasets
from dipnode.dicom_io.status import Status
from dipnode.node import pipeline
from dipnode.node.commands import default_preset_name, resolve_params
from dipnode.node.report import ReportInputs, write_report
from dipnode.node.server import Node
from dipnode.node.settings import Settings
from dipnode.node.spool import Spool
from dipnode.node.store import JobState
from dipnode.sim.study import write_phantom_study

log = logging.getLogger(__name__)

NODE_AET, PACS_AET, SCANNER_AET = "DIPNODE", "DEMOPACS", "SCANNER"


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_demo(out: Path, *, preset_name: str | None = None, voxel_mm: float | None = None,
             device: str = "auto") -> Path:
    out = Path(out)
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    preset_name = preset_name or default_preset_name(device)
    params = resolve_params(preset_name, {"device": device})
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
        matching={"mr_wait_s": 120.0, "fallback": "fail"},
        method={"name": "sdip", "preset": preset_name, "device": device},
        destinations=[{"ae_title": PACS_AET, "host": "127.0.0.1", "port": pacs.port}],
    )
    results: dict[int, pipeline.PipelineResult] = {}
    snapshots = tuple(range(1, params.epochs + 1))  # every epoch: the DIP curve of the trade-off plot
    node = Node(settings, observer=results.__setitem__, snapshot_epochs=snapshots)
    node.start()
    try:
        say(f"[2/5] pushing {len(study.pet_files)} PET + {len(study.mr_files)} MR images to "
            f"{NODE_AET}@127.0.0.1:{node.port} as {SCANNER_AET}")
        report = send_files(list(study.pet_files) + list(study.mr_files),
                            Destination(NODE_AET, "127.0.0.1", node.port), calling_ae=SCANNER_AET)
        if not report.all_ok:
            raise RuntimeError(f"push to the node failed: {report.error or report.n_failed}")
        say(f"[3/5] the node completes the series, registers the MR and runs SDIP "
            f"(preset {preset_name}: {params.epochs} epochs on {params.device})")
        job = _follow_job(node)
        if job.state is not JobState.DONE:
            raise RuntimeError(f"job {job.id} ended {job.state.value}: {job.reason}")
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
    run = results[job.id]  # the node's own fit, kept in memory for the curves
    fit, pet = run.denoised, run.pet
    # What the PACS got (16-bit DICOM, read back) against the fit's float output.
    agreement = float(np.max(np.abs(fit.denoised - sdip_vol.values)) / np.max(np.abs(fit.denoised)))

    say("[5/5] writing the report")
    dicom_out = out / "dicom"
    shutil.rmtree(dicom_out, ignore_errors=True)
    shutil.copytree(work / "pacs" / "instances", dicom_out)
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
        "DICOM outputs": str(dicom_out),
    }
    paths = write_report(inputs, out, notes)
    shutil.rmtree(work, ignore_errors=True)
    say(f"figure: {paths['figure']}\ntrade-off curves: {paths['curves']}\n"
        f"metrics: {paths['metrics_md']}")
    return out


def _follow_job(node: Node):
    """Show the job's progress until it ends (done or failed): a bar on a terminal, a line
    per state change elsewhere."""
    bar = tqdm(total=100, unit="%", file=sys.stderr, desc="waiting for the series",
               disable=None)  # None: off when stderr is not a terminal
    last_state = None
    try:
        while True:
            jobs = node.store.jobs()
            if jobs:
                job = jobs[-1]
                decile = int(job.progress * 10)
                if bar.disable and (job.state, decile) != last_state:
                    say(f"      job {job.id}: {job.state.value} {decile * 10}%")
                last_state = (job.state, decile)
                bar.set_description(job.state.value)
                bar.update(int(job.progress * 100) - bar.n)
                if job.state.terminal:
                    return job
            time.sleep(0.5)
    finally:
        bar.close()
