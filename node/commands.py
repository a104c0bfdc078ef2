"""What each `dipnode` subcommand does, kept apart from argument parsing (cli.py)."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from tqdm import tqdm

from dipnode.models.params import DipParams, Method, preset

log = logging.getLogger(__name__)


class UserError(Exception):
    """Bad input or an unreachable peer: printed as one line, exit status 1."""


_PARAM_ARGS = {"alpha": "alpha", "epochs": "epochs", "sample_from": "sample_from",
               "sample_every": "sample_every", "fwhm": "fwhm_voxels", "device": "device",
               "seed": "seed"}


def method_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The DipParams fields given on the command line."""
    return {field: getattr(args, arg) for arg, field in _PARAM_ARGS.items()
            if getattr(args, arg, None) is not None}


def default_preset_name(device: object) -> str:
    """`paper` where a GPU will run it, `fast` on a CPU (the paper preset takes hours there)."""
    import torch

    wants_cuda = (device or "auto") != "cpu"
    return "paper" if wants_cuda and torch.cuda.is_available() else "fast"


def resolve_params(preset_name: str | None, overrides: dict[str, object],
                   base: DipParams | None = None) -> DipParams:
    try:
        if base is None:
            base = preset(preset_name or default_preset_name(overrides.get("device")))
        elif preset_name:
            base = preset(preset_name)
        if "epochs" in overrides and "sample_from" not in overrides:
            # Keep the schedule's shape (sample the second half) when only the epochs change.
            overrides = {**overrides, "sample_from": max(1, int(overrides["epochs"]) // 2)}  # type: ignore[call-overload]
        return base.replace(**overrides)
    except (ValueError, TypeError) as exc:
        raise UserError(str(exc)) from None


def dispatch(args: argparse.Namespace) -> int:
    handler = {
        "denoise": cmd_denoise, "serve": cmd_serve, "send": cmd_send, "echo": cmd_echo,
        "jobs": cmd_jobs, "rerun": cmd_rerun, "resend": cmd_resend, "demo": cmd_demo,
    }[args.command]
    return handler(args)


class EpochBar:
    """A tqdm progress bar fed by the engine's per-epoch callback."""

    def __init__(self, total: int, desc: str) -> None:
        self.bar = tqdm(total=total, desc=desc, unit="epoch", file=sys.stderr,
                        disable=None)  # None: off when stderr is not a terminal

    def __call__(self, epoch: int, epochs: int, loss: float) -> None:
        self.bar.total = epochs
        self.bar.set_postfix(loss=f"{loss:.3g}", refresh=False)
        self.bar.update(epoch - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def cmd_denoise(args: argparse.Namespace) -> int:
    from dipnode.node import pipeline

    params = resolve_params(args.preset, method_overrides(args))
    method = Method(args.method or "sdip")
    if method.needs_mr and args.mr_dir is None:
        raise UserError(f"--method {method.value} needs MR_DIR (or use --method gaussian)")
    try:
        pet_paths = pipeline.files_under(args.pet_dir)
        mr_paths = pipeline.files_under(args.mr_dir) if args.mr_dir is not None else None
        bar = EpochBar(params.epochs, method.value) if method.needs_mr else None
        try:
            result = pipeline.run(pet_paths, mr_paths, args.out, method=method, params=params,
                                  progress=bar)
        finally:
            if bar is not None:
                bar.close()
    except (ValueError, OSError) as exc:  # DicomInputError, AlignmentError, PipelineError, ...
        raise UserError(str(exc)) from None
    print(f"wrote {len(result.pet_files)} derived PET files to {args.out / 'pet'}")
    if result.map_files:
        print(f"wrote the stability map ({len(result.map_files)} files) to {args.out}")
    if result.weight_files:
        print(f"wrote the data weight map ({len(result.weight_files)} files) to {args.out / 'weight'}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from dipnode.node.server import serve
    from dipnode.node.settings import load_settings

    try:
        settings = load_settings(args.config)
    except (ValueError, OSError) as exc:
        raise UserError(f"settings: {exc}") from None
    return serve(settings)


def _destination(text: str):
    from dipnode.dicom_io.scu import Destination

    try:
        return Destination.parse(text)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def cmd_send(args: argparse.Namespace) -> int:
    from dipnode.dicom_io.scu import send_files
    from dipnode.node.pipeline import files_under

    dest = _destination(args.to)
    try:
        paths = [p for root in args.paths for p in files_under(root)]
    except ValueError as exc:
        raise UserError(str(exc)) from None
    bar = tqdm(total=len(paths), desc=f"send to {dest.ae_title}", unit="file", file=sys.stderr,
               disable=None)
    report = send_files(paths, dest, calling_ae=args.aet, progress=lambda *_: bar.update(1))
    bar.close()
    if not report.association_ok:
        raise UserError(f"{dest.ae_title}@{dest.host}:{dest.port}: {report.error}")
    for r in report.results:
        if not r.ok:
            status = "no response" if r.status is None else f"status 0x{r.status:04X}"
            print(f"FAILED {r.path_or_uid}: {status} {r.message}", file=sys.stderr)
    print(f"{report.n_ok} sent, {report.n_failed} failed")
    return 0 if report.all_ok else 1


def cmd_echo(args: argparse.Namespace) -> int:
    from dipnode.dicom_io.scu import echo

    dest = _destination(args.destination)
    result = echo(dest, calling_ae=args.aet)
    ok = bool(getattr(result, "ok", result))
    print(f"C-ECHO {dest.ae_title}@{dest.host}:{dest.port}: {'success' if ok else 'FAILED'}"
          + (f" ({result.message})" if getattr(result, "message", "") else ""))
    return 0 if ok else 1


def _open_store(config: Path | None):
    from dipnode.node.settings import load_settings
    from dipnode.node.store import Store

    try:
        settings = load_settings(config)
    except (ValueError, OSError) as exc:
        raise UserError(f"settings: {exc}") from None
    return settings, Store.open(settings.storage.database)


def cmd_jobs(args: argparse.Namespace) -> int:
    from dipnode.node.admin import jobs_table

    _, store = _open_store(args.config)
    print(jobs_table(store, include_done=args.all))
    return 0


def cmd_rerun(args: argparse.Namespace) -> int:
    from dipnode.node.admin import request_rerun

    settings, store = _open_store(args.config)
    try:
        new_id = request_rerun(store, settings, args.job, method=args.method,
                               preset_name=args.preset, overrides=method_overrides(args))
    except (ValueError, KeyError) as exc:
        raise UserError(str(exc)) from None
    print(f"job {new_id} queued (re-run of job {args.job}); `dipnode jobs` shows its progress")
    return 0


def cmd_resend(args: argparse.Namespace) -> int:
    from dipnode.node.admin import request_resend

    _, store = _open_store(args.config)
    try:
        n = request_resend(store, args.job)
    except (ValueError, KeyError) as exc:
        raise UserError(str(exc)) from None
    print(f"job {args.job}: {n} deliveries queued again")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from dipnode.node.demo import run_demo

    report = run_demo(args.out, preset_name=args.preset, voxel_mm=args.voxel_mm,
                      device=args.device)
    print(f"report written to {report}")
    return 0
