"""What the node keeps about a finished computation, for the status page and the log: the
trust numbers (models/trust.py), the registration, timings, and one PNG of thumbnails.

Results of a delivered job are deleted from disk (node/server.py); the summary and the
thumbnail stay (until retention's ``outputs_days``), so a physicist can still see what was
sent and how much to trust it.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from dipnode.models.params import Method
from dipnode.models.trust import brain_mask, trust_numbers
from dipnode.node.jobs.pipeline import PipelineResult

__all__ = ["summary", "summary_line", "write_thumbnails"]


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)


def summary(result: PipelineResult, run_seconds: float) -> dict:
    """A JSON-safe dict: trust numbers, registration, method, timings, device."""
    d = result.denoised
    osem = result.pet.values
    # The weight the blend gave the measured value (SDIP: max(S_norm, guard); the paper's SDIP:
    # S_norm); plain conditional DIP takes none of it (0), the Gaussian is no blend (n/a).
    trust = trust_numbers(osem, d.denoised, d.data_weight, blends=result.method is not Method.GAUSSIAN)
    a = result.alignment
    registration = None if a is None else {
        "method": a.method, "metric": _finite(a.metric), "overlap_fraction": _finite(a.overlap_fraction)}
    return {
        "trust": trust.as_dict(),
        "registration": registration,
        "method": result.method.value,
        "params": {k: v for k, v in result.params.as_dict().items()
                   if isinstance(v, (int, float, str, bool)) and (not isinstance(v, float) or math.isfinite(v))},
        "timings": {k: round(float(v), 3) for k, v in d.timings.items() if math.isfinite(float(v))}
        | {"job": round(float(run_seconds), 3)},
        "device": d.device,
        "shape": list(osem.shape),
    }


def summary_line(job_id: int, s: dict) -> str:
    """One log line with the trust numbers."""
    t = s["trust"]
    measured = "n/a" if t["measured_fraction"] is None else f"{100 * t['measured_fraction']:.0f} %"
    reg = s.get("registration")
    reg_text = ("none (no MR)" if reg is None else
                f"{reg['method']}" + ("" if reg["metric"] is None else f", Mattes MI {reg['metric']:.3f}"))
    return (f"job {job_id} trust: brain voxels from measured data {measured}, mean change "
            f"{100 * t['mean_change']:+.1f} %, hottest 1 % change {100 * t['hot_change']:+.1f} %, "
            f"registration {reg_text}")


def _slice_index(osem: np.ndarray) -> int:
    """The axial slice with the most brain voxels (through the middle of the head)."""
    mask, _ = brain_mask(osem)
    return int(np.argmax(mask.sum(axis=(1, 2))))


def write_thumbnails(result: PipelineResult, path: Path) -> Path:
    """One PNG: the same axial slice of the OSEM image, the output and the data-weight map
    (the blending methods: the weight w of the measured value, 0-1; conditional DIP: the
    stability map S); Gaussian: two."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a server
    from matplotlib.figure import Figure

    d = result.denoised
    osem = result.pet.values
    k = _slice_index(osem)
    panels = [("OSEM", osem[k], "gray_r", (0, float(np.percentile(osem, 99.9)) or 1.0)),
              (f"output ({result.method.value})", d.denoised[k], "gray_r",
               (0, float(np.percentile(osem, 99.9)) or 1.0))]
    if d.data_weight is not None:
        panels.append(("data weight w", d.data_weight[k], "magma", (0, 1)))
    elif d.stability is not None:
        panels.append(("stability S (Bq/ml)", d.stability[k], "magma",
                       (0, float(np.percentile(d.stability, 99.5)) or 1.0)))
    fig = Figure(figsize=(1.5 * len(panels), 1.75), dpi=100)
    for i, (title, img, cmap, (lo, hi)) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        ax.imshow(img, cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.set_axis_off()
    fig.text(0.5, 0.02, f"axial slice {k + 1} of {osem.shape[0]}", ha="center", fontsize=7)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.88, bottom=0.08, wspace=0.04)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fig.savefig(tmp, format="png")
    tmp.replace(path)
    return path
