"""What the command line's options mean, shared by the subcommands and the demo: the one-shot
commands' preset, parameters from options (models.params.resolve_params, its errors in the
words the user typed), the device check, and :class:`UserError`."""
from __future__ import annotations

import argparse
import re

from dipnode.models.params import DipParams, Method, resolve_params

#: The preset of the one-shot commands (demo, denoise) unless --preset says otherwise: the
#: one whose results and run time the README reports. The node's own default is in settings.
DEFAULT_PRESET = "fast"


class UserError(Exception):
    """Bad input or an unreachable peer: printed as one line, exit status 1."""


# DipParams field -> the option that sets it on the command line.
_OPTION_OF_FIELD = {"alpha": "--alpha", "epochs": "--epochs", "sample_from": "--sample-from",
                    "sample_every": "--sample-every", "fwhm_voxels": "--fwhm", "device": "--device",
                    "seed": "--seed"}


def method_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The DipParams fields given on the command line."""
    return {field: getattr(args, opt.removeprefix("--").replace("-", "_"))
            for field, opt in _OPTION_OF_FIELD.items()
            if getattr(args, opt.removeprefix("--").replace("-", "_"), None) is not None}


def in_cli_words(message: str) -> str:
    """A parameter error as the user typed it: ``DipParams.fwhm_voxels`` -> ``--fwhm``,
    ``epochs=3`` -> ``--epochs 3``."""
    message = re.sub(r"^preset: ", "--preset: ", message)
    message = re.sub(r"DipParams\.(\w+)", lambda m: _OPTION_OF_FIELD.get(m[1], m[1]), message)
    message = re.sub(r"\b(\w+)=", lambda m: (f"{_OPTION_OF_FIELD[m[1]]} " if m[1] in _OPTION_OF_FIELD
                                              else m[0]), message)
    return message.removeprefix("DipParams: ")


def cli_params(preset_name: str | None, overrides: dict[str, object], *,
               base: DipParams | None = None, method: Method | None = None) -> DipParams:
    """models.params.resolve_params (the one home of the rules), its errors in the words the
    user typed; ``base`` (a job's parameters) unless a preset is named, else DEFAULT_PRESET."""
    try:
        return resolve_params(preset_name=preset_name or (None if base is not None else DEFAULT_PRESET),
                              base=base, overrides=overrides, method=method)
    except ValueError as exc:
        raise UserError(in_cli_words(str(exc))) from None


def describe_device(device: str, key: str = "--device") -> str:
    """The torch device that ``device`` names, in words ("cpu", "cuda:0 (NVIDIA H200)").

    Raises UserError naming ``key`` when it is not on this host, so that a command fails
    before it does any work rather than at the first epoch.
    """
    import torch

    from dipnode.models.dip import DeviceUnavailableError, resolve_device

    try:
        dev = resolve_device(device)
    except DeviceUnavailableError:
        if torch.cuda.is_available():
            n = torch.cuda.device_count()
            raise UserError(f"{key} {device}: this host has {n} CUDA device(s), cuda:0 to "
                            f"cuda:{n - 1}") from None
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise UserError(f"{key} {device}: no CUDA device on this host (torch {torch.__version__}, "
                        f"{build}); use {key} cpu or {key} auto") from None
    if dev.type == "cuda":
        return f"{dev} ({torch.cuda.get_device_name(dev)})"
    return str(dev)
