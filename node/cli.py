"""The `dipnode` command line: one parser, each subcommand a thin call into the node."""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("dipnode")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _add_method_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("method (defaults: the preset's)")
    g.add_argument("--method", choices=["sdip", "sdip-paper", "cdip", "gaussian"], default=None,
                   help="sdip: with the data-consistency guard (default); sdip-paper: the "
                        "paper's method exactly")
    g.add_argument("--preset", default=None, help="paper (GPU), papernet (GPU, 12 x 10), fast (CPU demo) or tiny (tests)")
    g.add_argument("--alpha", type=float, default=None, help="blend strength (paper 0.6)")
    g.add_argument("--epochs", type=int, default=None)
    g.add_argument("--sample-from", type=int, default=None, help="m: first epoch sampled")
    g.add_argument("--sample-every", type=int, default=None, help="M: sample every M epochs")
    g.add_argument("--fwhm", type=float, default=None, help="Gaussian FWHM in voxels")
    g.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N")
    g.add_argument("--seed", type=int, default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dipnode",
        description="DICOM node denoising brain PET with stability-weighted conditional DIP.")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="-v info, -vv debug (UIDs and accession numbers only)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("denoise", help="denoise a PET series from files, write DICOM outputs")
    p.add_argument("pet_dir", type=Path, metavar="PET_DIR")
    p.add_argument("mr_dir", type=Path, nargs="?", metavar="MR_DIR",
                   help="the subject's MR (required for sdip and cdip)")
    p.add_argument("--out", type=Path, required=True, metavar="OUT_DIR")
    _add_method_args(p)

    p = sub.add_parser("serve", help="run the DICOM node")
    p.add_argument("--config", type=Path, default=None, help="settings TOML (DIPNODE_* env overrides)")

    p = sub.add_parser("send", help="C-STORE files or folders to a DICOM peer")
    p.add_argument("paths", type=Path, nargs="+", metavar="PATH")
    p.add_argument("--to", required=True, metavar="AET@HOST:PORT")
    p.add_argument("--aet", default="DIPNODE", help="our calling AE title")

    p = sub.add_parser("echo", help="C-ECHO a DICOM peer")
    p.add_argument("destination", metavar="AET@HOST:PORT")
    p.add_argument("--aet", default="DIPNODE", help="our calling AE title")

    p = sub.add_parser("jobs", help="list the node's jobs")
    p.add_argument("--config", type=Path, default=None)
    p.add_argument("--all", action="store_true", help="include done jobs")

    p = sub.add_parser("rerun", help="run a job again (new series), optionally with other parameters")
    p.add_argument("job", type=int, metavar="JOB")
    p.add_argument("--config", type=Path, default=None)
    _add_method_args(p)

    p = sub.add_parser("resend", help="deliver a job's results again (clears dead letters)")
    p.add_argument("job", type=int, metavar="JOB")
    p.add_argument("--config", type=Path, default=None)

    p = sub.add_parser("demo", help="synthesize a study, push it through a local node, write a report")
    p.add_argument("--out", type=Path, default=Path("dipnode-report"))
    p.add_argument("--preset", default=None, help="default: paper on a GPU, fast on a CPU")
    p.add_argument("--voxel-mm", type=float, default=None, help="phantom voxel size (default by preset)")
    p.add_argument("--device", default="auto")
    return parser


def _configure_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if verbosity < 2:  # pynetdicom is chatty at INFO: one line per PDU
        logging.getLogger("pynetdicom").setLevel(max(level, logging.WARNING))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    # Imports are deferred so that `dipnode --help` and `dipnode echo` do not load torch.
    from dipnode.node import commands

    try:
        return commands.dispatch(args)
    except KeyboardInterrupt:
        return 130
    except commands.UserError as exc:
        print(f"dipnode {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
