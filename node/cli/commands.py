"""What each `dipnode` subcommand does, kept apart from argument parsing (main.py);
what the options mean is options.py.

Every mistake a user can make (a missing folder, a bad value, a peer that refuses) is raised
as :class:`UserError` and printed by the CLI as one line naming what the user typed: the
option (``--fwhm``), the argument (``PET_DIR``) or the settings key (``method.device``),
never an internal name. Exit status 1; usage mistakes caught by argparse exit 2.
"""
from __future__ import annotations

import argparse
import errno
import logging
import os
import re
import sys
from pathlib import Path

from tqdm import tqdm

from dipnode.models.params import Method
from dipnode.node.cli.options import (DEFAULT_PRESET, UserError, cli_params, describe_device, in_cli_words,
                                      method_overrides)

log = logging.getLogger(__name__)

#: The settings file that serve, health, jobs, rerun and resend read without --config.
CONFIG_ENV = "DIPNODE_CONFIG"
DEFAULT_CONFIG = Path("/etc/dipnode/dipnode.toml")


def dispatch(args: argparse.Namespace) -> int:
    handler = {
        "denoise": cmd_denoise, "serve": cmd_serve, "health": cmd_health, "send": cmd_send,
        "echo": cmd_echo, "jobs": cmd_jobs, "rerun": cmd_rerun, "resend": cmd_resend,
        "demo": cmd_demo, "purge": cmd_purge,
    }[args.command]
    return handler(args)


def say(text: str) -> None:
    """A progress line for the person at the terminal (stderr: stdout carries the results)."""
    print(text, file=sys.stderr, flush=True)


# -- settings ---------------------------------------------------------------------------------
def config_path(given: Path | None) -> tuple[Path | None, str]:
    """The settings file to read and where it came from: --config, else $DIPNODE_CONFIG, else
    /etc/dipnode/dipnode.toml when it exists; (None, searched) when there is none."""
    if given is not None:
        return Path(given), "--config"
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env), CONFIG_ENV
    if DEFAULT_CONFIG.is_file():
        return DEFAULT_CONFIG, "the default path"
    return None, f"--config not given, {CONFIG_ENV} not set, {DEFAULT_CONFIG} does not exist"


def load_node_settings(given: Path | None):
    """The node's settings for serve/health/jobs/rerun/resend, or a UserError saying what is
    missing and where the file was looked for."""
    from dipnode.node.settings import SettingsError, load_settings

    path, origin = config_path(given)
    if path is not None and not path.is_file():
        raise UserError(f"settings file {path} (from {origin}): no such file")
    try:
        return load_settings(path)
    except SettingsError as exc:
        if path is not None:
            raise UserError(str(exc)) from None
        env_keys = [k for k in os.environ if k.startswith("DIPNODE_") and k != CONFIG_ENV]
        if not env_keys:
            raise UserError(f"no settings file: {origin}. Give --config FILE (every key: "
                            "deploy/dipnode.example.toml).") from None
        raise UserError(f"{exc}\n(no settings file: {origin})") from None


def _check_node_device(settings) -> str:
    key = "method.device" if settings.method.device is not None else "workers.device"
    device = settings.dip_params().device
    try:
        return describe_device(device, key=key)
    except UserError as exc:
        raise UserError(str(exc).replace(f"{key} {device}", f"{key} = {device!r}")
                        .replace(f"use {key} cpu or {key} auto", 'set it to "cpu" or "auto"')) from None


# -- the node -------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    from dipnode.node.ingest.lock import NodeLocked, WriterLock
    from dipnode.node.server import serve
    from dipnode.node.settings import SettingsError

    settings = load_node_settings(args.config)
    # A second node on this spool or database says so first, in one line, before any other
    # message (the Node takes the lock again for good; a race in between ends the same way).
    try:
        WriterLock.for_node(settings.storage.spool_dir, settings.storage.database).release()
    except NodeLocked as exc:
        raise UserError(str(exc)) from None
    if settings.workers.executor == "ray":
        # Jobs compute on the cluster's workers: their devices matter, not this host's.
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise UserError('workers.executor = "ray": Ray is not installed; install the extra: '
                            "pip install 'dipnode[ray]'")
        device = None
    else:
        try:
            device = _check_node_device(settings)
        except UserError as exc:
            # The node still starts: what arrives is received and kept (a scanner's push must not
            # fail because a GPU is missing); each job fails with this reason until the device is
            # there, and `dipnode rerun` processes them again then.
            log.error("%s; studies are received and kept, but every job fails until it is fixed "
                      "(then `dipnode rerun JOB`)", exc)
            device = None
    if settings.method.preset == "paper" and device == "cpu":
        log.warning('method preset "paper" on the CPU: one study takes days there (200 L-BFGS '
                    "epochs of the full U-Net, bench/README.md); run the node on a CUDA GPU, or set "
                    '[method] preset = "fast" to try it out')
    try:
        return serve(settings)
    except NodeLocked as exc:  # another node on this spool or database: one line, exit 1
        raise UserError(str(exc)) from None
    except SettingsError as exc:  # TLS files unreadable: found when the receiver starts
        raise UserError(str(exc)) from None
    except OSError as exc:  # the port is taken, the address is not this host's, a folder is not writable
        if exc.filename is None and exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
            raise UserError(f"node.host, node.port {settings.node.host}:{settings.node.port}: "
                            f"{exc.strerror}") from None
        where = f": {exc.filename}" if exc.filename else ""
        raise UserError(f"cannot start the node: {exc.strerror or exc}{where}") from None


def cmd_health(args: argparse.Namespace) -> int:
    """C-ECHO this node as its settings describe it (the container's health check).

    It calls the node's own AE title on the port it listens on, from loopback, as its own AE
    title when the node accepts that, else as the first accepted calling AE title: read from
    the same settings file as `serve`, so the check cannot drift from the node's access list.
    """
    import ssl

    from dipnode.dicom_io.scu import Destination, echo

    settings = load_node_settings(args.config)
    n = settings.node
    if n.port == 0:
        raise UserError("node.port is 0 (a port the OS picks): the health check cannot know it")
    if not n.allowed_calling_aets:
        raise UserError("node.allowed_calling_aets is []: the node accepts no caller, "
                        "the health check included")
    calling = (n.ae_title if n.accepts_any_caller() or n.ae_title in n.allowed_calling_aets
               else n.allowed_calling_aets[0])
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(n.host, n.host)
    if n.allowed_addresses:
        import ipaddress
        ip = ipaddress.ip_address(host) if re.fullmatch(r"[\d.]+|[0-9a-fA-F:]+", host) else None
        if ip is None or not any(ip in ipaddress.ip_network(a, strict=False) for a in n.allowed_addresses):
            raise UserError(f"node.allowed_addresses {n.allowed_addresses} does not include {host}, "
                            "where the health check calls from: add it")
    tls = None
    if n.tls_enabled:
        # Our own process on loopback: the check is that it answers, not who it is.
        tls = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        tls.check_hostname = False
        tls.verify_mode = ssl.CERT_NONE
        if n.tls_require_client_cert:
            s = settings.sender
            if s.tls_cert is None or s.tls_key is None:
                raise UserError("node.tls_require_client_cert is true: the health check needs a "
                                "client certificate in sender.tls_cert and sender.tls_key")
            tls.load_cert_chain(s.tls_cert, s.tls_key)
    dest = Destination(n.ae_title, host, n.port)
    result = echo(dest, calling_ae=calling, tls=tls, timeout_s=args.timeout)
    if not result.ok:
        raise UserError(f"C-ECHO {dest} as {calling}: {result.message}")
    print(f"C-ECHO {dest} as {calling}: success")
    h = settings.http
    if h.enabled and h.port:
        # The node's own checks (database writable, spool above its mark, scheduler alive).
        import urllib.error
        import urllib.request

        http_host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "[::1]"}.get(h.host, h.host)
        if ":" in http_host and not http_host.startswith("["):
            http_host = f"[{http_host}]"
        url = f"http://{http_host}:{h.port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=args.timeout) as r:
                body = r.read().decode("utf-8", "replace").strip()
        except urllib.error.HTTPError as exc:
            raise UserError(f"{url}: {exc.code}: {exc.read().decode('utf-8', 'replace').strip()}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise UserError(f"{url}: {getattr(exc, 'reason', exc)}") from None
        print(f"{url}: {body}")
    return 0


def _open_store(config: Path | None):
    from dipnode.node.jobs.store import Store

    settings = load_node_settings(config)
    db = Path(settings.storage.database)
    if not db.is_file():
        raise UserError(f"storage.database {db}: no such file (has `dipnode serve` run with "
                        "these settings? Give the same --config as the node's)")
    return settings, Store.open(db)


def cmd_jobs(args: argparse.Namespace) -> int:
    from dipnode.node.cli.admin import jobs_table, quarantine_line

    settings, store = _open_store(args.config)
    print(jobs_table(store, include_done=args.all))
    line = quarantine_line(settings.storage.spool_dir)
    if line:
        print(line)
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    """Retention by hand: --dry-run reads the database only (safe while the node runs); a
    real sweep takes the node's writer lock, so it refuses while the node runs (the node
    sweeps by itself)."""
    from dipnode.node.jobs.store import Store
    from dipnode.node.ingest.lock import NodeLocked, WriterLock
    from dipnode.node.ops.retention import Policy, Retention, format_dry_run

    settings = load_node_settings(args.config)
    r, st = settings.retention, settings.storage
    db = Path(st.database)
    if not db.is_file():
        raise UserError(f"storage.database {db}: no such file (has `dipnode serve` run with "
                        "these settings? Give the same --config as the node's)")
    policy = Policy(inputs_days=r.inputs_days, failed_days=r.failed_days, outputs_days=r.outputs_days,
                    emergency_free_bytes=settings.emergency_free_mb * 1024 * 1024)
    spool = Path(st.spool_dir)
    if args.dry_run:
        with Store.open_readonly(db) as store:
            retention = Retention(store, spool, policy)
            print(format_dry_run(retention.dry_run(emergency=args.emergency), store))
        return 0
    try:
        lock = WriterLock.for_node(spool, db)
    except NodeLocked as exc:
        raise UserError(f"{exc}; the running node sweeps by itself every retention.sweep_interval_s "
                        "(use --dry-run to see what is due)") from None
    try:
        with Store.open(db) as store:
            retention = Retention(store, spool, policy)
            retention.finish_interrupted()
            report = retention.sweep(emergency=args.emergency)
    finally:
        lock.release()
    print(f"deleted {report.series} series ({report.instances} instances) and the results of "
          f"{report.outputs} jobs: {report.bytes_freed / 1048576:.1f} MB")
    return 0


def _job_words(message: str) -> str:
    return re.sub(r"^job: ", "JOB: ", message)  # the argument as `dipnode rerun --help` names it


def cmd_rerun(args: argparse.Namespace) -> int:
    from dipnode.node.cli.admin import request_rerun

    _, store = _open_store(args.config)
    try:
        new_id = request_rerun(store, args.job, method=args.method,
                               preset_name=args.preset, overrides=method_overrides(args))
    except (ValueError, KeyError) as exc:
        raise UserError(_job_words(in_cli_words(str(exc).strip("'\"")))) from None
    print(f"job {new_id} queued (re-run of job {args.job}); `dipnode jobs` shows its progress")
    return 0


def cmd_resend(args: argparse.Namespace) -> int:
    from dipnode.node.cli.admin import request_resend

    _, store = _open_store(args.config)
    try:
        n = request_resend(store, args.job)
    except (ValueError, KeyError) as exc:
        raise UserError(_job_words(str(exc).strip("'\""))) from None
    print(f"job {args.job}: {n} deliveries queued again")
    return 0


# -- one-shot commands ----------------------------------------------------------------------
def cmd_denoise(args: argparse.Namespace) -> int:
    from dipnode.node.jobs import pipeline
    from dipnode.node.cli.progress import FitProgress

    for name, folder in (("PET_DIR", args.pet_dir), ("MR_DIR", args.mr_dir)):
        if folder is not None and not folder.exists():
            raise UserError(f"{name} {folder}: no such file or folder")
    method = Method(args.method or "sdip")
    if method.needs_mr and args.mr_dir is None:
        raise UserError(f"--method {method.value} needs MR_DIR (or use --method gaussian)")
    preset_name = args.preset or DEFAULT_PRESET
    params = cli_params(preset_name, method_overrides(args), method=method)
    device = describe_device(params.device) if method.needs_mr else "cpu"
    if method.needs_mr:
        say(f"{method.value}: preset {preset_name}{'' if args.preset else ' (the default; --preset paper for the paper settings)'}, "
            f"{params.epochs} epochs on {device}; reading the series and registering the MR first")
    try:
        pet_paths = files_under(args.pet_dir)
        mr_paths = files_under(args.mr_dir) if args.mr_dir is not None else None
        bar = FitProgress(params.epochs, method.value.upper(), device) if method.needs_mr else None
        try:
            result = pipeline.run(pet_paths, mr_paths, args.out, method=method, params=params,
                                  options=pipeline.OutputOptions.from_settings(), progress=bar)
        finally:
            if bar is not None:
                bar.close()
    except (ValueError, OSError) as exc:  # DicomInputError, AlignmentError, PipelineError, ...
        raise UserError(in_cli_words(str(exc))) from None
    folders = sorted({p.parent for p in result.files})
    maps = f", {len(result.map_files)} stability-map files" if result.map_files else ""
    maps += f", {len(result.weight_files)} data weight map files" if result.weight_files else ""
    print(f"wrote {len(result.pet_files)} derived PET files{maps} to {args.out}: "
          + ", ".join(f"{f.relative_to(args.out)}/" for f in folders))
    return 0


def files_under(path: Path) -> list[Path]:
    """The files a PATH argument names: the file itself, or every file below a folder (without
    loading the pipeline, so that `dipnode send` does not import torch)."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise UserError(f"{path}: no such file or folder")
    return sorted(p for p in path.rglob("*") if p.is_file())


def _destination(text: str, name: str, calling_ae: str):
    """The peer ``text`` (option or argument ``name``), after checking our AE title (--aet)."""
    from dipnode.dicom_io.vr import check_ae_title
    from dipnode.dicom_io.scu import Destination

    try:
        check_ae_title("--aet", calling_ae)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    try:
        return Destination.parse(text)
    except ValueError as exc:
        raise UserError(f"{name}: {str(exc).removeprefix('destination: ')}") from None


def cmd_send(args: argparse.Namespace) -> int:
    from dipnode.dicom_io.scu import send_files

    dest = _destination(args.to, "--to", args.aet)
    paths = [p for root in args.paths for p in files_under(root)]
    bar = tqdm(total=len(paths), desc=f"send to {dest.ae_title}", unit="file", file=sys.stderr,
               disable=None)  # None: off when stderr is not a terminal
    report = send_files(paths, dest, calling_ae=args.aet, progress=lambda *_: bar.update(1))
    bar.close()
    if not report.association_ok:
        raise UserError(f"{report.error}")
    for r in report.results:
        if not r.ok:
            status = "" if r.status is None else f"status 0x{r.status:04X} "
            print(f"FAILED {r.path_or_uid}: {status}{r.message}", file=sys.stderr)
    print(f"{report.n_ok} sent, {report.n_failed} failed")
    return 0 if report.all_ok else 1


def cmd_echo(args: argparse.Namespace) -> int:
    from dipnode.dicom_io.scu import echo

    dest = _destination(args.destination, "AET@HOST:PORT", args.aet)
    result = echo(dest, calling_ae=args.aet, timeout_s=args.timeout)
    if not result.ok:
        raise UserError(f"C-ECHO {dest}: {result.message}")
    print(f"C-ECHO {dest}: success")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    # Before the phantom is built and pushed (and before the demo's imports): a device that
    # is not here fails at once.
    describe_device(args.device)
    from dipnode.node.cli.demo import DemoError, run_demo

    try:
        report = run_demo(args.out, preset_name=args.preset, voxel_mm=args.voxel_mm,
                          device=args.device)
    except DemoError as exc:
        raise UserError(str(exc)) from None
    print(f"report written to {report}")
    return 0
