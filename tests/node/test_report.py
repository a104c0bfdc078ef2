"""The demo report's numbers and figures, on the 4 mm phantom with made-up method outputs.

No fit here (tests/node/test_demo.py runs the whole demo): the OSEM is the true activity plus
white noise, the "DIP" its smoothed copy, so that every number has a known direction.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from dipnode.models.gaussian import gaussian_filter_fwhm
from dipnode.models.metrics import wm_noise
from dipnode.models.stability import normalised_stability
from dipnode.node.cli import figures
from dipnode.node.cli.report import (
    ALPHAS,
    GAUSSIAN_FWHMS,
    NOISE_MARGIN_MM,
    ReportInputs,
    analyse,
    noise_mask,
    sdip_at,
    write_report,
)
from dipnode.sim.phantom import make_phantom, phantom_affine

EPOCHS = 6


@pytest.fixture(scope="module")
def inputs() -> ReportInputs:
    p = make_phantom(4.0)
    rng = np.random.default_rng(0)
    truth = p.activity.astype(np.float32)
    noise = rng.normal(0.0, 1.0, truth.shape).astype(np.float32)
    osem = truth + 0.25 * truth.mean() * noise
    full = truth + 0.08 * truth.mean() * rng.normal(0.0, 1.0, truth.shape).astype(np.float32)
    dip = gaussian_filter_fwhm(truth, 1.5) + 0.02 * truth.mean() * noise
    snapshots = {e: (dip + (EPOCHS - e) * 0.05 * truth.mean() * noise).astype(np.float32)
                 for e in range(1, EPOCHS + 1)}
    stability = np.abs(osem - dip).astype(np.float32)
    guard = np.zeros_like(truth)
    guard[p.masks["lesion"]] = 1.0
    r = ReportInputs(mr=p.mr, osem=osem, full_dose=full, dip=dip, stability=stability,
                     sdip=np.zeros_like(truth), snapshots=snapshots, masks=p.masks, truth=truth,
                     affine=phantom_affine(p), alpha=0.6, network=dip, guard=guard)
    sdip = sdip_at(r, 0.6)
    weight = np.maximum(normalised_stability(stability, 0.6), guard)
    from dataclasses import replace
    return replace(r, sdip=sdip, data_weight=weight)


def test_noise_mask_is_white_matter_clear_of_other_tissue(inputs: ReportInputs) -> None:
    mask = noise_mask(inputs)
    wm = inputs.masks["wm"]
    assert 20 < mask.sum() < wm.sum()
    assert not np.any(mask & ~wm)
    # Every voxel at least the margin (mm) from grey matter and from outside the brain.
    for other in (inputs.masks["gm"], ~inputs.masks["brain"], inputs.masks["lesions"],
                  inputs.masks["nuclei"]):
        dist = ndimage.distance_transform_edt(~other, sampling=inputs.spacing)
        assert dist[mask].min() >= NOISE_MARGIN_MM
    # What the margin is for: smoothing the noise-free phantom mixes little else into it
    # (partial volume that the plain ROI reads as noise) ...
    hi = GAUSSIAN_FWHMS[-1]
    smooth_truth = gaussian_filter_fwhm(inputs.truth, hi)
    assert wm_noise(smooth_truth, mask).cov_percent < 0.5 * wm_noise(smooth_truth, wm).cov_percent
    # ... so a wider Gaussian hardly reads as noisier over the plotted range (white noise
    # here, gone by FWHM ~2.5 voxels: what is left is the phantom's structure), where the plain
    # ROI, the old plot's, read several points of CoV of grey matter as noise.
    def rise(roi: np.ndarray) -> float:
        covs = [wm_noise(gaussian_filter_fwhm(inputs.osem, f), roi).cov_percent for f in GAUSSIAN_FWHMS]
        return max(covs[int(np.argmin(covs)):]) - min(covs)

    assert rise(mask) < 0.5 < 2.0 < rise(wm)


def test_the_curves_hold_every_epoch_and_pass_through_the_table_rows(inputs: ReportInputs) -> None:
    a = analyse(inputs)
    by = {c.method: c for c in a.curves}
    dip = by["conditional DIP"]
    assert dip.values == tuple(float(e) for e in range(1, EPOCHS + 1))  # one point per epoch
    gauss = by["OSEM + Gaussian"]
    sdip = by["SDIP with the guard"]
    assert gauss.values == GAUSSIAN_FWHMS and sdip.values == ALPHAS
    rows = a.table
    k = a.keys
    # The operating points (the table's rows) lie on their curves: the same arrays, one number.
    assert dip.wm_cov_percent[-1] == pytest.approx(rows[k["cdip"]]["wm_cov_percent"], rel=1e-6)
    assert dip.pvr[-1] == pytest.approx(rows[k["cdip"]]["pvr_mean"], rel=1e-6)
    assert gauss.wm_cov_percent[0] == pytest.approx(rows[k["osem"]]["wm_cov_percent"], rel=1e-6)
    i = ALPHAS.index(0.6)
    assert sdip.wm_cov_percent[i] == pytest.approx(rows[k["sdip"]]["wm_cov_percent"], rel=1e-5)
    assert sdip.lesion_contrast[i] == pytest.approx(rows[k["sdip"]]["lesion_contrast"], rel=1e-5)
    # Without the guard (the paper's blend) the lesion keeps no more of its contrast at any
    # alpha, and at alpha 0 (the network's image) much less (here G = 1 on the lesion only).
    paper = by["SDIP without the guard (the paper's)"]
    assert all(p <= g + 1e-9 for p, g in zip(paper.lesion_contrast, sdip.lesion_contrast))
    assert paper.lesion_contrast[0] < 0.5 * sdip.lesion_contrast[0]
    # alpha 0 with the guard still keeps the OSEM in the lesion; alpha 1 is mostly OSEM.
    assert sdip.wm_cov_percent[0] < sdip.wm_cov_percent[-1] <= rows[k["osem"]]["wm_cov_percent"] + 1e-6
    # The Gaussian row has SDIP's noise (the smallest FWHM that is as quiet).
    assert rows[k["gaussian"]]["wm_cov_percent"] <= rows[k["sdip"]]["wm_cov_percent"] + 1e-9
    assert 0 < a.gaussian_fwhm < 6


@pytest.mark.parametrize(("affine", "expected"), [
    (np.diag([4.0, 4.0, 4.0, 1.0]), {"top": "A", "bottom": "P", "left": "R", "right": "L"}),
    # Columns running to the patient's right (a flipped i axis): the letters follow.
    (np.diag([-4.0, 4.0, 4.0, 1.0]), {"top": "A", "bottom": "P", "left": "L", "right": "R"}),
    # Rows running anterior (j flipped).
    (np.diag([4.0, -4.0, 4.0, 1.0]), {"top": "P", "bottom": "A", "left": "R", "right": "L"}),
])
def test_orientation_letters_come_from_the_affine(affine: np.ndarray, expected: dict) -> None:
    assert figures.edge_letters(affine, 1, 2) == expected


def test_orientation_letters_of_other_planes() -> None:
    a = np.diag([4.0, 4.0, 4.0, 1.0])
    # A coronal view of the same volume (rows along k, the slices): k runs superior, so row
    # index down = superior.
    assert figures.edge_letters(a, 0, 2) == {"top": "I", "bottom": "S", "left": "R", "right": "L"}
    # An oblique column direction gets two letters, the stronger first.
    c, s = np.cos(np.radians(30)), np.sin(np.radians(30))
    rot = np.eye(4)
    rot[:3, 0] = (c, s, 0)  # i: mostly left, some posterior
    assert figures.edge_letters(rot, 1, 2)["right"] == "LP"
    assert figures.direction_letter(np.array([0.0, 0.0, -1.0])) == "I"


@pytest.mark.slow
def test_report_files_panels_and_numbers(inputs: ReportInputs, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    drawn = []
    real_close = figures.plt.close
    monkeypatch.setattr(figures.plt, "close", lambda fig: (drawn.append(fig), real_close(fig)))
    paths = write_report(inputs, tmp_path, {"preset": "made up"})
    images_fig, tradeoff_fig = drawn
    # The paper's layout: 8 columns (MR, full dose, OSEM, Gaussian, cDIP, SDIP, S, w), each on
    # the nuclei's slice, zoomed, the lesion's slice, zoomed.
    titled = [ax.get_title() for ax in images_fig.axes if ax.images and ax.get_title()]
    assert len(titled) == 8
    assert titled[0].startswith("MR") and titled[1] == "full dose" and titled[5].startswith("SDIP")
    assert titled[6].startswith("stability") and titled[7].startswith("data weight")
    assert sum(1 for ax in images_fig.axes if ax.images and ax.get_label() != "<colorbar>") == 8 * 4
    bars = [ax.get_xlabel() for ax in images_fig.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == 4 and any("Bq/ml" in b and "nuclei" in b for b in bars)
    assert any(b.startswith("S (Bq/ml)") for b in bars) and any(b.startswith("w") for b in bars)
    # The PET window is the full dose's peak in the nuclei, the same on every PET panel.
    vmax = float(inputs.full_dose[inputs.masks["nuclei"]].max())
    pet = [im for ax in images_fig.axes for im in ax.images if im.get_cmap().name == "hot"]
    assert len(pet) == 5 * 4 and all(im.get_clim() == (0, pytest.approx(vmax)) for im in pet)
    # Orientation letters on every slice panel; profiles through nuclei and lesion.
    letters = {t.get_text() for ax in images_fig.axes for t in ax.texts}
    assert {"A", "P", "R", "L"} <= letters
    profiles = [ax.get_title() for ax in images_fig.axes if ax.get_title().startswith("profile")]
    assert profiles == ["profile through the nuclei", "profile through the lesion"]
    # The trade-off plot: both metrics, every epoch, the five operating points.
    a = analyse(inputs)
    ax_pvr = tradeoff_fig.axes[0]
    xs = {line.get_label(): tuple(line.get_xdata()) for line in ax_pvr.lines}
    dip_line = next(v for lab, v in xs.items() if lab.startswith("conditional DIP: every epoch"))
    assert len(dip_line) == EPOCHS
    for role in ("osem", "gaussian", "cdip", "sdip", "full"):
        assert xs[a.keys[role]] == (pytest.approx(a.table[a.keys[role]]["wm_cov_percent"]),)

    from matplotlib.image import imread
    h, w, _ = imread(paths["figure"]).shape
    assert w >= 1600 and h >= 1000  # readable at full size
    report = json.loads(paths["metrics_json"].read_text())
    assert report["wm_noise_mask"]["voxels"] == int(a.noise_mask.sum())
    assert set(report["metrics"]) == set(a.table)
    for name, row in a.table.items():
        assert report["metrics"][name] == pytest.approx(row)
    assert [c["values"] for c in report["curves"]][1] == [float(e) for e in range(1, EPOCHS + 1)]
    md = paths["metrics_md"].read_text()
    assert f"{int(a.noise_mask.sum())} voxels" in md
