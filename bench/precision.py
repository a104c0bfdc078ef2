"""Does a speed switch change the result? The same SDIP fit, fp32 against a switch, on the phantom.

    python bench/precision.py --preset fast --voxel-mm 4 --switch precision=bf16
    python bench/precision.py --preset fast --voxel-mm 4 --switch channels_last=true

The demo's phantom (sim/phantom.py, the default 10 mm hot white-matter lesion) at 1/10 dose,
OSEM 4 x 16 as the demo writes it, the MR on the same grid; ``denoise`` (SDIP with the guard)
once with the preset in fp32 and once with the switch. Prints, for each, the phantom's
metrics (models/metrics.py ``metrics_table`` against the noise-free reconstruction) and the
relative L2 difference of the two derived images, the network images and the stability maps,
as one JSON line and a small table. A fit is deterministic on CPU, so any difference is the
switch's. bf16 autocast on CPU runs through oneDNN where it has bf16 kernels.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from dipnode.models.denoise import denoise
from dipnode.models.metrics import metrics_table
from dipnode.models.params import preset
from dipnode.sim.pet_sim import simulate_osem
from dipnode.sim.phantom import make_phantom


def parse_switch(text: str) -> dict[str, object]:
    key, _, value = text.partition("=")
    if value.lower() in ("true", "false"):
        return {key: value.lower() == "true"}
    return {key: value}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="fast")
    p.add_argument("--voxel-mm", type=float, default=4.0)
    p.add_argument("--dose", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--switch", default="precision=bf16", help="key=value of DipParams")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    ph = make_phantom(args.voxel_mm)
    x0 = simulate_osem(ph.activity, args.dose, iterations=4, subsets=16, seed=args.seed)
    ref = simulate_osem(ph.activity, 1.0, iterations=4, subsets=16, seed=0, poisson=False)
    base = preset(args.preset).replace(device="cpu")
    switched = base.replace(**parse_switch(args.switch))
    out: dict[str, object] = {"preset": args.preset, "shape": list(ph.shape), "switch": args.switch,
                              "dose": args.dose, "torch": torch.__version__}
    results = {}
    for name, params in (("fp32", base), (args.switch, switched)):
        t0 = time.perf_counter()
        r = denoise(x0, ph.mr, ph.spacing, params)
        out[f"{name} s"] = round(time.perf_counter() - t0, 1)
        out[f"{name} metrics"] = {k: round(v, 4) for k, v in metrics_table(r.denoised, ref, ph.masks).items()}
        results[name] = r
    a, b = results["fp32"], results[args.switch]

    def rel(u: np.ndarray, v: np.ndarray) -> float:
        return float(np.linalg.norm(u - v) / np.linalg.norm(u))

    out["rel_diff_denoised"] = rel(a.denoised, b.denoised)
    out["rel_diff_network"] = rel(a.network_image, b.network_image)
    out["rel_diff_stability"] = rel(a.stability, b.stability)
    out["osem metrics"] = {k: round(v, 4) for k, v in metrics_table(x0, ref, ph.masks).items()}
    print(json.dumps(out))
    keys = ("wm_cov_percent", "pvr_mean", "lesion_contrast", "bias_gm_percent")
    print("| image | " + " | ".join(keys) + " |")
    print("|---|" + "---:|" * len(keys))
    for name in ("osem", "fp32", args.switch):
        m = out[f"{name} metrics"]
        print(f"| {name} | " + " | ".join(f"{m[k]:.3f}" for k in keys) + " |")
    print(f"relative L2 difference to fp32: derived image {out['rel_diff_denoised']:.4f}, network image "
          f"{out['rel_diff_network']:.4f}, stability map {out['rel_diff_stability']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
