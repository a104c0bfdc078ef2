"""Schedule comparison: fewer forward+backward passes at the fidelity benchmark's quality?

Fits the paper's network (U-Net 16/32/64/128 + 256) to the fidelity phantom's crop
(bench/fidelity.py: 2 mm, twelve lesions, OSEM 4x16, 48x64x64) with a cheaper L-BFGS
schedule, counts the passes each fit really ran (``DipFit.passes``), and scores it with the
fidelity benchmark's own metrics (``fidelity.evaluate_fit``: PVR, WM CoV, GM bias, lesion
contrast recovery of SDIP with the guard), beside the reference fits of the ``papernet``
schedule (12 epochs x 10, S over epochs 6-12) made by ``bench/fidelity.py fit --network
papernet``.

    python bench/schedule.py fit   --schedule short --seeds 0 1
    python bench/schedule.py table --reference-fits bench/results/fidelity/fits --seeds 0 1

Fits are cached as ``<results>/fits/<schedule>-d<dose>-s<seed>.npz`` in the fidelity
benchmark's format (plus ``passes_per_epoch``), so ``fidelity.evaluate_fit`` reads them as
it reads its own; the table goes to stdout and ``<results>/schedule.json``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import fidelity  # noqa: E402  (bench/ is a folder of scripts)

from dipnode.models.params import DipParams, preset  # noqa: E402

log = logging.getLogger("schedule")
DEFAULT_RESULTS = HERE / "results" / "schedule"

# Each schedule: the paper network with (epochs, max_iter, m, M). The reference is the
# fidelity benchmark's papernet: iterations 60-120 are where the paper network has fitted the
# nuclei and not yet the noise (its 60-epoch curve in bench/FIDELITY.md).
SCHEDULES: dict[str, dict[str, int]] = {
    "papernet": dict(epochs=12, max_iter=10, sample_from=6, sample_every=1),
    # Half the inner iterations, same epochs and samples: S over iterations 30-60.
    "short": dict(epochs=12, max_iter=5, sample_from=6, sample_every=1),
    # 8 epochs of 8: 64 iterations, S over epochs 4-8 (5 samples).
    "short8": dict(epochs=8, max_iter=8, sample_from=4, sample_every=1),
}


def schedule_params(name: str, seed: int) -> DipParams:
    if name not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {sorted(SCHEDULES)}, got {name!r}")
    return preset("paper").replace(**SCHEDULES[name], seed=seed, device="cpu")


def run_fit(results: Path, schedule: str, dose: float, seed: int, force: bool = False) -> Path:
    from dipnode.models.dip import fit_conditional_dip

    path = results / "fits" / f"{fidelity.fit_name(schedule, dose, seed)}.npz"
    if path.exists() and not force:
        log.info("%s: cached", path.name)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    params = schedule_params(schedule, seed)
    x0 = fidelity.crop(fidelity.osem(dose, seed))
    mr = fidelity.crop(fidelity.phantom().mr)
    t0 = time.time()

    def progress(epoch: int, epochs: int, loss: float) -> None:
        log.info("%s: epoch %d/%d loss %.4g (%.0f s)", path.stem, epoch, epochs, loss, time.time() - t0)

    snaps = tuple(range(1, params.epochs + 1))
    fit = fit_conditional_dip(x0, mr, params, progress=progress, snapshot_epochs=snaps)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    np.savez_compressed(
        tmp, x0=x0, output=fit.output, sample_mean=fit.sample_mean, stability=fit.stability,
        snapshot_epochs=np.array(sorted(fit.snapshots)),
        snapshots=np.stack([fit.snapshots[e] for e in sorted(fit.snapshots)]).astype(np.float16),
        loss=np.array(fit.loss_history), params=json.dumps(params.as_dict()),
        timings=json.dumps(fit.timings), passes_per_epoch=np.array(fit.passes_per_epoch))
    tmp.replace(path)
    log.info("%s: %d passes in %.0f s", path.stem, fit.passes, fit.timings["fit"])
    return path


def summary(row: dict, method: str = "SDIP (new)") -> dict[str, float]:
    m = row["metrics"][method]
    osem = row["metrics"]["OSEM"]
    names = fidelity.lesion_names()
    return {
        "pvr": m["pvr"], "wm_cov": m["wm_cov"], "gm_bias": m["gm_bias"],
        "cr_hot": float(np.mean([m[f"cr:{n}"] for n in names if "-hot-" in n])),
        "cr_cold": float(np.mean([m[f"cr:{n}"] for n in names if "-cold-" in n])),
        "lesions_kept": int(sum(m[f"cr:{n}"] >= 0.95 * osem[f"cr:{n}"] for n in names)),
    }


def passes_of(path: Path) -> tuple[int | None, float]:
    with np.load(path) as z:
        timings = json.loads(str(z["timings"]))
        passes = int(z["passes_per_epoch"].sum()) if "passes_per_epoch" in z.files else None
    return passes, float(timings["fit"])


def cmd_table(args: argparse.Namespace) -> int:
    rows = []
    sources = [(args.reference_fits, "papernet")] + [(args.results / "fits", s) for s in args.schedules]
    for folder, schedule in sources:
        for seed in args.seeds:
            path = folder / f"{fidelity.fit_name(schedule, args.dose, seed)}.npz"
            if not path.exists():
                log.warning("%s: missing, skipped", path)
                continue
            log.info("evaluating %s", path)
            row = fidelity.evaluate_fit(path)
            passes, fit_s = passes_of(path)
            sch = SCHEDULES[schedule]
            rows.append({"schedule": schedule, "seed": seed, **sch, "passes": passes, "fit_s": fit_s,
                         "sdip": summary(row), "osem": summary(row, "OSEM")})
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "schedule.json").write_text(json.dumps(rows, indent=1))
    print("| schedule | seed | epochs × max_iter (m, M) | passes | fit s (CPU) | PVR | WM CoV % | "
          "GM bias % | CR hot / cold | lesions ≥ 0.95 × OSEM |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---|---:|")
    for r in rows:
        s = r["sdip"]
        passes = r["passes"] if r["passes"] is not None else f"≤ {r['epochs'] * (r['max_iter'] * 5 // 4 + 1)}"
        print(f"| {r['schedule']} | {r['seed']} | {r['epochs']} × {r['max_iter']} ({r['sample_from']}, "
              f"{r['sample_every']}) | {passes} | {r['fit_s']:.0f} | {s['pvr']:.2f} | {s['wm_cov']:.1f} | "
              f"{s['gm_bias']:.2f} | {s['cr_hot']:.2f} / {s['cr_cold']:.2f} | {s['lesions_kept']} of 12 |")
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    for schedule in args.schedules:
        for seed in args.seeds:
            run_fit(args.results, schedule, args.dose, seed, force=args.force)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stage", choices=["fit", "table"])
    p.add_argument("--schedules", nargs="+", default=["short"], choices=sorted(SCHEDULES))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--dose", type=float, default=0.1)
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    p.add_argument("--reference-fits", type=Path, default=fidelity.DEFAULT_RESULTS / "fits",
                   help="folder holding papernet-d<dose>-s<seed>.npz from bench/fidelity.py fit")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    return {"fit": cmd_fit, "table": cmd_table}[args.stage](args)


if __name__ == "__main__":
    sys.exit(main())
