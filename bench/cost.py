"""What a fit costs: passes, FLOPs per pass, peak memory, seconds per pass, for a preset.

    python bench/cost.py --preset paper --shape 112 136 136 --passes 1
    python bench/cost.py --preset fast --shape 43 52 44 --fit        # counts a whole fit's passes
    python bench/cost.py --preset paper --shape 112 136 136 --device cuda --precision bf16 --compile

One forward+backward pass is exactly the fit's (models/dip.py): the preset's U-Net in train
mode, MSE loss, with the preset's speed switches (precision, channels-last, compile, cuDNN
autotuning; each overridable here). Reported, as one JSON line then one human line:

- ``flops_per_pass``: torch.utils.flop_counter.FlopCounterMode over one forward+backward,
  counted on the meta device (shapes only, no arithmetic), so it costs nothing at any size.
  FlopCounterMode counts convolutions and matrix products (2 FLOPs per multiply-add), not
  normalisation or activations.
- ``pass_s``: wall seconds per pass, mean of ``--passes`` timed passes after ``--warmup``
  (the first pass pays allocation, cuDNN autotuning or compilation: ``warmup_s``).
- ``peak_mem_mib``: CUDA, ``torch.cuda.max_memory_allocated``; CPU, the process's peak resident
  set (``ru_maxrss``; tracemalloc does not see torch's allocator), with
  ``peak_mem_delta_mib`` its growth from before the network was built.
  ``estimate_mib``: ``dip.fit_memory_bytes`` (what ``memory_limit_mb`` is checked against).
- ``passes``: with ``--fit``, the whole fit is run on a synthetic PET/MR of the shape and
  ``passes`` is ``DipFit.passes`` (closure calls, line search included), ``fit_s`` its time;
  with ``--epochs K``, K real L-BFGS epochs are run and ``passes_estimate`` is epochs x their
  mean; otherwise ``passes_bound`` = epochs x (max_eval + 1), L-BFGS's per-step cap
  (max_eval = max_iter·5/4, plus the step's first evaluation).
- ``fit_estimate_s``: pass_s x (passes, else the estimate, else the bound).
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from dipnode.models.dip import (autocast_for, backend_flags, fit_conditional_dip, fit_memory_bytes,
                                make_lbfgs, resolve_device)
from dipnode.models.params import PRECISIONS, DipParams, preset
from dipnode.models.unet import UNet3d, parameter_count


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def flops_per_pass(shape: tuple[int, int, int], params: DipParams) -> int:
    """FLOPs of one forward+backward of the preset's network on the meta device."""
    with torch.device("meta"):
        net = UNet3d(1, 1, params.base_channels, params.depth).train()
        x = torch.empty((1, 1) + shape)
        y = torch.empty((1, 1) + shape)
    counter = FlopCounterMode(display=False)
    with counter:
        F.mse_loss(net(x), y).backward()
    return int(counter.get_total_flops())


def synthetic_pair(shape: tuple[int, int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A smooth 'brain' with a hot core (MR and PET share it) and Poisson PET noise."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    r2 = sum(g * g for g in grids)
    tissue = (r2 < 0.7).astype(np.float32) + (r2 < 0.2).astype(np.float32)
    mr = (400 + 300 * tissue + rng.normal(0, 10, shape)).astype(np.float32)
    pet = (rng.poisson(10 * (1 + 3 * tissue)) * 300.0).astype(np.float32)
    return pet, mr


def params_from(args: argparse.Namespace) -> DipParams:
    params = preset(args.preset).replace(device=args.device, seed=args.seed)
    changes = {k: v for k, v in (("precision", args.precision), ("channels_last", args.channels_last),
                                 ("compile", args.compile), ("cudnn_benchmark", args.cudnn_benchmark),
                                 ("epochs", args.fit_epochs), ("max_iter", args.max_iter))
               if v is not None}
    if "epochs" in changes:  # keep the samples inside the shorter fit (the second half)
        e = changes["epochs"]
        changes["sample_from"] = max(1, min(params.sample_from, e // 2))
        changes["sample_every"] = 1
    return params.replace(**changes)


def run(args: argparse.Namespace) -> dict[str, object]:
    if args.threads:
        torch.set_num_threads(args.threads)
    params = params_from(args)
    device = resolve_device(params.device)
    shape = tuple(args.shape)
    out: dict[str, object] = {
        "preset": args.preset, "shape": list(shape), "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "precision": params.precision, "channels_last": params.channels_last,
        "compile": params.compile, "cudnn_benchmark": params.cudnn_benchmark,
        "base_channels": params.base_channels, "depth": params.depth,
        "epochs": params.epochs, "max_iter": params.max_iter,
    }
    out["flops_per_pass"] = flops_per_pass(shape, params)
    out["estimate_mib"] = round(fit_memory_bytes(shape, params) / 2**20, 1)

    rss0 = _maxrss_mib()
    fmt = torch.channels_last_3d if params.channels_last else torch.contiguous_format
    torch.manual_seed(args.seed)
    net = UNet3d(1, 1, params.base_channels, params.depth).to(device=device, memory_format=fmt).train()
    out["parameters"] = parameter_count(net)
    model = torch.compile(net) if params.compile else net
    x = torch.randn((1, 1) + shape, device=device).contiguous(memory_format=fmt)
    y = torch.rand((1, 1) + shape, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def pass_once() -> None:
        net.zero_grad(set_to_none=True)
        with autocast_for(device, params.precision):
            pred = model(x).float()
        F.mse_loss(pred, y).backward()

    with backend_flags(device, params):
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            pass_once()
        _sync(device)
        out["warmup_s"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        for _ in range(args.passes):
            pass_once()
        _sync(device)
        pass_s = (time.perf_counter() - t0) / args.passes
        out["pass_s"] = round(pass_s, 4)
        out["gflop_per_s"] = round(out["flops_per_pass"] / pass_s / 1e9, 2)  # type: ignore[operator]
        if args.epochs:
            optimizer = make_lbfgs(net.parameters(), params)
            calls = [0]

            def closure() -> torch.Tensor:
                calls[0] += 1
                optimizer.zero_grad()
                with autocast_for(device, params.precision):
                    pred = model(x).float()
                loss = F.mse_loss(pred, y)
                loss.backward()
                return loss

            per_epoch = []
            for _ in range(args.epochs):
                calls[0] = 0
                optimizer.step(closure)
                per_epoch.append(calls[0])
            out["passes_per_epoch_measured"] = per_epoch
            out["passes_estimate"] = int(round(params.epochs * float(np.mean(per_epoch))))
    if device.type == "cuda":
        out["peak_mem_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    else:
        out["peak_mem_mib"] = round(_maxrss_mib(), 1)
        out["peak_mem_delta_mib"] = round(_maxrss_mib() - rss0, 1)
    out["passes_bound"] = params.epochs * (params.max_iter * 5 // 4 + 1)
    if args.fit:
        del net, model, x, y
        pet, mr = synthetic_pair(shape, args.seed)
        fit = fit_conditional_dip(pet, mr, params)
        out["passes"] = fit.passes
        out["passes_per_epoch"] = list(fit.passes_per_epoch)
        out["fit_s"] = round(fit.timings["fit"], 2)
        if device.type == "cuda":
            out["fit_peak_mem_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        else:
            out["fit_peak_mem_mib"] = round(_maxrss_mib(), 1)
    n = out.get("passes") or out.get("passes_estimate") or out["passes_bound"]
    out["fit_estimate_s"] = round(pass_s * float(n), 1)  # type: ignore[arg-type]
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="paper", help="tiny, fast or paper")
    p.add_argument("--shape", type=int, nargs=3, default=[112, 136, 136], metavar=("D", "H", "W"))
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--passes", type=int, default=1, help="timed forward+backward passes")
    p.add_argument("--warmup", type=int, default=1, help="untimed passes first")
    p.add_argument("--epochs", type=int, default=0, help="real L-BFGS epochs to count passes per epoch")
    p.add_argument("--fit", action="store_true", help="run the whole fit and count its passes")
    p.add_argument("--fit-epochs", type=int, default=None, help="override the preset's epochs")
    p.add_argument("--max-iter", type=int, default=None, help="override the preset's max_iter")
    p.add_argument("--precision", choices=PRECISIONS, default=None)
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if any(n < 1 for n in args.shape) or args.passes < 1 or args.warmup < 0 or args.epochs < 0:
        p.error("expected positive --shape and --passes, --warmup and --epochs >= 0")
    return args


def human(r: dict) -> str:
    passes = (f"{r['passes']} passes (fit {r['fit_s']:.0f} s)" if "passes" in r else
              f"~{r['passes_estimate']} passes (from {r['passes_per_epoch_measured']} per epoch)"
              if "passes_estimate" in r else f"<= {r['passes_bound']} passes")
    return (f"{r['preset']} {'x'.join(map(str, r['shape']))} on {r['device']} ({r['precision']}"
            f"{', channels-last' if r['channels_last'] else ''}{', compiled' if r['compile'] else ''}): "
            f"{r['flops_per_pass'] / 1e9:.1f} GFLOP/pass, {r['pass_s']:.3f} s/pass "
            f"({r['gflop_per_s']:.1f} GFLOP/s), peak {r['peak_mem_mib']:.0f} MiB "
            f"(estimate {r['estimate_mib']:.0f}); {passes}; whole fit ~{r['fit_estimate_s']:.0f} s")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    r = run(args)
    print(json.dumps(r))
    print(human(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
