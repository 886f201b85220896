"""The scaling study's CSV, read back, and its plots (``experiments/scaling_study.py`` writes the CSV; ``--plot_only``
re-draws the plots from it alone)."""

from __future__ import annotations

import csv
import os

from experiments.results_io import table_peaks

PHASES = ("prefill", "decode", "train")


def read_rows(path: str) -> list[dict]:
    """The CSV's rows as dicts of strings ([] when there is no file)."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def number(v: str):
    """A CSV cell back to bool / int / float, else the string."""
    if v in ("True", "False"):
        return v == "True"
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def plot(out_dir: str, roofline_device: str = "H100", fallback_peaks: tuple[float, float] = (0.2, 0.04)) -> list[str]:
    """``roofline.png`` and ``throughput_vs_devices.png`` from ``out_dir/scaling.csv`` (only the CSV is read).

    ``fallback_peaks``: (TFLOP/s, TB/s) of a ``roofline_device`` not in ``results_io.PEAKS``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    rows = [{k: number(v) for k, v in r.items()} for r in read_rows(os.path.join(out_dir, "scaling.csv"))]
    rows = [r for r in rows if r["status"] == "ok"]
    timed = [r for r in rows if isinstance(r.get("step_s"), float)]
    models = sorted({r["model"] for r in rows})
    plans = sorted({r["plan"] for r in rows})
    colour = {m: f"C{i}" for i, m in enumerate(models)}
    marker = {p: "osD^v<>ph*X"[i % 11] for i, p in enumerate(plans)}
    phase_marker = {"prefill": "o", "decode": "s", "train": "^"}

    # Roofline, per device: achieved (timed rows) or XLA's estimate (the bound at the row's intensity).
    kind = timed[0]["device_kind"] if timed else roofline_device
    peak, bandwidth = (timed[0]["peak_tflops"], timed[0]["bandwidth_tbs"]) if timed else _peaks(kind, fallback_peaks)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    points = []
    for r in timed or rows:
        flops = r["xla_flops_fit"] if isinstance(r.get("xla_flops_fit"), float) else r["xla_flops"]
        nbytes = r["xla_bytes_fit"] if isinstance(r.get("xla_bytes_fit"), float) else r["xla_bytes"]
        if not (flops > 0 and nbytes > 0):
            continue
        ai = flops / nbytes
        y = r["tflops_per_device"] * 1e12 if timed else min(peak * 1e12, ai * bandwidth * 1e12)
        points.append((ai, y))
        ax.scatter(ai, y, c=colour[r["model"]], marker=phase_marker.get(r["phase"], "x"), s=28, alpha=0.8)
    if points:
        lo = min(p[0] for p in points) / 4
        hi = max(max(p[0] for p in points) * 4, 4 * peak / bandwidth)
        xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]
        ax.plot(xs, [min(peak * 1e12, x * bandwidth * 1e12) for x in xs], "k-", lw=1.5)
        ax.axhline(peak * 1e12, color="k", ls=":", lw=0.8)
        ax.text(lo * 1.1, peak * 1e12 * 1.08, f"compute {peak:g} TFLOP/s", fontsize=8)
        ax.text(lo * 1.1, lo * bandwidth * 1e12 * 1.5, f"bandwidth {bandwidth:g} TB/s", fontsize=8, rotation=20)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (XLA flops / bytes accessed per device, depth-fitted)")
    ax.set_ylabel("FLOP/s per device" + (" (achieved, MaxText FLOPs)" if timed else " (estimated)"))
    title = f"Roofline, {kind}" + ("" if timed else ": XLA cost-analysis estimates on simulated devices, no timings")
    ax.set_title(title, fontsize=10)
    handles = [plt.Line2D([], [], color=colour[m], marker="o", ls="", label=m) for m in models]
    handles += [plt.Line2D([], [], color="grey", marker=mk, ls="", label=ph) for ph, mk in phase_marker.items()]
    ax.legend(handles=handles, fontsize=7, loc="lower right")
    ax.grid(True, which="both", alpha=0.2)
    fig.tight_layout()
    roof = os.path.join(out_dir, "roofline.png")
    fig.savefig(roof, dpi=120)
    plt.close(fig)

    # Throughput (timed) or per-device memory and compile time (CPU) against the device count, by plan.
    phases = [p for p in PHASES if any(r["phase"] == p for r in rows)] or ["prefill"]
    panels = (
        [("tokens_per_s", "tokens/s")] if timed else [("peak_gb", "peak GB per device"), ("compile_s", "compile s")]
    )
    fig, axes = plt.subplots(len(panels), len(phases), figsize=(4.2 * len(phases), 3.6 * len(panels)), squeeze=False)
    for j, phase in enumerate(phases):
        for i, (col, label) in enumerate(panels):
            ax = axes[i][j]
            for r in timed or rows:
                if r["phase"] == phase and isinstance(r.get(col), float | int):
                    jitter = 1 + 0.04 * (plans.index(r["plan"]) - len(plans) / 2)
                    ax.scatter(r["devices"] * jitter, r[col], c=colour[r["model"]], marker=marker[r["plan"]], s=24)
            if col == "peak_gb":  # the per-device budgets the rows were judged against (memory_plan's 90%)
                for budget in sorted({r["budget_gb"] for r in rows if isinstance(r.get("budget_gb"), float)}):
                    ax.axhline(budget, color="r", ls="--", lw=0.8)
                    ax.text(
                        0.02,
                        budget * 1.05,
                        f"budget {budget:g} GB",
                        color="r",
                        fontsize=7,
                        transform=ax.get_yaxis_transform(),
                    )
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            counts = sorted({r["devices"] for r in rows})
            ax.set_xticks(counts, [str(c) for c in counts])
            ax.set_xlim(min(counts) / 1.6, max(counts) * 1.6)
            ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(ticker.FormatStrFormatter("%g"))
            ax.tick_params(axis="y", which="minor", labelsize=6)
            ax.set_title(f"{phase}: {label}", fontsize=9)
            ax.set_xlabel("devices")
            ax.grid(True, which="both", alpha=0.2)
    handles = [plt.Line2D([], [], color=colour[m], marker="o", ls="", label=m) for m in models]
    handles += [plt.Line2D([], [], color="grey", marker=marker[p], ls="", label=p) for p in plans]
    fig.legend(handles=handles, fontsize=7, loc="upper right")
    what = "measured" if timed else "XLA:CPU AOT on simulated devices: XLA's memory analysis and compile time"
    fig.suptitle(f"{what} (every batch x seq_len; plans at one device count side by side)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.9, 0.95))
    thr = os.path.join(out_dir, "throughput_vs_devices.png")
    fig.savefig(thr, dpi=120)
    plt.close(fig)
    return [roof, thr]


def _peaks(kind: str, fallback: tuple[float, float]) -> tuple[float, float]:
    found = table_peaks(kind)
    return found[1:] if found is not None else fallback


TPU_LABEL = "XLA:TPU compiler estimate, not a measurement"


def plot_tpu(out_dir: str) -> list[str]:
    """``--target=tpu`` plots from ``out_dir/scaling.csv``: ``est_roofline.png`` (per chip generation: arithmetic
    intensity against the estimated FLOP/s per chip, under that chip's ceilings) and ``est_throughput.png``
    (estimated tokens/s and MFU, or for decode the share of the HBM roofline, per plan). Every number plotted is
    the compiler's estimate (``est_step_s``), and the titles and legends say so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [{k: number(v) for k, v in r.items()} for r in read_rows(os.path.join(out_dir, "scaling.csv"))]
    rows = [r for r in rows if r["status"] == "ok" and isinstance(r.get("est_step_s"), float)]
    models = sorted({r["model"] for r in rows})
    plans = sorted({r["plan"] for r in rows})
    colour = {m: f"C{i}" for i, m in enumerate(models)}
    phase_marker = {"prefill": "o", "decode": "s", "train": "^"}
    kinds = sorted({r["target_device"] for r in rows}) or ["TPU v5e"]

    fig, axes = plt.subplots(1, len(kinds), figsize=(5.2 * len(kinds), 4.6), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        mine = [r for r in rows if r["target_device"] == kind]
        peak = mine[0]["peak_tflops"] * 1e12 if mine else 1.0
        bandwidth = mine[0]["bandwidth_tbs"] * 1e12 if mine else 1.0
        points = []
        for r in mine:
            flops = r["xla_flops_fit"] if isinstance(r.get("xla_flops_fit"), float) else r["xla_flops"]
            nbytes = r["xla_bytes_fit"] if isinstance(r.get("xla_bytes_fit"), float) else r["xla_bytes"]
            if not (flops > 0 and nbytes > 0):
                continue
            points.append(flops / nbytes)
            filled = r["estimate_source"].startswith("XLA:TPU optimal")
            ax.scatter(flops / nbytes, flops / r["est_step_s"], s=26, alpha=0.8, marker=phase_marker[r["phase"]],
                       c=colour[r["model"]] if filled else "none", edgecolors=colour[r["model"]])  # fmt: skip
        if points:
            lo, hi = min(points) / 4, max(max(points) * 4, 4 * peak / bandwidth)
            xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]
            ax.plot(xs, [min(peak, x * bandwidth) for x in xs], "k-", lw=1.2)
            ax.text(lo * 1.1, peak * 1.1, f"{peak / 1e12:g} TFLOP/s, {bandwidth / 1e12:g} TB/s", fontsize=7)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{kind} (per chip)", fontsize=9)
        ax.set_xlabel("XLA flops / bytes accessed per chip (depth fit)")
        ax.set_ylabel("XLA flops / estimated step time")
        ax.grid(True, which="both", alpha=0.2)
    handles = [plt.Line2D([], [], color=colour[m], marker="o", ls="", label=m) for m in models]
    handles += [plt.Line2D([], [], color="grey", marker=mk, ls="", label=ph) for ph, mk in phase_marker.items()]
    handles += [plt.Line2D([], [], color="grey", marker="o", mfc="none", ls="", label="roofline fallback")]
    fig.legend(handles=handles, fontsize=7, loc="center right", title=TPU_LABEL, title_fontsize=7)
    fig.suptitle(f"Roofline per TPU chip: {TPU_LABEL}", fontsize=10, x=0.4)
    fig.tight_layout(rect=(0, 0, 0.8, 0.93))
    roof = os.path.join(out_dir, "est_roofline.png")
    fig.savefig(roof, dpi=120)
    plt.close(fig)

    phases = [p for p in PHASES if any(r["phase"] == p for r in rows)] or ["prefill"]
    fig, axes = plt.subplots(2, len(phases), figsize=(4.6 * len(phases), 7.2), squeeze=False)
    shapes = sorted({(r["batch"], r["seq_len"]) for r in rows})
    shape_marker = {s: "osD^v<>ph*X"[i % 11] for i, s in enumerate(shapes)}
    for j, phase in enumerate(phases):
        second = ("est_hbm_util", "HBM roofline share") if phase == "decode" else ("est_mfu", "MFU")
        for i, (col, label) in enumerate((("est_tokens_per_s", "tokens/s"), second)):
            ax = axes[i][j]
            for r in rows:
                if r["phase"] == phase and isinstance(r.get(col), float):
                    x = plans.index(r["plan"]) + 0.12 * (models.index(r["model"]) - (len(models) - 1) / 2)
                    marker = shape_marker[r["batch"], r["seq_len"]]
                    ax.scatter(x, r[col], c=colour[r["model"]], marker=marker, s=24, alpha=0.85)
            ax.set_xticks(range(len(plans)), plans, fontsize=7, rotation=15)
            ax.set_yscale("log")
            ax.set_title(f"{phase}: estimated {label}", fontsize=9)
            ax.grid(True, which="both", alpha=0.2)
    handles = [plt.Line2D([], [], color=colour[m], marker="o", ls="", label=m) for m in models]
    handles += [
        plt.Line2D([], [], color="grey", marker=mk, ls="", label=f"batch {b}, seq {t}")
        for (b, t), mk in shape_marker.items()
    ]
    fig.legend(handles=handles, fontsize=7, loc="center right", title=TPU_LABEL, title_fontsize=7)
    fig.suptitle(f"TPU plans, compiled ahead of time: {TPU_LABEL}", fontsize=10, x=0.4)
    fig.tight_layout(rect=(0, 0, 0.76, 0.95))
    thr = os.path.join(out_dir, "est_throughput.png")
    fig.savefig(thr, dpi=120)
    plt.close(fig)
    return [roof, thr]
