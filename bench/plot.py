"""The PNG beside a results file: median latency against the row size (T, or batch for the model suite),
log-log, one line per provider, one panel per (suite, mode); a suite with a single row (e2e) gets one bar per
provider instead, with the IQR as its error bar."""

from __future__ import annotations

from pathlib import Path

AXIS = {"T": "T (tokens)", "B": "batch"}


def plot(report: dict, path: Path) -> str | None:
    """Write the figure to `path`; returns why not (matplotlib missing) or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display is needed or wanted
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullLocator
    except ImportError:
        return "no plot: matplotlib is not installed (pip install -e '.[bench]')"

    entries = [(name, report[name]) for name in report["suites"]]
    # One colour per provider across every panel.
    order = dict.fromkeys(p for _, e in entries for p in e["providers"])
    colour = {p: f"C{i}" for i, p in enumerate(order)}
    cols = max(len(e["modes"]) for _, e in entries)
    fig, axes = plt.subplots(len(entries), cols, figsize=(5.5 * cols, 4 * len(entries)), squeeze=False)
    for row, (name, entry) in zip(axes, entries, strict=True):
        for ax, mode in zip(row, [*entry["modes"], *[None] * (cols - len(entry["modes"]))], strict=True):
            if mode is None:
                ax.axis("off")
                continue
            if len(entry[entry["case"]]) == 1:
                _bars(ax, entry, mode, colour)
                ax.set_title(f"{name}: {mode} ({entry['label']}, {entry['case']}={entry[entry['case']][0]})")
                continue
            for provider in entry["providers"]:
                points = sorted(
                    (r[entry["case"]], r["median_ms"])
                    for r in entry["results"]
                    if r["mode"] == mode and r["provider"] == provider and r["status"] == "ok"
                )
                if points:
                    xs, ys = zip(*points, strict=True)
                    ax.plot(xs, ys, marker="o", label=provider, color=colour[provider])
            ax.set_xscale("log")
            ax.set_yscale("log")
            cases = entry[entry["case"]]
            ax.set_xticks(cases, [str(c) for c in cases])  # the measured sizes, not powers of ten
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xlabel(AXIS.get(entry["case"], entry["case"]))
            ax.set_ylabel("median ms")
            ax.set_title(f"{name}: {mode} ({entry['label']})")
            ax.grid(True, which="both", alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=8)
    fig.suptitle(f"{report['device']}, {report['dtype']}, {report['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def _bars(ax, entry: dict, mode: str, colour: dict[str, str]) -> None:
    """One bar per provider that ran: its median, the error bar its IQR (centred: the quartiles are not kept)."""
    rows = [r for r in entry["results"] if r["mode"] == mode and r["status"] == "ok"]
    names = [r["provider"] for r in rows]
    ax.bar(
        range(len(rows)),
        [r["median_ms"] for r in rows],
        yerr=[r["iqr_ms"] / 2 for r in rows],
        color=[colour[n] for n in names],
        capsize=3,
    )
    ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("median ms")
    ax.grid(True, axis="y", alpha=0.3)
