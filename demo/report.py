"""The demo's report: an HTML page with plots (and the PNGs beside it) of what the loop did.

Three figures: served-model accuracy vs events ingested, freshness over time, and scorer latency
over time with swap points marked.  Built from a :class:`Timeline` the demo records while it runs,
so the same code renders a benchmark run or a test run.
"""

from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


@dataclass
class Timeline:
    """Everything the demo observed, in wall-clock seconds since its start."""

    # (t, events_acked, accuracy, version): the served model's held-out accuracy as it changed
    accuracy: list[tuple[float, int, float, str]] = field(default_factory=list)
    # (t_served, freshness_s, version)
    freshness: list[tuple[float, float, str]] = field(default_factory=list)
    # (t, latency_ms, version, ok)
    latency: list[tuple[float, float, str, bool]] = field(default_factory=list)
    # (t, version): the first response served by each new version
    swaps: list[tuple[float, str]] = field(default_factory=list)
    # (events_acked when first served, accuracy, version): a few served versions judged after the run on
    # every held-out pair (the gate's accuracy above uses its small evaluation set)
    heldout: list[tuple[int, float, str]] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def spaced(xs: Sequence[float], max_labels: int = 6) -> list[int]:
    """Indices of at most ``max_labels`` points to label, first and last included, the rest as evenly
    spread over the x range as the points allow: a label per version turns a run with a hundred
    versions into an unreadable band."""
    if not xs or max_labels <= 0:
        return []
    if len(xs) <= max_labels:
        return list(range(len(xs)))
    lo, hi = min(xs), max(xs)
    chosen: list[int] = []
    for j in range(max_labels):
        target = lo + (hi - lo) * j / (max_labels - 1)
        best = min(range(len(xs)), key=lambda i: (abs(xs[i] - target), i))
        if best not in chosen:
            chosen.append(best)
    if len(xs) - 1 not in chosen:
        chosen[-1] = len(xs) - 1
    return sorted(set(chosen))


def _plot_accuracy(tl: Timeline, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 3.6))
    if tl.accuracy:
        xs = [a[1] for a in tl.accuracy]
        ys = [a[2] * 100 for a in tl.accuracy]
        ax.step(xs, ys, where="post", marker="o", ms=2, lw=1, label="gate's evaluation set, every version")
        for i in spaced(xs):
            ax.annotate(tl.accuracy[i][3], (xs[i], ys[i]), fontsize=7, xytext=(0, 6), textcoords="offset points",
                        ha="center")
    if tl.heldout:
        hx, hy = [h[0] for h in tl.heldout], [h[1] * 100 for h in tl.heldout]
        ax.plot(hx, hy, "s-", color="tab:green", ms=5, lw=1.5, label="all held-out pairs, a few versions")
        for x, y, (_, _, v) in zip(hx, hy, tl.heldout):
            ax.annotate(f"{y:.1f}", (x, y), fontsize=7, xytext=(0, -11), textcoords="offset points", ha="center",
                        color="tab:green")
    ax.set_xlabel("feedback events ingested (acked)")
    ax.set_ylabel("held-out pairwise accuracy (%)")
    ax.set_title("Served reward model accuracy vs events ingested")
    ax.grid(alpha=0.3)
    if tl.accuracy or tl.heldout:
        ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_freshness(tl: Timeline, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 3.6))
    if tl.freshness:
        ax.scatter([f[0] for f in tl.freshness], [f[1] for f in tl.freshness], s=4, alpha=0.5)
    ax.set_xlabel("time since start (s) when a model trained on the event first served")
    ax.set_ylabel("freshness (s)")
    ax.set_title("Freshness: feedback ack -> first response from a model trained on it")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_latency(tl: Timeline, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ok = [(t, ms) for t, ms, _, good in tl.latency if good]
    bad = [t for t, _, _, good in tl.latency if not good]
    if ok:
        ax.scatter([o[0] for o in ok], [o[1] for o in ok], s=4, alpha=0.5, label="best-of-N request")
    if bad:
        ax.scatter(bad, [0] * len(bad), s=12, marker="x", color="red", label="failed request")
    for i, (t, v) in enumerate(tl.swaps):
        ax.axvline(t, color="orange", alpha=0.6, lw=1, label="swap" if i == 0 else None)
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("latency (ms)")
    ax.set_title("Scorer best-of-N latency, with swaps to new versions")
    ax.grid(alpha=0.3)
    if ok or bad or tl.swaps:
        ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out_dir: Path, timeline: Timeline, summary: dict[str, Any]) -> Path:
    """Write index.html, three PNGs, summary.json and timeline.json into ``out_dir``; return the HTML path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = {
        "accuracy.png": ("Served-model accuracy vs events ingested", _plot_accuracy),
        "freshness.png": ("Freshness over time", _plot_freshness),
        "latency.png": ("Scorer latency over time, swaps marked", _plot_latency),
    }
    for name, (_, plot) in figures.items():
        plot(timeline, out_dir / name)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
    (out_dir / "timeline.json").write_text(timeline.to_json())
    page = html_page("prefstream demo report", "prefstream: feedback becoming a better served model", summary,
                     [(name, title) for name, (title, _) in figures.items()])
    path = out_dir / "index.html"
    path.write_text(page)
    return path


def html_page(title: str, heading: str, summary: dict[str, Any], figures: list[tuple[str, str]],
              extra_html: str = "") -> str:
    """A self-contained report page: the summary's scalar entries as a table, then the figures
    (``(png file name, title)``, files beside the page), then ``extra_html``."""
    rows = "\n".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>"
        for k, v in summary.items() if not isinstance(v, (dict, list))
    )
    imgs = "\n".join(f"<h2>{html.escape(t)}</h2><img src='{name}' alt='{html.escape(t)}'>" for name, t in figures)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:900px;margin:2em auto}}table{{border-collapse:collapse}}
th,td{{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}}img{{max-width:100%}}</style></head>
<body><h1>{html.escape(heading)}</h1>
<table>{rows}</table>
{imgs}
{extra_html}
</body></html>
"""


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
