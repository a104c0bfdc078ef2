"""The demo's report: every number of its figures and table, computed once from the arrays.

Arrays in, numbers out (``analyse``), then files (``write_report``: the two figures of
node/cli/figures.py, metrics.md and metrics.json). The figures and the table read one
``Analysis``, so a point on the trade-off plot is the same number as its row in the table.
Metrics are models/metrics.py's, on the phantom's ROIs, except white-matter noise, which is
measured in a white-matter ROI kept clear of other tissue (``noise_mask``).
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from dipnode.models.gaussian import gaussian_filter_fwhm
from dipnode.models.metrics import away_from, lesion_contrast, metrics_table, peak_to_valley, wm_noise
from dipnode.models.stability import blend_weight, normalised_stability

# White-matter noise ROI: the phantom's white-matter ROI, less every voxel within
# NOISE_MARGIN_MM of a voxel whose true activity is more than NOISE_TISSUE_TOLERANCE away from
# white matter's (grey matter, CSF, nuclei, the lesion, outside the brain). Smoothing then mixes
# little else into it: with the ROI alone (no margin) the 4 mm phantom's white-matter CoV rose
# from ~10 % to ~11 % between Gaussian FWHM 1.5 and 3 voxels, and the noise-free image's CoV
# in it reached 10 % at FWHM 3: partial volume, not noise.
NOISE_MARGIN_MM = 6.0
NOISE_TISSUE_TOLERANCE = 0.10
# The trade-off curves' parameters (the paper's Figure 4: Gaussian FWHM, DIP epochs, alpha).
GAUSSIAN_FWHMS = tuple(float(v) for v in np.round(np.arange(0.0, 3.001, 0.25), 2))
PAPER_SDIP = "SDIP without the guard (the paper's)"
ALPHAS = tuple(float(v) for v in np.round(np.arange(0.0, 1.001, 0.1), 2))


@dataclass(frozen=True)
class ReportInputs:
    """What the demo hands the report: volumes (k, j, i) on the PET grid, Bq/ml unless said."""

    mr: np.ndarray = field(repr=False)           # on the PET grid (arbitrary units)
    osem: np.ndarray = field(repr=False)         # low dose, as sent
    full_dose: np.ndarray = field(repr=False)    # reference for bias and the display window
    dip: np.ndarray = field(repr=False)          # plain conditional DIP (the last epoch's output)
    stability: np.ndarray = field(repr=False)    # S
    sdip: np.ndarray = field(repr=False)         # as the node delivered it (read back from DICOM)
    snapshots: Mapping[int, np.ndarray] = field(repr=False)  # DIP output per epoch (all of them)
    masks: Mapping[str, np.ndarray] = field(repr=False)
    truth: np.ndarray = field(repr=False)        # the phantom's true activity
    affine: np.ndarray = field(repr=False)       # 4x4 voxel (i, j, k) -> patient LPS mm
    alpha: float = 0.6
    # w in [0, 1]: the share of the measured OSEM value in each voxel of the delivered image
    data_weight: np.ndarray | None = field(repr=False, default=None)
    network: np.ndarray | None = field(repr=False, default=None)  # the image the blend used
    guard: np.ndarray | None = field(repr=False, default=None)    # G in [0, 1] (SDIP's guard)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm, array order (k, j, i)."""
        cols = np.linalg.norm(np.asarray(self.affine)[:3, :3], axis=0)  # |d/di|, |d/dj|, |d/dk|
        return (float(cols[2]), float(cols[1]), float(cols[0]))


@dataclass(frozen=True)
class Curve:
    """One method's trade-off: white-matter noise (CoV %), nuclei PVR and lesion contrast,
    one point per parameter value."""

    method: str
    parameter: str
    values: tuple[float, ...]
    wm_cov_percent: tuple[float, ...]
    pvr: tuple[float, ...]
    lesion_contrast: tuple[float, ...]
    role: str = ""  # the figure's colour: "gaussian", "cdip", "sdip" or "sdip-paper"


@dataclass(frozen=True)
class Analysis:
    """Everything the figures and the table show.

    images: name -> volume, in the figure's order (full dose, OSEM, Gaussian, cDIP, SDIP).
    keys: role ("full", "osem", "gaussian", "cdip", "sdip") -> the name in ``images``.
    table: name -> models.metrics.metrics_table (its "wm" entries on ``noise_mask``).
    """

    noise_mask: np.ndarray = field(repr=False)
    noise_floor: dict[float, float]  # Gaussian FWHM (voxels) -> CoV % of the noise-free phantom
    gaussian_fwhm: float
    images: dict[str, np.ndarray] = field(repr=False)
    keys: dict[str, str]
    table: dict[str, dict[str, float]]
    curves: list[Curve]
    noise_mask_text: str = ""  # how the noise ROI was made, its size and its noise-free CoV


def noise_mask(r: ReportInputs) -> np.ndarray:
    """The white-matter ROI for noise (see NOISE_MARGIN_MM); may be empty on a tiny grid."""
    wm = np.asarray(r.masks["wm"], bool)
    level = float(np.median(r.truth[wm]))  # white matter's true activity
    other = ~np.asarray(r.masks["brain"], bool) | (
        np.abs(r.truth - level) > NOISE_TISSUE_TOLERANCE * level)
    return away_from(wm, other, r.spacing, NOISE_MARGIN_MM)


def sdip_at(r: ReportInputs, alpha: float, *, guard: bool = True) -> np.ndarray:
    """The node's blend at another alpha: ``w = max(S_norm(alpha), G)`` with the guard (the
    paper's ``w = S_norm(alpha)`` without it, or with ``guard=False``), of the OSEM and the
    network's image."""
    w = normalised_stability(r.stability, alpha)
    if guard and r.guard is not None:
        w = np.maximum(w, r.guard)
    return blend_weight(r.osem, r.network if r.network is not None else r.dip, w)


def _point(img: np.ndarray, masks: Mapping[str, np.ndarray]) -> tuple[float, float, float]:
    return (wm_noise(img, masks["wm"]).cov_percent,
            peak_to_valley(img, (masks["nucleus_left"], masks["nucleus_right"]), masks["valley"]),
            lesion_contrast(img, masks["lesion"], masks["lesion_background"]))


def _curve(method: str, parameter: str, values, imgs, masks, role: str) -> Curve:
    pts = [_point(img, masks) for img in imgs]
    cov, pvr, les = (tuple(float(p[i]) for p in pts) for i in range(3))
    return Curve(method, parameter, tuple(float(v) for v in values), cov, pvr, les, role)


def matched_gaussian_fwhm(osem: np.ndarray, target_cov: float, wm: np.ndarray) -> float:
    """The smallest Gaussian FWHM (voxels, 0-6, step 0.05) whose white-matter noise is at most
    `target_cov`; the quietest FWHM when none is that quiet (CoV need not fall for ever: past
    some FWHM other tissue reaches even an eroded ROI)."""
    fwhms = np.round(np.arange(0.0, 6.001, 0.05), 3)
    covs = [wm_noise(gaussian_filter_fwhm(osem, f), wm).cov_percent for f in fwhms]
    for f, cov in zip(fwhms, covs):
        if cov <= target_cov:
            return float(f)
    return float(fwhms[int(np.argmin(covs))])


def analyse(r: ReportInputs) -> Analysis:
    nm = noise_mask(r)
    if not nm.any():
        raise ValueError(f"noise mask: no white-matter voxel is {NOISE_MARGIN_MM:g} mm from other "
                         f"tissue on this grid (voxels {r.spacing} mm)")
    masks = {**r.masks, "wm": nm}
    fwhm = matched_gaussian_fwhm(r.osem, wm_noise(r.sdip, nm).cov_percent, nm)
    dose = "1/10 dose"
    keys = {"full": "OSEM full dose (reference)", "osem": f"OSEM ({dose})",
            "gaussian": f"OSEM + Gaussian {fwhm:.2f} vx (SDIP's noise)",
            "cdip": "conditional DIP", "sdip": f"SDIP (\u03b1 {r.alpha:g}, as delivered)"}
    imgs = {keys["full"]: r.full_dose, keys["osem"]: r.osem,
            keys["gaussian"]: gaussian_filter_fwhm(r.osem, fwhm), keys["cdip"]: r.dip,
            keys["sdip"]: r.sdip}
    table = {name: metrics_table(img, r.full_dose, masks) for name, img in imgs.items()}
    epochs = sorted(r.snapshots)
    curves = [
        _curve("OSEM + Gaussian", "FWHM (voxels)", GAUSSIAN_FWHMS,
               [gaussian_filter_fwhm(r.osem, f) for f in GAUSSIAN_FWHMS], masks, "gaussian"),
        _curve("conditional DIP", "epoch", epochs, [r.snapshots[e] for e in epochs], masks, "cdip"),
        _curve("SDIP" if r.guard is None else "SDIP with the guard", "alpha", ALPHAS,
               [sdip_at(r, a) for a in ALPHAS], masks, "sdip"),
    ]
    if r.guard is not None:  # what the guard adds: the paper's blend of the same fit
        curves.append(_curve(PAPER_SDIP, "alpha", ALPHAS,
                             [sdip_at(r, a, guard=False) for a in ALPHAS], masks, "sdip-paper"))
    floor = {f: wm_noise(gaussian_filter_fwhm(r.truth, f), nm).cov_percent
             for f in (0.0, GAUSSIAN_FWHMS[-1])}
    n_slices = int(np.unique(np.nonzero(nm)[0]).size)
    hi = GAUSSIAN_FWHMS[-1]
    text = (f"{int(nm.sum())} voxels on {n_slices} slices: the white-matter ROI "
            f"({int(np.sum(r.masks['wm']))} voxels) at least {NOISE_MARGIN_MM:g} mm from any voxel "
            f"whose true activity is over {100 * NOISE_TISSUE_TOLERANCE:g} % from white matter's; "
            f"the noise-free phantom's CoV there is {floor[0.0]:.1f} % "
            f"({floor[hi]:.1f} % after a {hi:g}-voxel Gaussian)")
    return Analysis(noise_mask=nm, noise_floor=floor, gaussian_fwhm=fwhm, images=imgs, keys=keys,
                    table=table, curves=curves, noise_mask_text=text)


def markdown_table(t: dict[str, dict[str, float]]) -> str:
    keys = ["pvr_mean", "wm_cov_percent", "lesion_contrast", "bias_brain_percent",
            "bias_nuclei_percent", "bias_lesion_percent"]
    heads = ["PVR (nuclei)", "WM noise CoV %", "lesion contrast", "bias brain %",
             "bias nuclei %", "bias lesion %"]
    lines = ["| image | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(heads)]
    for name, row in t.items():
        lines.append(f"| {name} | " + " | ".join(f"{row.get(k, float('nan')):.3f}" for k in keys) + " |")
    return "\n".join(lines)


def write_report(r: ReportInputs, out_dir: Path, notes: Mapping[str, object]) -> dict[str, Path]:
    from dipnode.node.cli.figures import image_figure, tradeoff_figure  # matplotlib: only here

    out_dir.mkdir(parents=True, exist_ok=True)
    a = analyse(r)
    paths = {
        "figure": image_figure(r, a, out_dir / "images.png"),
        "curves": tradeoff_figure(r, a, out_dir / "tradeoff.png"),
        "metrics_json": out_dir / "metrics.json",
        "metrics_md": out_dir / "metrics.md",
    }
    mask_text = a.noise_mask_text
    paths["metrics_json"].write_text(json.dumps(
        {"metrics": a.table, "curves": [asdict(c) for c in a.curves],
         "gaussian_fwhm_voxels": a.gaussian_fwhm,
         "wm_noise_mask": {"voxels": int(a.noise_mask.sum()), "margin_mm": NOISE_MARGIN_MM,
                           "tissue_tolerance": NOISE_TISSUE_TOLERANCE,
                           "noise_free_cov_percent": {str(k): v for k, v in a.noise_floor.items()},
                           "text": mask_text},
         "run": dict(notes)}, indent=2, default=str))
    md = ["# dipnode demo report", "",
          "Bias is against the full-dose OSEM image; PVR is the nuclei's mean over the valley's.",
          "The Gaussian row uses the FWHM that gives SDIP's white-matter noise.",
          f"White-matter noise is measured in {mask_text}.", "",
          markdown_table(a.table), "", "## Run", ""]
    md += [f"- {k}: {v}" for k, v in notes.items()]
    md += ["", "![images](images.png)", "", "![trade-off](tradeoff.png)", ""]
    paths["metrics_md"].write_text("\n".join(md))
    return paths
