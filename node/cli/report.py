"""The demo's report: the image figure, the paper's noise/PVR trade-off curves, a metrics table.

Arrays in, files out; the numbers come from models/metrics.py on the phantom's ROIs.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no screen: render to files only
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

from dipnode.models.gaussian import gaussian_filter_fwhm  # noqa: E402
from dipnode.models.metrics import metrics_table, peak_to_valley, wm_noise  # noqa: E402
from dipnode.models.stability import blend  # noqa: E402


@dataclass(frozen=True)
class Curve:
    """One method's trade-off: white-matter noise (CoV %) and PVR, per parameter value."""

    method: str
    parameter: str
    values: tuple[float, ...]
    wm_cov_percent: tuple[float, ...]
    pvr: tuple[float, ...]


@dataclass(frozen=True)
class ReportInputs:
    mr: np.ndarray = field(repr=False)           # on the PET grid
    osem: np.ndarray = field(repr=False)         # low dose, as sent
    full_dose: np.ndarray = field(repr=False)    # reference for bias
    dip: np.ndarray = field(repr=False)          # plain conditional DIP
    stability: np.ndarray = field(repr=False)    # S
    sdip: np.ndarray = field(repr=False)         # as the node delivered it (read back from DICOM)
    snapshots: Mapping[int, np.ndarray] = field(repr=False)  # DIP output per epoch
    masks: Mapping[str, np.ndarray] = field(repr=False)
    alpha: float = 0.6
    # w in [0, 1]: the share of the measured OSEM value in each voxel of the delivered image
    data_weight: np.ndarray | None = field(repr=False, default=None)


def _pvr_noise(img: np.ndarray, masks: Mapping[str, np.ndarray]) -> tuple[float, float]:
    nuclei = (masks["nucleus_left"], masks["nucleus_right"])
    return wm_noise(img, masks["wm"]).cov_percent, peak_to_valley(img, nuclei, masks["valley"])


def curves(r: ReportInputs) -> list[Curve]:
    """The paper's Figure 4 trade-offs: Gaussian FWHM 0-4 voxels, DIP epochs, alpha 0-1."""
    out = []
    fwhms = tuple(np.round(np.arange(0.0, 4.01, 0.5), 2))
    pts = [_pvr_noise(gaussian_filter_fwhm(r.osem, f), r.masks) for f in fwhms]
    out.append(Curve("OSEM + Gaussian", "FWHM (voxels)", fwhms, *map(tuple, zip(*pts))))
    epochs = tuple(sorted(r.snapshots))
    pts = [_pvr_noise(r.snapshots[e], r.masks) for e in epochs]
    out.append(Curve("conditional DIP", "epoch", tuple(map(float, epochs)), *map(tuple, zip(*pts))))
    alphas = tuple(np.round(np.arange(0.0, 1.01, 0.1), 2))
    pts = [_pvr_noise(blend(r.osem, r.dip, r.stability, a)[0], r.masks) for a in alphas]
    out.append(Curve("SDIP", "alpha", alphas, *map(tuple, zip(*pts))))
    return out


def matched_gaussian_fwhm(osem: np.ndarray, target_cov: float, masks: Mapping[str, np.ndarray]) -> float:
    """The smallest Gaussian FWHM (voxels, 0-6, step 0.05) whose white-matter noise is at most
    `target_cov`; the quietest FWHM when none is that quiet.

    White-matter CoV is not monotone in the FWHM: past ~2 voxels at 4 mm grey matter spills
    into the white-matter ROI and the CoV rises again, so a bisection can mis-bracket.
    """
    fwhms = np.round(np.arange(0.0, 6.001, 0.05), 3)
    covs = [wm_noise(gaussian_filter_fwhm(osem, f), masks["wm"]).cov_percent for f in fwhms]
    for f, cov in zip(fwhms, covs):
        if cov <= target_cov:
            return float(f)
    return float(fwhms[int(np.argmin(covs))])


def images(r: ReportInputs) -> dict[str, np.ndarray]:
    """The columns of the figure and the rows of the table, in reading order."""
    sdip_cov = wm_noise(r.sdip, r.masks["wm"]).cov_percent
    fwhm = matched_gaussian_fwhm(r.osem, sdip_cov, r.masks)
    return {
        "OSEM (1/10 dose)": r.osem,
        f"OSEM + Gaussian {fwhm:.2f} vox (noise of SDIP)": gaussian_filter_fwhm(r.osem, fwhm),
        "conditional DIP": r.dip,
        f"SDIP (alpha {r.alpha:g}, from the node)": r.sdip,
        "OSEM full dose (reference)": r.full_dose,
    }


def table(r: ReportInputs) -> dict[str, dict[str, float]]:
    return {name: metrics_table(img, r.full_dose, r.masks) for name, img in images(r).items()}


def _centre_slice(mask: np.ndarray) -> int:
    return int(round(ndimage.center_of_mass(mask)[0]))


def image_figure(r: ReportInputs, path: Path) -> Path:
    """MR, OSEM, Gaussian, cDIP, SDIP, stability map on the slices through nuclei and lesion."""
    imgs = images(r)
    cols = [("MR (registered)", r.mr, "gray")]
    cols += [(name, img, "hot") for name, img in imgs.items() if "full dose" not in name]
    cols += [("stability map S (Bq/ml)", r.stability, "viridis")]
    if r.data_weight is not None:
        cols += [("data weight w (1 = OSEM kept)", r.data_weight, "gray")]
    rows = [("nuclei", _centre_slice(r.masks["nuclei"]), r.masks["nuclei"]),
            ("lesion", _centre_slice(r.masks["lesion"]), r.masks["lesion"])]
    vmax = float(np.percentile(r.full_dose[r.masks["brain"]], 99.5))
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(3.0 * len(cols), 3.3 * len(rows)))
    for i, (row_name, k, roi) in enumerate(rows):
        for j, (name, img, cmap) in enumerate(cols):
            ax = axes[i, j]
            sl = img[k]  # rows j run anterior -> posterior, columns i to the patient's left
            # (radiological view: the patient's left on the viewer's right)
            kw = ({"vmin": 0, "vmax": vmax} if cmap == "hot"
                  else {"vmin": 0, "vmax": 1} if cmap == "gray" and img is r.data_weight else {})
            ax.imshow(sl, cmap=cmap, **kw)
            ax.contour(roi[k], levels=[0.5], colors="cyan", linewidths=0.6)
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=8)
            if j == 0:
                ax.set_ylabel(f"slice {k} ({row_name})", fontsize=8)
    fig.suptitle("dipnode demo: brain FDG phantom at 1/10 dose (cyan: nuclei / lesion ROI)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def curves_figure(cs: list[Curve], r: ReportInputs, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for c, marker in zip(cs, "o^s"):
        ax.plot(c.wm_cov_percent, c.pvr, marker=marker, ms=4, label=f"{c.method} ({c.parameter})")
        for x, y, v in list(zip(c.wm_cov_percent, c.pvr, c.values))[:: max(1, len(c.values) // 4)]:
            ax.annotate(f"{v:g}", (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ref_cov, ref_pvr = _pvr_noise(r.full_dose, r.masks)
    ax.plot([ref_cov], [ref_pvr], "k*", ms=10, label="full-dose OSEM")
    ax.set_xlabel("white-matter noise (CoV, %)")
    ax.set_ylabel("peak-to-valley ratio (nuclei)")
    ax.set_title("Noise vs peak-to-valley trade-off (cf. the paper's Figure 4)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
    out_dir.mkdir(parents=True, exist_ok=True)
    cs = curves(r)
    t = table(r)
    paths = {
        "figure": image_figure(r, out_dir / "images.png"),
        "curves": curves_figure(cs, r, out_dir / "tradeoff.png"),
        "metrics_json": out_dir / "metrics.json",
        "metrics_md": out_dir / "metrics.md",
    }
    paths["metrics_json"].write_text(json.dumps(
        {"metrics": t, "curves": [c.__dict__ for c in cs], "run": dict(notes)}, indent=2, default=str))
    md = ["# dipnode demo report", "",
          "Bias is against the full-dose OSEM image; PVR is the nuclei's mean over the valley's.",
          "The Gaussian row uses the FWHM that gives SDIP's white-matter noise.", "",
          markdown_table(t), "", "## Run", ""]
    md += [f"- {k}: {v}" for k, v in notes.items()]
    md += ["", "![images](images.png)", "", "![trade-off](tradeoff.png)", ""]
    paths["metrics_md"].write_text("\n".join(md))
    return paths
