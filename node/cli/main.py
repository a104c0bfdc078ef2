"""The `dipnode` command line: one parser, each subcommand a thin call into the node."""
from __future__ import annotations

import argparse
import logging
import platform
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from dipnode.models.params import Method

log = logging.getLogger("dipnode")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C
_JOB_ID_MAX = 2**63 - 1  # an SQLite INTEGER


def _job_id(text: str) -> int:
    """A job ID the database can hold (argparse turns the ValueError into a usage error)."""
    n = int(text)
    if not 1 <= n <= _JOB_ID_MAX:
        raise ValueError(text)
    return n


_job_id.__name__ = "job ID (1 or more)"  # argparse names the type in its message


def _finite_float(text: str) -> float:
    x = float(text)
    if x != x or x in (float("inf"), float("-inf")):
        raise ValueError(text)
    return x


_finite_float.__name__ = "finite number"

CONFIG_HELP = ("settings TOML; default: $DIPNODE_CONFIG, else /etc/dipnode/dipnode.toml "
               "(DIPNODE_<SECTION>__<KEY> variables override single keys)")
DESTINATION = "AET@HOST:PORT"


def version_text() -> str:
    """``dipnode 0.1.0 (Python 3.11.7, torch 2.13.0+cpu, ...)``, without importing torch."""
    def v(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return (f"dipnode {v('dipnode')} (Python {platform.python_version()}, torch {v('torch')}, "
            f"pydicom {v('pydicom')}, pynetdicom {v('pynetdicom')})")


class _Version(argparse.Action):
    """``--version``: one unwrapped line on stdout (argparse's own action wraps it at 80)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(version_text())
        parser.exit(EXIT_OK)


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def _add_method_args(p: argparse.ArgumentParser, *, defaults: str) -> None:
    g = p.add_argument_group(f"method (defaults: {defaults})")
    g.add_argument("--method", choices=[m.value for m in Method], default=None,
                   help="sdip (default: SDIP with the data-consistency guard), sdip-paper (the "
                        "paper's method exactly), cdip (plain conditional DIP) or gaussian "
                        "(OSEM + Gaussian)")
    g.add_argument("--preset", default=None,
                   help="paper (the paper's settings: a GPU job), papernet (the paper's network at 12 "
                        "epochs x 10: a GPU job), fast (what the README measured on a CPU) or tiny (tests)")
    g.add_argument("--alpha", type=_finite_float, default=None, metavar="A",
                   help="blend strength: 0 is plain conditional DIP (paper 0.6)")
    g.add_argument("--epochs", type=int, default=None, metavar="N",
                   help="L-BFGS epochs; the stability samples then start at N/2 unless --sample-from")
    g.add_argument("--sample-from", type=int, default=None, metavar="m",
                   help="m: first epoch whose output enters the stability map (paper 100)")
    g.add_argument("--sample-every", type=int, default=None, metavar="M",
                   help="M: sample every M-th epoch from m on (paper 5)")
    g.add_argument("--fwhm", type=_finite_float, default=None, metavar="F",
                   help="Gaussian FWHM in voxels (--method gaussian)")
    g.add_argument("--device", default=None, metavar="D",
                   help="auto (CUDA when present), cpu, cuda or cuda:N")
    g.add_argument("--seed", type=int, default=None, metavar="S",
                   help="seed of the network's initial weights (the CPU fit is repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dipnode",
        description="DICOM node denoising brain PET with stability-weighted conditional DIP. "
                    "Exit status: 0 success, 1 a clear error (bad input, peer refused), 2 usage.")
    parser.add_argument("--version", action=_Version,
                        help="print the version of dipnode and of the libraries it runs on")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log lines: -v info, -vv debug (UIDs and accession numbers only)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="synthesize a study, push it through a local node, write a report",
                       description="A phantom brain FDG study at 1/10 dose goes over DICOM to a node "
                                   "on loopback, which denoises it and sends the results to a local "
                                   "receiving store; the report compares the methods.")
    p.add_argument("--out", type=Path, default=Path("dipnode-report"), metavar="DIR",
                   help="where the report goes (default: dipnode-report)")
    p.add_argument("--preset", default=None,
                   help="fast (the default on every device: what the README measured), paper or tiny")
    p.add_argument("--voxel-mm", type=float, default=None, metavar="MM",
                   help="phantom voxel size (default: 2 for the paper preset, else 4)")
    p.add_argument("--device", default="auto", metavar="D",
                   help="auto (CUDA when present, default), cpu, cuda or cuda:N")

    p = sub.add_parser("denoise", help="denoise a PET series from files, write DICOM outputs",
                       description="Runs the method on folders of files and writes what the node "
                                   "would send: the derived PET (series 1001), the stability map as "
                                   "a Parametric Map (1002) and as a plain series (1003).")
    p.add_argument("pet_dir", type=Path, metavar="PET_DIR", help="folder (or file) of the PET series")
    p.add_argument("mr_dir", type=Path, nargs="?", metavar="MR_DIR",
                   help="folder of the subject's MR (required for sdip and cdip)")
    p.add_argument("--out", type=Path, required=True, metavar="OUT_DIR",
                   help="where the DICOM outputs are written (pet/, map/, map-plain/)")
    _add_method_args(p, defaults="the fast preset, sdip")

    p = sub.add_parser("serve", help="run the DICOM node",
                       description="Receive, denoise and send back until SIGTERM or Ctrl-C; logs "
                                   "go to stderr.")
    p.add_argument("--config", type=Path, default=None, metavar="FILE", help=CONFIG_HELP)

    p = sub.add_parser("health", help="C-ECHO this node as its settings describe it (health check)",
                       description="Calls the node's AE title on its port from loopback, as an AE "
                                   "title it accepts, over TLS when it listens with TLS. Exit 0 "
                                   "when it answers.")
    p.add_argument("--config", type=Path, default=None, metavar="FILE", help=CONFIG_HELP)
    p.add_argument("--timeout", type=_positive_float, default=10.0, metavar="S",
                   help="seconds to wait for the node (default 10)")

    p = sub.add_parser("send", help="C-STORE files or folders to a DICOM peer")
    p.add_argument("paths", type=Path, nargs="+", metavar="PATH", help="DICOM files or folders of them")
    p.add_argument("--to", required=True, metavar=DESTINATION,
                   help="the peer, e.g. DIPNODE@pacs-host:11112")
    p.add_argument("--aet", default="DIPNODE", help="our calling AE title (default DIPNODE)")

    p = sub.add_parser("echo", help="C-ECHO a DICOM peer")
    p.add_argument("destination", metavar=DESTINATION, help="the peer, e.g. ORTHANC@pacs-host:4242")
    p.add_argument("--aet", default="DIPNODE", help="our calling AE title (default DIPNODE)")
    p.add_argument("--timeout", type=_positive_float, default=10.0, metavar="S",
                   help="seconds to wait for the peer (default 10)")

    p = sub.add_parser("jobs", help="list the node's jobs")
    p.add_argument("--config", type=Path, default=None, metavar="FILE", help=CONFIG_HELP)
    p.add_argument("--all", action="store_true", help="include done jobs")

    p = sub.add_parser("rerun", help="run a job again (new series), optionally with other parameters")
    p.add_argument("job", type=_job_id, metavar="JOB", help="the job's number (dipnode jobs)")
    p.add_argument("--config", type=Path, default=None, metavar="FILE", help=CONFIG_HELP)
    _add_method_args(p, defaults="the job's own")

    p = sub.add_parser("purge", help="delete what retention says may go ([retention]); --dry-run lists it",
                       description="Deletes the received files of finished jobs, and the results "
                                   "they kept, once older than [retention] inputs_days, failed_days "
                                   "and outputs_days; never anything an unfinished job needs. The "
                                   "node does this itself every sweep_interval_s; without --dry-run "
                                   "this command needs the node stopped.")
    p.add_argument("--config", type=Path, default=None, metavar="FILE", help=CONFIG_HELP)
    p.add_argument("--dry-run", action="store_true", help="list what would go, delete nothing")
    p.add_argument("--emergency", action="store_true",
                   help="as the emergency sweep: the oldest finished first whatever their age, "
                        "until the spool is above retention.emergency_free_mb")

    p = sub.add_parser("resend", help="deliver a job's results again (clears dead letters)")
    p.add_argument("job", type=_job_id, metavar="JOB", help="the job's number (dipnode jobs)")
    p.add_argument("--config", type=Path, default=None, metavar="FILE", help=CONFIG_HELP)
    return parser


def _configure_logging(command: str, verbosity: int) -> None:
    # The node is a service: its log (stderr; journald or `docker compose logs`) says what it
    # does at INFO. The one-shot commands print their own outcome and log only warnings.
    # -v is info and -vv debug for every command, as --help says.
    if verbosity >= 2:
        level = logging.DEBUG
    elif verbosity == 1 or command == "serve":
        level = logging.INFO
    else:
        level = logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if level > logging.DEBUG:
        # pynetdicom logs a PDU per INFO line and two ERROR lines for every refused connection;
        # a command reports the failure itself in one line, the node's log keeps its warnings.
        quiet = command != "serve" and verbosity == 0
        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL if quiet else logging.WARNING)
    if command in ("send", "echo", "health", "demo") and verbosity == 0:
        # The sender's warning repeats the error line the command prints.
        logging.getLogger("dipnode.dicom_io.scu").setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.command, args.verbose)
    # Imports are deferred so that `dipnode --help` and `dipnode echo` do not load torch.
    from dipnode.node.cli import commands

    try:
        return commands.dispatch(args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except commands.UserError as exc:
        print(f"dipnode {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
