"""The demo report's two figures, drawn from node/cli/report.py's ``Analysis`` (no number here is
computed twice): the images (the paper's layout, zoomed on the nuclei and the lesion, with line
profiles) and the noise trade-off plots.

Slices are shown as a viewer shows DICOM axial images: array rows down, columns to the right
(with the phantom's geometry the patient's left is on the viewer's right, radiological view);
the orientation letters come from the volume's affine (PS3.3 C.7.6.2.1.1), not assumed.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no screen: render to files only
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from scipy import ndimage  # noqa: E402

# The figures take node/cli/report.py's ReportInputs and Analysis (annotations only: report.py
# imports this module to draw, and an import back would be a loop).

# Patient axis letters (LPS: +x left, +y posterior, +z superior), for a direction's sign.
_LETTERS = (("R", "L"), ("A", "P"), ("I", "S"))
_AFFINE_COLUMN = {0: 2, 1: 1, 2: 0}  # array axis (k, j, i) -> affine column (i, j, k)

# Colours per method, the same in the profiles and the trade-off plots.
COLOURS = {"full": "black", "osem": "0.55", "gaussian": "tab:blue", "cdip": "tab:orange",
           "sdip": "tab:red", "truth": "tab:green"}
DPI = 100


def direction_letter(vector: np.ndarray) -> str:
    """The patient direction (one of R L A P I S) a vector in LPS points to most; an oblique
    vector gets its two or three letters, strongest first (as PS3.3 C.7.6.1.1.1's Patient
    Orientation does)."""
    v = np.asarray(vector, float)
    order = np.argsort(-np.abs(v))
    letters = [_LETTERS[a][int(v[a] > 0)] for a in order if abs(v[a]) > 1e-3 * np.abs(v).max()]
    return "".join(letters[:1] if abs(v[order[0]]) > 0.95 * np.linalg.norm(v) else letters)


def edge_letters(affine: np.ndarray, row_axis: int, col_axis: int) -> dict[str, str]:
    """Letters at the top, bottom, left and right edges of a slice shown with ``imshow``
    (origin upper) whose rows run along array axis ``row_axis`` and columns along
    ``col_axis`` (array axes in (k, j, i) order)."""
    a = np.asarray(affine, float)[:3, :3]
    down = a[:, _AFFINE_COLUMN[row_axis]]
    right = a[:, _AFFINE_COLUMN[col_axis]]
    return {"top": direction_letter(-down), "bottom": direction_letter(down),
            "left": direction_letter(-right), "right": direction_letter(right)}


def _mark_edges(ax, letters: dict[str, str], colour: str = "white") -> None:
    kw = {"transform": ax.transAxes, "color": colour, "fontsize": 8, "fontweight": "bold"}
    ax.text(0.5, 0.985, letters["top"], ha="center", va="top", **kw)
    ax.text(0.5, 0.015, letters["bottom"], ha="center", va="bottom", **kw)
    ax.text(0.015, 0.5, letters["left"], ha="left", va="center", **kw)
    ax.text(0.985, 0.5, letters["right"], ha="right", va="center", **kw)


def _centre(mask: np.ndarray) -> tuple[int, int, int]:
    return tuple(int(round(c)) for c in ndimage.center_of_mass(mask))  # type: ignore[return-value]


def _crop(centre: tuple[int, int, int], half: int, shape: tuple[int, ...]) -> tuple[slice, slice]:
    _, j, i = centre
    j0 = min(max(j - half, 0), max(shape[1] - 2 * half - 1, 0))
    i0 = min(max(i - half, 0), max(shape[2] - 2 * half - 1, 0))
    return slice(j0, j0 + 2 * half + 1), slice(i0, i0 + 2 * half + 1)


def pet_window(r: ReportInputs) -> float:
    """The PET panels' upper window: the full-dose image's peak in the nuclei, so that grey
    matter (about 0.6 of it) is not saturated and the nuclei stand out."""
    return float(np.max(r.full_dose[np.asarray(r.masks["nuclei"], bool)]))


def image_figure(r: ReportInputs, a: Analysis, path: Path) -> Path:
    """MR, full dose, OSEM, OSEM + Gaussian, cDIP, SDIP, stability map and data weight on the
    axial slices through the nuclei and the lesion, each with a zoomed row, then line
    profiles through the nuclei and the lesion."""
    k = a.keys
    pet_cols = [("full", "full dose"), ("osem", "OSEM 1/10 dose"),
                ("gaussian", f"OSEM + Gaussian {a.gaussian_fwhm:.2f} vx"),
                ("cdip", "conditional DIP"), ("sdip", f"SDIP \u03b1 {r.alpha:g} (delivered)")]
    cols: list[tuple[str, str, np.ndarray | None]] = [("mr", "MR (registered)", r.mr)]
    cols += [(role, title, a.images[k[role]]) for role, title in pet_cols]
    cols += [("S", "stability map S", r.stability)]
    if r.data_weight is not None:
        cols += [("w", "data weight w", r.data_weight)]
    vmax = pet_window(r)
    brain = np.asarray(r.masks["brain"], bool)
    s_max = float(np.percentile(r.stability[brain], 99.5))
    mr_max = float(np.percentile(r.mr[brain], 99.5))
    shape = r.osem.shape
    dk, dj, di = r.spacing
    nuc_c = _centre(r.masks["nuclei"])
    les_c = _centre(r.masks["lesion"])
    rows = [("nuclei", nuc_c, r.masks["nuclei"], 7), ("lesion", les_c, r.masks["lesion"], 6)]
    letters = edge_letters(r.affine, 1, 2)

    n = len(cols)
    fig = plt.figure(figsize=(2.05 * n + 1.6, 13.2), layout="constrained", dpi=DPI)
    gs = fig.add_gridspec(5, n, height_ratios=[1, 1, 1, 1, 1.25])
    axes = np.array([[fig.add_subplot(gs[i, j]) for j in range(n)] for i in range(4)])
    handles: dict[str, object] = {}
    for ri, (row_name, centre, roi, half) in enumerate(rows):
        kk = centre[0]
        rj, ri_ = _crop(centre, half, shape)
        for cj, (role, title, img) in enumerate(cols):
            if role == "mr":
                kw = {"cmap": "gray", "vmin": 0, "vmax": mr_max}
            elif role == "S":
                kw = {"cmap": "viridis", "vmin": 0, "vmax": s_max}
            elif role == "w":
                kw = {"cmap": "gray", "vmin": 0, "vmax": 1}
            else:
                kw = {"cmap": "hot", "vmin": 0, "vmax": vmax}
            main, zoom = axes[2 * ri, cj], axes[2 * ri + 1, cj]
            handles[role] = main.imshow(img[kk], interpolation="nearest", **kw)
            zoom.imshow(img[kk, rj, ri_], interpolation="nearest",
                        extent=(ri_.start - 0.5, ri_.stop - 0.5, rj.stop - 0.5, rj.start - 0.5), **kw)
            main.add_patch(Rectangle((ri_.start - 0.5, rj.start - 0.5), ri_.stop - ri_.start,
                                     rj.stop - rj.start, fill=False, ec="cyan", lw=0.8, ls="--"))
            zoom.contour(np.arange(ri_.start, ri_.stop), np.arange(rj.start, rj.stop),
                         np.asarray(roi[kk, rj, ri_], float), levels=[0.5], colors="cyan",
                         linewidths=0.7)
            zoom.axhline(centre[1], color="cyan", lw=0.6, ls=":")  # the profile's line
            _mark_edges(main, letters, "white" if role != "w" else "tab:red")
            for ax in (main, zoom):
                ax.set_xticks([]), ax.set_yticks([])
            if ri == 0:
                main.set_title(title, fontsize=10)
            if role in k:
                row = a.table[k[role]]
                zoom.set_xlabel(f"PVR {row['pvr_mean']:.2f}" if row_name == "nuclei"
                                else f"contrast {row['lesion_contrast']:.2f}", fontsize=9)
                if ri == 0:
                    main.set_xlabel(f"WM noise {row['wm_cov_percent']:.1f} %", fontsize=9)
            if cj == 0:
                main.set_ylabel(f"slice {kk + 1} of {shape[0]}: {row_name}", fontsize=10)
                zoom.set_ylabel(f"{row_name}, zoomed", fontsize=10)
    # Colour bars: one per scale, under the columns that use it.
    col_of = {role: j for j, (role, _, _) in enumerate(cols)}
    bars = [("mr", ["mr"], "MR (a.u.)"),
            ("sdip", [c for c, _ in pet_cols], f"activity (Bq/ml); window 0\u2013{vmax:,.0f} = "
             "the full-dose image's peak in the nuclei"),
            ("S", ["S"], "S (Bq/ml)"), ("w", ["w"], "w (1: OSEM value kept)")]
    for handle, roles, label in bars:
        if handle not in handles:
            continue
        span = [axes[3, col_of[rl]] for rl in roles]
        cb = fig.colorbar(handles[handle], ax=span, location="bottom", shrink=0.9, aspect=12 * len(span),
                          pad=0.01)
        cb.set_label(label, fontsize=9)
        cb.ax.tick_params(labelsize=8)
        if handle == "w":
            cb.set_ticks([0, 0.5, 1])

    # Line profiles along the rows (j) through the nuclei and the lesion, and the data weight there.
    prof = gs[4, :].subgridspec(1, 4, width_ratios=[1, 1, 0.75, 0.55])
    roles = ["osem", "gaussian", "cdip", "sdip", "full"]
    ax_w = fig.add_subplot(prof[0, 2])
    for pi, (row_name, centre, roi, _) in enumerate(rows):
        ax = fig.add_subplot(prof[0, pi])
        kk, jj, _ = centre
        x = (np.arange(shape[2]) - centre[2]) * di
        labels, n_runs = ndimage.label(np.asarray(roi[kk, jj], bool))
        for run in range(1, n_runs + 1):  # each nucleus (or the lesion) shaded on its own
            idx = np.flatnonzero(labels == run)
            ax.axvspan(x[idx[0]] - di / 2, x[idx[-1]] + di / 2, color="cyan", alpha=0.15,
                       label="ROI" if run == 1 else None)
        ax.plot(x, r.truth[kk, jj], color=COLOURS["truth"], lw=1, ls="--", label="true activity")
        for role in roles:
            img = a.images[k[role]]
            ax.plot(x, img[kk, jj], color=COLOURS[role], lw=2.2 if role == "sdip" else 1.3,
                    marker="." if role in ("osem", "sdip") else None, ms=4, label=k[role])
        side = f"{letters['left']} \u2190 \u2192 {letters['right']}"
        ax.set_xlabel(f"mm from the {row_name} centre along the row, {side} (slice {kk + 1}, row {jj + 1})",
                      fontsize=9)
        ax.set_ylabel("activity (Bq/ml)", fontsize=9)
        ax.set_title(f"profile through the {row_name}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        ax.set_xlim(-40 if row_name == "nuclei" else -30, 40 if row_name == "nuclei" else 30)
        if pi == 1:
            handles_l, labels_l = ax.get_legend_handles_labels()
        if r.data_weight is not None:
            ax_w.plot(x, r.data_weight[kk, jj], color="tab:purple", ls="-" if pi else "--",
                      marker=".", ms=4, label=f"w, {row_name} row")
    ax_w.set_ylim(-0.03, 1.03)
    ax_w.set_xlim(-40, 40)
    ax_w.set_title("data weight w along the same rows", fontsize=10)
    ax_w.set_xlabel(f"mm from the centre, {side}", fontsize=9)
    ax_w.set_ylabel("w (1: the OSEM value kept)", fontsize=9)
    ax_w.grid(alpha=0.3)
    ax_w.tick_params(labelsize=8)
    ax_w.legend(fontsize=8, loc="lower left")
    ax_leg = fig.add_subplot(prof[0, 3])
    ax_leg.axis("off")
    ax_leg.legend(handles_l, labels_l, fontsize=8.5, loc="center left", frameon=False)
    fig.suptitle("dipnode demo: brain FDG phantom at 1/10 dose, and what the node sent back "
                 f"(axial slices, {dk:g} mm voxels; dashed box: zoomed area, dotted: profile line)",
                 fontsize=12)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def tradeoff_figure(r: ReportInputs, a: Analysis, path: Path) -> Path:
    """White-matter noise against the nuclei's PVR and against the lesion's contrast, for a
    Gaussian of FWHM 0-3 voxels, every epoch of the DIP fit and alpha 0-1, with the operating
    points (the table's rows) marked; and the noise ROI on the MR."""
    fig = plt.figure(figsize=(17, 5.6), layout="constrained", dpi=DPI)
    gs = fig.add_gridspec(1, 3, width_ratios=[1, 1, 0.72])
    ax_pvr, ax_les = fig.add_subplot(gs[0, 0]), fig.add_subplot(gs[0, 1])
    ax_mask = fig.add_subplot(gs[0, 2])
    di = r.spacing[2]
    marker_of = {"gaussian": "o", "cdip": "^", "sdip": "s", "sdip-paper": "s"}
    for ax, metric, label in ((ax_pvr, "pvr", "peak-to-valley ratio (nuclei)"),
                              (ax_les, "lesion_contrast", "lesion contrast (lesion / ring \u2212 1)")):
        for c in a.curves:
            paper = c.role == "sdip-paper"
            role, marker = ("sdip" if paper else c.role), marker_of[c.role]
            ys = getattr(c, metric)
            span = f"{c.values[0]:g}\u2013{c.values[-1]:g}"
            if c.parameter.startswith("FWHM"):
                span = f"FWHM {span} voxels ({c.values[0] * di:g}\u2013{c.values[-1] * di:g} mm)"
            elif c.parameter == "epoch":
                span = f"every epoch, {span}"
            else:
                span = f"{c.parameter} {span}"
            ax.plot(c.wm_cov_percent, ys, color=COLOURS[role], marker=marker, ms=3.5, lw=1.2,
                    alpha=0.6 if paper else 0.85, ls="--" if paper else "-", mfc="none" if paper else None,
                    zorder=3 if paper else 2,
                    label=f"{c.method}: {span}")
            if paper:
                continue  # its alphas are the curve above's: not labelled twice
            step = 5 if c.parameter == "epoch" else 2 if c.parameter == "alpha" else 4
            for idx, (x, y, v) in enumerate(zip(c.wm_cov_percent, ys, c.values)):
                if idx % step == 0 or idx == len(c.values) - 1:
                    ax.annotate(f"{v:g}", (x, y), fontsize=7, color=COLOURS[role],
                                xytext=(3, 3), textcoords="offset points")
        for role, marker in (("osem", "o"), ("gaussian", "D"), ("cdip", "^"), ("sdip", "s"),
                             ("full", "*")):
            row = a.table[a.keys[role]]
            y = row["pvr_mean"] if metric == "pvr" else row["lesion_contrast"]
            ax.plot([row["wm_cov_percent"]], [y], marker=marker, ms=13 if role == "full" else 10,
                    mfc=COLOURS[role], mec="black", mew=1.2, ls="none", zorder=5,
                    label=a.keys[role])
        ax.set_xlabel("white-matter noise (CoV, %, eroded ROI)", fontsize=10)
        ax.set_ylabel(label, fontsize=10)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=9)
    ax_pvr.set_title("noise vs the nuclei's peak-to-valley (cf. the paper's Figure 4)", fontsize=10)
    ax_les.set_title("noise vs the lesion the MR does not show", fontsize=10)
    h, lab = ax_pvr.get_legend_handles_labels()
    ax_les.legend(h, lab, fontsize=7.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False,
                  title="curves, and operating points (big markers: the table's rows)",
                  title_fontsize=7.5)

    # The noise ROI on the slice that holds most of it, over the MR, with grey matter outlined.
    counts = a.noise_mask.sum(axis=(1, 2))
    kk = int(np.argmax(counts))
    brain = np.asarray(r.masks["brain"], bool)
    ax_mask.imshow(r.mr[kk], cmap="gray", vmin=0, vmax=float(np.percentile(r.mr[brain], 99.5)),
                   interpolation="nearest")
    ax_mask.imshow(np.ma.masked_where(~a.noise_mask[kk], a.noise_mask[kk]), cmap=ListedColormap(["red"]),
                   vmin=0, vmax=1, alpha=0.9, interpolation="nearest")
    ax_mask.contour(np.asarray(r.masks["gm"][kk], float), levels=[0.5], colors="tab:cyan",
                    linewidths=0.6)
    _mark_edges(ax_mask, edge_letters(r.affine, 1, 2))
    ax_mask.set_xticks([]), ax_mask.set_yticks([])
    ax_mask.set_title(f"white-matter noise ROI (red; cyan: grey matter)\nslice {kk + 1}: "
                      f"{int(counts[kk])} of its {int(a.noise_mask.sum())} voxels", fontsize=9)
    ax_mask.set_xlabel(_wrap(a.noise_mask_text, 52), fontsize=8)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))
