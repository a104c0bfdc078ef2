"""Fidelity benchmark: does denoising keep what the measured data show? (bench/FIDELITY.md)

The project's brain FDG phantom (sim/phantom.py) at 2 mm with twelve lesions the MR does not
show (hot and cold; 6, 8 and 12 mm; in white matter and in cortex), reconstructed whole by
OSEM (4 iterations x 16 subsets, as the demo) at doses 1/4, 1/10 and 1/20 with five noise
seeds each, then cropped to the 48x64x64 box that holds the nuclei and the lesions
(FIDELITY_REGION_MNI), which is what the networks see.

Stages (each reads what the previous wrote under --results, so the table can be rebuilt
without refitting):

    python bench/fidelity.py fit   --network fast  --doses 0.25 0.1 0.05 --seeds 0 1 2 3 4
    python bench/fidelity.py fit   --network papernet --doses 0.1 --seeds 0 1 2 3 4
    python bench/fidelity.py fit   --network fast  --doses 0.1 --seeds 0 1 2 3 4 --jitter 0.05
    python bench/fidelity.py null  --doses 0.25 0.1 0.05 --realisations 20
    python bench/fidelity.py table --out bench/FIDELITY.md

``fit`` runs one conditional DIP per (network, dose, seed[, jitter]) and caches its arrays
(``<results>/fits/*.npz``: the OSEM crop it was fitted to, the last output, the mean of the
sampled outputs, S, snapshots); it skips fits already cached. The paper's SDIP, cDIP and the
new SDIP all come from the same fit; the guard and the blends are post-fit steps, done in
``table``. ``null`` measures the guard's false alarms on the lesion-free phantom with the
noise-free reconstruction as the network's image (the guard's statistics alone).
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dipnode.models.params import DipParams, preset
from dipnode.sim.pet_sim import simulate_osem
from dipnode.sim.phantom import (FIDELITY_LESIONS, FIDELITY_REGION_MNI, Phantom, _sphere_fraction,
                                 make_phantom)

log = logging.getLogger("fidelity")

HERE = Path(__file__).resolve().parent
DEFAULT_RESULTS = HERE / "results" / "fidelity"
VOXEL_MM = 2.0
OSEM_ITERATIONS, OSEM_SUBSETS = 4, 16  # as sim/study.py writes the demo's PET
FULL_DOSE_SEED_OFFSET = 1000  # the full-dose reference of seed s uses noise seed 1000 + s
DOSES = (0.25, 0.1, 0.05)
SEEDS = (0, 1, 2, 3, 4)


NETWORKS = ("fast", "papernet", "paper")
NETWORK_LABELS = {
    "fast": "fast preset (U-Net 4/8 + 16, 30 epochs x 8)",
    "papernet": "paper network (U-Net 16/32/64/128 + 256), 12 epochs x 10",
    "papernet60": "paper network, 60 epochs x 10 (fits the noise)",
    "paper": "paper preset (200 epochs x 20)",
}


def network_params(name: str, seed: int, jitter: float = 0.0) -> DipParams:
    """The fit's parameters.

    fast: the ``fast`` preset (what the demo runs on a CPU). paper: the ``paper`` preset
    exactly (200 epochs of 20 inner iterations: a GPU job, ~3 h per fit on this 2-core CPU
    when idle, ~12 h when shared). papernet: the paper's network (U-Net 16/32/64/128 + 256)
    stopped where it has fitted the structure and not yet the noise: 12 epochs of 10 inner
    iterations, S over epochs 6-12 (7 samples). Chosen from seed 0's per-epoch curve of a
    60-epoch fit (kept as ``papernet60``): white-matter noise is lowest at epochs 3-9 and
    rises past full dose's after ~15 as the network fits the noise; the nuclei appear at ~9.
    """
    if name == "fast":
        base = preset("fast")
    elif name == "paper":
        base = preset("paper")
    elif name == "papernet":
        base = preset("paper").replace(epochs=12, max_iter=10, sample_from=6, sample_every=1)
    else:
        raise ValueError(f"network: expected one of {NETWORKS}, got {name!r}")
    return base.replace(seed=seed, device="cpu", input_jitter=jitter)


def snapshot_epochs(params: DipParams) -> tuple[int, ...]:
    """Every epoch for short fits, every M-th (the sampling step) for long ones."""
    step = 1 if params.epochs <= 60 else params.sample_every
    return tuple(range(step, params.epochs + 1, step))


@functools.lru_cache(maxsize=1)
def phantom() -> Phantom:
    return make_phantom(VOXEL_MM, lesions=FIDELITY_LESIONS, region_mni=FIDELITY_REGION_MNI)


@functools.lru_cache(maxsize=1)
def lesion_free_activity() -> np.ndarray:
    """The same phantom without its lesions (every lesion's factor divided out)."""
    p = phantom()
    act = p.activity.astype(np.float64)
    for les, c in p.lesions:
        frac = _sphere_fraction(p.shape, np.asarray(p.spacing), np.asarray(c), les.diameter_mm / 2)
        act = act / (1.0 + (les.factor - 1.0) * frac)
    return act.astype(np.float32)


@functools.lru_cache(maxsize=16)
def osem(dose: float, seed: int | None, lesions: bool = True) -> np.ndarray:
    """Whole-volume OSEM of the phantom at ``dose``; seed None = noise-free (expected counts)."""
    act = phantom().activity if lesions else lesion_free_activity()
    out = simulate_osem(act, dose, iterations=OSEM_ITERATIONS, subsets=OSEM_SUBSETS,
                        seed=0 if seed is None else seed, poisson=seed is not None)
    out.setflags(write=False)
    return out


def crop(vol: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(vol[phantom().region])


def fit_name(network: str, dose: float, seed: int, jitter: float = 0.0) -> str:
    name = f"{network}-d{dose:g}-s{seed}"
    return name + (f"-j{jitter:g}" if jitter else "")


def run_fit(results: Path, network: str, dose: float, seed: int, jitter: float = 0.0,
            force: bool = False) -> Path:
    """One conditional DIP fit on the crop, cached as ``fits/<name>.npz``."""
    from dipnode.models.dip import fit_conditional_dip

    path = results / "fits" / f"{fit_name(network, dose, seed, jitter)}.npz"
    if path.exists() and not force:
        log.info("%s: cached", path.name)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    params = network_params(network, seed, jitter)
    x0 = crop(osem(dose, seed))
    mr = crop(phantom().mr)
    snaps = snapshot_epochs(params)
    t0 = time.time()

    def progress(epoch: int, epochs: int, loss: float) -> None:
        if epoch % max(1, epochs // 10) == 0:
            log.info("%s: epoch %d/%d loss %.4g (%.0f s)", path.stem, epoch, epochs, loss,
                     time.time() - t0)

    fit = fit_conditional_dip(x0, mr, params, progress=progress, snapshot_epochs=snaps)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")  # two queues may race
    np.savez_compressed(
        tmp, x0=x0, output=fit.output, sample_mean=fit.sample_mean, stability=fit.stability,
        snapshot_epochs=np.array(sorted(fit.snapshots)),
        snapshots=np.stack([fit.snapshots[e] for e in sorted(fit.snapshots)]).astype(np.float16),
        loss=np.array(fit.loss_history), params=json.dumps(params.as_dict()),
        timings=json.dumps(fit.timings))
    tmp.replace(path)
    log.info("%s: fit in %.0f s", path.stem, fit.timings["fit"])
    return path


@dataclass(frozen=True)
class CachedFit:
    name: str
    x0: np.ndarray
    output: np.ndarray
    sample_mean: np.ndarray
    stability: np.ndarray
    snapshot_epochs: np.ndarray
    snapshots: np.ndarray
    loss: np.ndarray
    params: dict
    timings: dict


def load_fit(path: Path) -> CachedFit:
    with np.load(path) as z:
        return CachedFit(path.stem, z["x0"], z["output"], z["sample_mean"], z["stability"],
                         z["snapshot_epochs"], z["snapshots"].astype(np.float32), z["loss"],
                         json.loads(str(z["params"])), json.loads(str(z["timings"])))


def cmd_fit(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)  # a shared 2-core machine: 1 thread is fastest here
    for dose in args.doses:
        for seed in args.seeds:
            run_fit(args.results, args.network, dose, seed, args.jitter, force=args.force)
    return 0


# --------------------------------------------------------------------------------------
# Post-fit: the methods, the metrics, the table


@dataclass(frozen=True)
class Reference:
    """What a fit's images are judged against, all on the crop."""

    masks: dict[str, np.ndarray]
    expected: np.ndarray       # noise-free OSEM (expected counts): the CR and bias reference
    full_dose: np.ndarray      # full-dose OSEM with its own noise (seed 1000 + s)
    osem_whole: np.ndarray     # the low-dose OSEM, whole volume (the Gaussian filters this)
    spacing: tuple[float, float, float]


def lesion_names() -> list[str]:
    return [les.name for les, _ in phantom().lesions]


def reference(dose: float, seed: int) -> Reference:
    p = phantom()
    masks = {k: np.ascontiguousarray(v[p.region]) for k, v in p.masks.items()}
    return Reference(masks, crop(osem(1.0, None)), crop(osem(1.0, FULL_DOSE_SEED_OFFSET + seed)),
                     osem(dose, seed), p.spacing)


def metrics(img: np.ndarray, ref: Reference) -> dict[str, float]:
    """PVR (nuclei mean / valley mean), WM CoV %, GM bias % and each lesion's CR.

    CR = (c − 1) / (c_ref − 1) with c = mean(lesion) / mean(its background ring) and c_ref
    the same in the noise-free reconstruction (what OSEM recovers without noise: the
    full-dose image's expectation).
    """
    from dipnode.models.metrics import lesion_contrast, peak_to_valley, roi_bias, wm_noise

    m = ref.masks
    out = {
        "pvr": peak_to_valley(img, (m["nucleus_left"], m["nucleus_right"]), m["valley"]),
        "wm_cov": wm_noise(img, m["wm"]).cov_percent,
        "gm_bias": roi_bias(img, ref.expected, m["gm"]),
    }
    for name in lesion_names():
        les, bg = m[f"lesion:{name}"], m[f"lesion_background:{name}"]
        out[f"cr:{name}"] = lesion_contrast(img, les, bg) / lesion_contrast(ref.expected, les, bg)
    return out


def matched_gaussian(ref: Reference, target_cov: float) -> tuple[float, np.ndarray]:
    """The smallest FWHM (voxels) whose WM CoV is at most ``target_cov``, else the quietest.

    The whole low-dose volume is filtered, then cropped (as the node would filter the PET
    it receives). WM CoV is not monotone in the FWHM (grey matter spills into the WM ROI at
    large FWHM), so a coarse scan finds the first crossing and a bisection refines it.
    """
    from dipnode.models.gaussian import gaussian_filter_fwhm
    from dipnode.models.metrics import wm_noise

    def cov(fwhm: float) -> float:
        return wm_noise(crop(gaussian_filter_fwhm(ref.osem_whole, fwhm)), ref.masks["wm"]).cov_percent

    grid = np.arange(0.0, 6.001, 0.25)
    covs = [cov(f) for f in grid]
    below = [i for i, c in enumerate(covs) if c <= target_cov]
    if not below:
        best = float(grid[int(np.argmin(covs))])
    elif below[0] == 0:
        best = 0.0
    else:
        lo, hi = float(grid[below[0] - 1]), float(grid[below[0]])
        for _ in range(8):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if cov(mid) > target_cov else (lo, mid)
        best = hi
    return best, crop(gaussian_filter_fwhm(ref.osem_whole, best))


def sure_alpha(x0: np.ndarray, f: np.ndarray, S: np.ndarray, guard: np.ndarray | None,
               obj: np.ndarray, alphas: np.ndarray = np.round(np.arange(0.0, 2.01, 0.1), 2)) -> float:
    """α from the data: the α minimising Stein's unbiased risk estimate of the blend.

    Treating f and S as fixed, x = x0 + (1 − w)(f − x0) has divergence Σ w, so
    SURE(α) = Σ (1 − w)² (f − x0)² + 2 Σ σ²_v w − Σ σ²_v over the object, with the noise
    variance σ²_v = s² · f_v from the Poisson-like model (s² the robust variance of
    (x0 − f)/sqrt(f)). The fixed-f assumption is optimistic for a DIP that has fitted part
    of the noise: a measured experiment, not a default.
    """
    from dipnode.models.guard import MAD_TO_SD
    from dipnode.models.stability import normalised_stability

    fo = np.maximum(f[obj].astype(np.float64), 1e-6)
    r = (x0[obj] - f[obj]).astype(np.float64)
    u = r / np.sqrt(fo)
    s2 = (MAD_TO_SD * np.median(np.abs(u - np.median(u)))) ** 2
    var = s2 * fo
    best, best_risk = 0.0, np.inf
    for a in alphas:
        w = normalised_stability(S, float(a))
        if guard is not None:
            w = np.maximum(w, guard)
        wo = w[obj].astype(np.float64)
        risk = float(np.sum((1 - wo) ** 2 * r * r) + 2 * np.sum(var * wo) - np.sum(var))
        if risk < best_risk:
            best, best_risk = float(a), risk
    return best


def method_images(fit: CachedFit, ref: Reference, alpha: float = 0.6) -> tuple[dict[str, np.ndarray], dict]:
    """Every method's image from one cached fit, and the guard's record."""
    from dipnode.models.guard import GuardParams, data_guard
    from dipnode.models.stability import blend_weight, normalised_stability

    from scipy import ndimage

    x0, last, mean, S = fit.x0, fit.output, fit.sample_mean, fit.stability
    s_norm = normalised_stability(S, alpha)
    g_mean = data_guard(x0, mean, ref.spacing, GuardParams(), keep_scores=True)
    g_last = data_guard(x0, last, ref.spacing, GuardParams())
    w_new = np.maximum(s_norm, g_mean.weight)
    imgs = {
        "OSEM": x0,
        "cDIP": last,
        "SDIP (paper)": blend_weight(x0, last, s_norm),
        "SDIP (new)": blend_weight(x0, mean, w_new),
        # ablations: each gain alone
        "paper + guard": blend_weight(x0, last, np.maximum(s_norm, g_last.weight)),
        "paper + averaging": blend_weight(x0, mean, s_norm),
        "cDIP averaged": mean,
    }
    obj = ref.masks["brain"]
    # Early stopping by windowed moving variance (ES-WMV, Wang et al. 2023): the window of W
    # consecutive snapshots whose mean voxel-wise variance (in the brain) is smallest; its
    # mean is the network's image. Needs snapshots at every epoch (the fast fits).
    eswmv_epoch = None
    snaps, epochs_s = fit.snapshots, fit.snapshot_epochs
    if len(epochs_s) > 1 and np.all(np.diff(epochs_s) == 1):
        win = 5
        wmv = [float(snaps[i - win:i][:, obj].var(axis=0).mean()) for i in range(win, len(epochs_s) + 1)]
        i_best = int(np.argmin(wmv)) + win
        eswmv_epoch = int(epochs_s[i_best - 1])
        f_es = snaps[i_best - win:i_best].mean(axis=0).astype(np.float32)
        g_es = data_guard(x0, f_es, ref.spacing, GuardParams())
        imgs["new, f = ES-WMV window"] = blend_weight(x0, f_es, np.maximum(s_norm, g_es.weight))
    # S normalised by its mean over the object (the guard's tested region, brain tissue)
    # instead of the whole volume: the paper's mean(S) counts the air in the field of view,
    # so the same α keeps more OSEM in a volume with more air around the head.
    act = ndimage.gaussian_filter(mean.astype(np.float64), 6.0 / 2.3548 / np.asarray(ref.spacing))
    in_obj = act > 0.15 * np.percentile(act, 99)
    s_obj = np.minimum(alpha * S / float(S[in_obj].mean()), 1.0).astype(np.float32)
    imgs["new, S_norm over the object"] = blend_weight(x0, mean, np.maximum(s_obj, g_mean.weight))
    a_sure = sure_alpha(x0, mean, S, g_mean.weight, obj)
    imgs["new, alpha by SURE"] = blend_weight(
        x0, mean, np.maximum(normalised_stability(S, a_sure), g_mean.weight))
    wm = ref.masks["wm"]
    # False alarms: white matter more than 10 mm from every lesion's edge (the guard's 15 mm
    # ball around a detected lesion reaches past the WM ROI's 4 mm gap: that is the lesion).
    far = wm & (ndimage.distance_transform_edt(~ref.masks["lesions"], sampling=ref.spacing) > 10.0)
    # The guard's trade-off: a fixed threshold below the FWE one keeps more (weak lesions and
    # noise alike). Per threshold: WM CoV of the new SDIP, WM share kept, each lesion's CR.
    sweep = {}
    for t_fixed in (3.0, 3.5, 4.0, 4.5, 5.0):
        g = data_guard(x0, mean, ref.spacing, GuardParams(threshold=t_fixed)).weight
        img = blend_weight(x0, mean, np.maximum(s_norm, g))
        met = metrics(img, ref)
        sweep[f"{t_fixed:g}"] = {"wm_cov": met["wm_cov"], "wm_kept": float(np.mean(g[far] > 0)),
                                 **{k: v for k, v in met.items() if k.startswith("cr:")}}
    info = {
        "guard_threshold": g_mean.threshold,
        "guard_wm_false_alarm": float(np.mean(g_mean.weight[far] > 0)),
        "guard_wm_kept": float(np.mean(g_mean.weight[wm] > 0)),
        "guard_brain_fraction": float(np.mean(g_mean.weight[ref.masks["brain"]] > 0)),
        "guard_max_abs_t": list(g_mean.max_abs_t),
        "s_norm_wm_mean": float(s_norm[wm].mean()),
        "weight_wm_mean": float(w_new[wm].mean()),
        "weight_gm_mean": float(w_new[ref.masks["gm"]].mean()),
        "s_norm_gm_mean": float(s_norm[ref.masks["gm"]].mean()),
        "alpha_sure": a_sure,
        "eswmv_epoch": eswmv_epoch,
        "fit_s": float(fit.timings.get("fit", float("nan"))),
        "threshold_sweep": sweep,
    }
    for name in lesion_names():
        les = ref.masks[f"lesion:{name}"]
        info[f"guard:{name}"] = float(g_mean.weight[les].mean())
        info[f"snorm:{name}"] = float(s_norm[les].mean())
        info[f"guard_maxT:{name}"] = max(float(np.abs(t[les]).max()) for t in g_mean.scores.values())
    return imgs, {"info": info, "weight": w_new, "guard": g_mean.weight}


def epoch_curve(path: Path, epochs: tuple[int, ...] = (3, 6, 9, 12, 15, 20, 30, 40, 60)) -> list[dict]:
    """Per epoch of one long fit: its loss and the network output's metrics (snapshots)."""
    fit = load_fit(path)
    dose, seed = float(fit.name.split("-")[1][1:]), int(fit.name.split("-")[2][1:])
    ref = reference(dose, seed)
    out = []
    for e, snap in zip(fit.snapshot_epochs, fit.snapshots):
        if int(e) in epochs:
            m = metrics(snap, ref)
            out.append({"epoch": int(e), "loss": float(fit.loss[int(e) - 1]), "wm_cov": m["wm_cov"],
                        "pvr": m["pvr"], "cr_wm_hot_12": m["cr:wm-hot-12mm"],
                        "cr_wm_cold_12": m["cr:wm-cold-12mm"]})
    return out


def render(summary: dict, null: list[dict], rows: list[dict], figure: str,
           curve: list[dict] | None = None) -> str:
    """The tables of FIDELITY.md (between the markers; the prose around them is kept)."""
    names = lesion_names()
    p = phantom()
    out: list[str] = []

    def group_order(key: str) -> tuple:
        net, dose, *rest = key.split()
        return (net != "fast", bool(rest), -float(dose[1:]) if dose != "d0.1" else -1e9)

    for key in sorted(summary, key=group_order):
        g = summary[key]
        meth = g["methods"]
        n = len(g["seeds"])
        net, dose, *rest = key.split()
        label = f"{NETWORK_LABELS.get(net, net)}, dose 1/{1 / float(dose[1:]):g}"
        if rest:
            label += f", input jitter {rest[0][1:]}"
        out += [f"### {label} — {n} seed{'s' if n > 1 else ''} ({', '.join(map(str, sorted(g['seeds'])))})", ""]
        order = [m for m in MAIN_METHODS + ("full-dose OSEM",) if m in meth]
        hot_names = [nm for nm in names if "-hot-" in nm]
        cold_names = [nm for nm in names if "-cold-" in nm]
        out += ["Summary" + (" (the README's table)" if key == "fast d0.1" else "") + ":", "",
                "| method | PVR (nuclei) | WM CoV | GM bias | CR hot / cold (mean of 6 each) | lesions ≥ 0.95 × OSEM's CR |",
                "|---|---:|---:|---:|---:|---:|"]
        for m in order:
            hot = np.mean([np.mean(meth[m][f"cr:{nm}"]) for nm in hot_names])
            cold = np.mean([np.mean(meth[m][f"cr:{nm}"]) for nm in cold_names])
            ok = sum(np.mean(meth[m][f"cr:{nm}"]) >= 0.95 * np.mean(meth["OSEM"][f"cr:{nm}"]) for nm in names)
            out.append(f"| {m} | {np.mean(meth[m]['pvr']):.2f} | {np.mean(meth[m]['wm_cov']):.1f} % | "
                       f"{np.mean(meth[m]['gm_bias']):.1f} % | {hot:.2f} / {cold:.2f} | {ok} of {len(names)} |")
        out.append("")
        out += ["| method | PVR (nuclei) | WM CoV % | GM bias % |", "|---|---:|---:|---:|"]
        for m in order:
            label = f"**{m}**" if m == "SDIP (new)" else m
            out.append(f"| {label} | {_fmt(meth[m]['pvr'])} | {_fmt(meth[m]['wm_cov'], 1)} | "
                       f"{_fmt(meth[m]['gm_bias'])} |")
        out += ["", "Contrast recovery against full dose, (c − 1)/(c_full − 1), mean ± sd over seeds; "
                "last column: the new SDIP's mean over the unfiltered OSEM's (target ≥ 0.95).", ""]
        cols = [m for m in MAIN_METHODS if m in meth]
        out += ["| lesion | " + " | ".join(cols) + " | full dose | new / OSEM |",
                "|---|" + "---:|" * (len(cols) + 2)]
        for name in names:
            k = f"cr:{name}"
            ratio = np.mean(meth["SDIP (new)"][k]) / np.mean(meth["OSEM"][k])
            mark = "" if ratio >= 0.95 else " ✗"
            shown = f"{ratio:.3f}" if abs(ratio - 0.95) < 0.01 else f"{ratio:.2f}"
            out.append(f"| {name} | " + " | ".join(_fmt(meth[m][k]) for m in cols)
                       + f" | {_fmt(meth['full-dose OSEM'][k])} | {shown}{mark} |")
        info = g["info"]
        out += ["", f"Guard: threshold |T| > {_fmt(info['guard_threshold'])}; false alarms (share of "
                f"white-matter voxels more than 10 mm from every lesion that it kept) "
                f"{100 * np.mean(info['guard_wm_false_alarm']):.3f} % (max {100 * np.max(info['guard_wm_false_alarm']):.3f} %); "
                f"share of the WM ROI kept (incl. next to detected lesions) {100 * np.mean(info['guard_wm_kept']):.2f} %; "
                f"share of brain voxels kept {100 * np.mean(info['guard_brain_fraction']):.2f} %; "
                f"mean S_norm in WM {np.mean(info['s_norm_wm_mean']):.3f} and in GM "
                f"{np.mean(info['s_norm_gm_mean']):.3f}; mean data weight w in WM "
                f"{np.mean(info['weight_wm_mean']):.3f} and in GM {np.mean(info['weight_gm_mean']):.3f} "
                f"(1 = the measured OSEM value); Gaussian FWHM {_fmt(info['gauss_fwhm_vox'])} voxels; "
                f"fit {np.mean(info['fit_s']):.0f} s per seed.", ""]
        det = [f"{nm} {np.mean(info['guard:' + nm]):.2f} (|T| {np.mean(info['guard_maxT:' + nm]):.1f})" for nm in names]
        out += ["Guard weight G in each lesion (mean over seeds; in parentheses the largest |T| in it): "
                + "; ".join(det) + ".", ""]
        if key == "fast d0.1":
            out += ["#### Each gain alone (same fits)", "",
                    "| variant | PVR | WM CoV % | GM bias % | CR hot (mean of 6) | CR cold (mean of 6) | worst lesion new/OSEM |",
                    "|---|---:|---:|---:|---:|---:|---:|"]
            for m in ABLATIONS:
                if m not in meth:
                    continue
                hot = [np.mean(meth[m][f"cr:{nm}"]) for nm in names if "hot" in nm]
                cold = [np.mean(meth[m][f"cr:{nm}"]) for nm in names if "cold" in nm]
                worst = min(np.mean(meth[m][f"cr:{nm}"]) / np.mean(meth["OSEM"][f"cr:{nm}"]) for nm in names)
                out.append(f"| {m} | {_fmt(meth[m]['pvr'])} | {_fmt(meth[m]['wm_cov'], 1)} | "
                           f"{_fmt(meth[m]['gm_bias'])} | {np.mean(hot):.2f} | {np.mean(cold):.2f} | {worst:.2f} |")
            out += ["", f"α chosen by SURE per seed: {', '.join(f'{a:g}' for a in info['alpha_sure'])}; "
                    f"ES-WMV window ending at epoch: {', '.join(str(e) for e in info.get('eswmv_epoch', []))}.", ""]
            sweeps = info["threshold_sweep"]
            small = [nm for nm in names if nm.endswith("-6mm") or nm.endswith("-8mm")]
            out += ["#### The guard's threshold: what a lower one would buy", "",
                    "A fixed |T| threshold instead of the FWE one (same fits); false alarms as above "
                    "(WM more than 10 mm from every lesion).", "",
                    "| threshold | WM CoV % | WM false alarms % | " + " | ".join(f"{nm} new/OSEM" for nm in small) + " |",
                    "|---|---:|---:|" + "---:|" * len(small)]
            for t_key in sweeps[0]:
                vals = [sw[t_key] for sw in sweeps]
                ratios = [np.mean([v[f"cr:{nm}"] for v in vals]) / np.mean(meth["OSEM"][f"cr:{nm}"]) for nm in small]
                out.append(f"| {t_key} | {np.mean([v['wm_cov'] for v in vals]):.1f} | "
                           f"{100 * np.mean([v['wm_kept'] for v in vals]):.2f} | "
                           + " | ".join(f"{r:.2f}" for r in ratios) + " |")
            fwe_ratios = [np.mean(meth["SDIP (new)"][f"cr:{nm}"]) / np.mean(meth["OSEM"][f"cr:{nm}"]) for nm in small]
            out += [f"| FWE 5 % ({np.mean(info['guard_threshold']):.2f}) | {np.mean(meth['SDIP (new)']['wm_cov']):.1f} | "
                    f"{100 * np.mean(info['guard_wm_false_alarm']):.2f} | " + " | ".join(f"{r:.2f}" for r in fwe_ratios) + " |", ""]
    if null:
        out += ["### The guard alone on lesion-free noise", "",
                "The lesion-free phantom, OSEM at each dose with fresh noise seeds, and the noise-free "
                "reconstruction as the network's image: every firing is a false alarm.", "",
                "| dose | realisations | threshold | volumes where it fired | WM voxels kept (mean) | largest |T| (median) |",
                "|---|---:|---:|---:|---:|---:|"]
        for dose in sorted({r["dose"] for r in null}, reverse=True):
            rs = [r for r in null if r["dose"] == dose]
            fired = sum(r["fired"] for r in rs)
            out.append(f"| 1/{1 / dose:g} | {len(rs)} | {np.mean([r['threshold'] for r in rs]):.2f} | "
                       f"{fired} ({100 * fired / len(rs):.0f} %) | {100 * np.mean([r['wm_fraction'] for r in rs]):.4f} % | "
                       f"{np.median([max(r['max_abs_t']) for r in rs]):.2f} |")
        out.append("")
    if curve:
        out += ["### The paper's network fits the noise early: one 60-epoch fit, epoch by epoch", "",
                "papernet60 (seed 0, 1/10 dose; 10 inner iterations per epoch): the network output "
                "f(θ_n|g) itself (no blend).", "",
                "| epoch | loss | WM CoV % | PVR | CR wm-hot-12mm | CR wm-cold-12mm |",
                "|---:|---:|---:|---:|---:|---:|"]
        for c in curve:
            out.append(f"| {c['epoch']} | {c['loss']:.4f} | {c['wm_cov']:.1f} | {c['pvr']:.2f} | "
                       f"{c['cr_wm_hot_12']:.2f} | {c['cr_wm_cold_12']:.2f} |")
        out.append("")
    out += [f"![lesion profiles]({figure})", ""]
    return "\n".join(out)


def profile_figure(per_seed: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = lesion_names()
    styles = {"full dose, noise-free": ("k", "--"), "OSEM": ("0.6", "-"),
              "OSEM + Gaussian (equal WM noise)": ("tab:green", "-"), "cDIP": ("tab:purple", ":"),
              "SDIP (paper)": ("tab:orange", "-"), "SDIP (new)": ("tab:blue", "-")}
    fig, axes = plt.subplots(3, 4, figsize=(15, 9.5), sharex=True)
    for ax, name in zip(axes.ravel(), names):
        for method, (color, ls) in styles.items():
            curves = [np.asarray(p[name][method]) for p in per_seed if method in p[name]]
            if not curves:
                continue
            n = min(len(c) for c in curves)
            y = np.mean([c[:n] for c in curves], axis=0)
            x = (np.arange(n) - n // 2) * VOXEL_MM
            ax.plot(x, y, color=color, ls=ls, lw=2.2 if method == "SDIP (new)" else 1.3,
                    label=method)
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("mm from the lesion centre (columns)")
    for ax in axes[:, 0]:
        ax.set_ylabel("Bq/ml")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"Lesion profiles through each lesion's centre: {title}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


MAIN_METHODS = ("OSEM", "OSEM + Gaussian (equal WM noise)", "cDIP", "SDIP (paper)", "SDIP (new)")
ABLATIONS = ("SDIP (paper)", "paper + averaging", "paper + guard", "SDIP (new)",
             "new, alpha by SURE", "new, S_norm over the object", "new, f = ES-WMV window",
             "cDIP", "cDIP averaged")


def evaluate_fit(path: Path) -> dict:
    """All metrics for one cached fit (plus its full-dose reference and matched Gaussian)."""
    fit = load_fit(path)
    network, dose_s, seed_s = fit.name.split("-")[:3]
    dose, seed = float(dose_s[1:]), int(seed_s[1:])
    ref = reference(dose, seed)
    if not np.array_equal(fit.x0, crop(osem(dose, seed))):
        raise RuntimeError(f"{path.name}: cached OSEM differs from today's simulation; refit (--force)")
    imgs, extra = method_images(fit, ref, alpha=float(fit.params.get("alpha", 0.6)))
    target = metrics(imgs["SDIP (new)"], ref)["wm_cov"]
    fwhm, gauss = matched_gaussian(ref, target)
    imgs["OSEM + Gaussian (equal WM noise)"] = gauss
    row = {name: metrics(img, ref) for name, img in imgs.items()}
    row["full-dose OSEM"] = metrics(ref.full_dose, ref)
    return {"fit": fit.name, "network": network, "dose": dose, "seed": seed,
            "jitter": float(fit.params.get("input_jitter", 0.0)), "gauss_fwhm_vox": fwhm,
            "metrics": row, **extra["info"]}


def profiles(path: Path, half: int = 10) -> dict[str, dict[str, list[float]]]:
    """Per lesion: the profile through its centre along the columns (i), for each main method.

    Each point is the mean of the 3x3 voxels around the line (slices k±1, rows j±1): a tube
    of 6 mm, narrower than the smallest lesion, that tames single-voxel noise.
    """
    fit = load_fit(path)
    dose, seed = float(fit.name.split("-")[1][1:]), int(fit.name.split("-")[2][1:])
    ref = reference(dose, seed)
    imgs, _ = method_images(fit, ref)
    imgs["full dose, noise-free"] = ref.expected
    p = phantom()
    off = np.array([sl.start for sl in p.region])
    out: dict[str, dict[str, list[float]]] = {}
    for les, c in p.lesions:
        k, j, i = (np.round(np.asarray(c)).astype(int) - off)
        lo, hi = max(i - half, 0), i + half + 1
        out[les.name] = {name: img[k - 1:k + 2, j - 1:j + 2, lo:hi].mean(axis=(0, 1)).astype(float).tolist()
                         for name, img in imgs.items() if name in MAIN_METHODS + ("full dose, noise-free",)}
    return out


def cmd_null(args: argparse.Namespace) -> int:
    """The guard alone on lesion-free noise: how often does it fire, and where?"""
    from dipnode.models.guard import GuardParams, data_guard

    p = phantom()
    wm = p.masks["wm"][p.region]
    brain = p.masks["brain"][p.region]
    out = []
    for dose in args.doses:
        clean = crop(osem(dose, None, lesions=False))
        for r in range(args.realisations):
            x0 = crop(osem(dose, 5000 + r, lesions=False))
            g = data_guard(x0, clean, p.spacing, GuardParams())
            out.append({"dose": dose, "realisation": r, "threshold": g.threshold,
                        "fired": bool(g.weight.max() > 0),
                        "wm_fraction": float(np.mean(g.weight[wm] > 0)),
                        "brain_fraction": float(np.mean(g.weight[brain] > 0)),
                        "max_abs_t": list(g.max_abs_t), "resels": list(g.resels)})
            log.info("null dose %g #%d: t %.2f max|T| %s fired %s", dose, r, g.threshold,
                     [round(v, 2) for v in g.max_abs_t], out[-1]["fired"])
        osem.cache_clear()
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "null.json").write_text(json.dumps(out, indent=1))
    return 0


def _agg(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def _fmt(values: list[float], digits: int = 2) -> str:
    m, s = _agg(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}" if len(values) > 1 else f"{m:.{digits}f}"


def cmd_table(args: argparse.Namespace) -> int:
    fits = sorted((args.results / "fits").glob("*.npz"))
    if not fits:
        raise SystemExit(f"no fits under {args.results / 'fits'}; run the fit stage first")
    cache = args.results / "evaluated"
    cache.mkdir(parents=True, exist_ok=True)
    rows = []
    for path in fits:
        done = cache / f"{path.stem}.json"
        if done.exists() and done.stat().st_mtime >= path.stat().st_mtime and not args.force:
            rows.append(json.loads(done.read_text()))
            continue
        log.info("evaluating %s", path.stem)
        row = evaluate_fit(path)
        done.write_text(json.dumps(row))
        rows.append(row)
    null = json.loads((args.results / "null.json").read_text()) if (args.results / "null.json").exists() else []
    curve = []
    long_fit = args.results / "fits" / "papernet60-d0.1-s0.npz"
    if long_fit.exists():
        curve = epoch_curve(long_fit)
    summary = summarise(rows)
    (args.results / "summary.json").write_text(json.dumps({"summary": summary, "null": null,
                                                           "epoch_curve": curve,
                                                           "per_fit": rows}, indent=1))
    figure = args.out.parent / "fidelity-profiles.png"
    prof_fits = [p for p in fits if p.stem.startswith("fast-d0.1-s") and "-j" not in p.stem]
    if prof_fits:
        profile_figure([profiles(p) for p in prof_fits], figure,
                       title=f"fast preset, 1/10 dose, mean of {len(prof_fits)} seeds")
    tables = render(summary, null, rows, figure.name, curve)
    begin, end = "<!-- tables:begin (bench/fidelity.py table) -->", "<!-- tables:end -->"
    text = args.out.read_text() if args.out.exists() else f"# Fidelity benchmark\n\n{begin}\n{end}\n"
    if begin not in text or end not in text:
        text += f"\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    args.out.write_text(f"{head}{begin}\n{tables}\n{end}{tail}")
    log.info("wrote %s, %s, %s", args.out, figure, args.results / "summary.json")
    return 0


def summarise(rows: list[dict]) -> dict:
    """{group: {method: {metric: [per-seed values]}}}; group = network, dose, jitter."""
    groups: dict[str, dict] = {}
    for row in rows:
        key = f"{row['network']} d{row['dose']:g}" + (f" j{row['jitter']:g}" if row["jitter"] else "")
        g = groups.setdefault(key, {"seeds": [], "methods": {}, "info": {}})
        g["seeds"].append(row["seed"])
        for method, mets in row["metrics"].items():
            for k, v in mets.items():
                g["methods"].setdefault(method, {}).setdefault(k, []).append(v)
        for k, v in row.items():
            if k.startswith(("guard", "snorm", "alpha", "weight", "s_norm", "fit_s", "gauss", "eswmv",
                             "threshold_sweep")) \
                    and k != "guard_max_abs_t":
                g["info"].setdefault(k, []).append(v)
    return groups


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stage", choices=["fit", "null", "table"])
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    p.add_argument("--network", choices=list(NETWORKS), default="fast")
    p.add_argument("--doses", type=float, nargs="+", default=list(DOSES))
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    p.add_argument("--jitter", type=float, default=0.0, help="input jitter std (fit stage)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--force", action="store_true", help="refit even if cached")
    p.add_argument("--realisations", type=int, default=20, help="null stage: noise draws per dose")
    p.add_argument("--out", type=Path, default=HERE / "FIDELITY.md")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    handler = {"fit": cmd_fit, "null": cmd_null, "table": cmd_table}[args.stage]
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
