"""The criteria loop's report: an HTML page with plots of what teaching the criteria did to the served policy.

Four figures over the loop's wall-clock time, one point per evaluation of the served policy (the base
first, then after each version it published), with the phases shaded: violation rate per criterion,
the reward model's mean score of the same replies, the gate's KL to the reference, and reply length.
Examples of base and final replies to the same held-out prompts follow.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any, Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from demo.report import html_page  # noqa: E402


def _axes(summary: dict[str, Any], title: str, ylabel: str) -> tuple[Any, Any]:
    fig, ax = plt.subplots(figsize=(7, 3.4))
    marks = summary.get("phase_marks") or []
    end = max([e["t"] for e in summary.get("evaluations", [])] + [m[0] for m in marks] + [1.0])
    for k, (t, label) in enumerate(marks):
        t_next = marks[k + 1][0] if k + 1 < len(marks) else end
        ax.axvspan(t, t_next, color=f"C{k}", alpha=0.07)
        ax.annotate(f"phase {k + 1}: {label}", (t, 1.0), xycoords=("data", "axes fraction"), fontsize=7,
                    xytext=(3, -10), textcoords="offset points")
    ax.set_xlabel("seconds since the loop started")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return fig, ax


def _series(summary: dict[str, Any], get: Callable[[dict[str, Any]], Any]) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for e in summary.get("evaluations", []):
        y = get(e)
        if y is not None:
            xs.append(e["t"])
            ys.append(y)
    return xs, ys


def _plot_violation(summary: dict[str, Any], path: Path) -> None:
    fig, ax = _axes(summary, "Served policy: share of held-out replies that break each criterion", "violation rate")
    for ref in summary.get("criteria", []):
        xs, ys = _series(summary, lambda e, r=ref: e["violation"].get(r))
        ax.plot(xs, ys, marker="o", ms=4, label=ref)
    evals = summary.get("evaluations", [])
    for e in evals[1:]:
        ax.annotate(e["version"], (e["t"], 0), xycoords=("data", "axes fraction"), fontsize=6, rotation=90,
                    xytext=(1, 3), textcoords="offset points", alpha=0.6)
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_one(key: str, title: str, ylabel: str) -> Callable[[dict[str, Any], Path], None]:
    def plot(summary: dict[str, Any], path: Path) -> None:
        fig, ax = _axes(summary, title, ylabel)
        xs, ys = _series(summary, lambda e: e.get(key))
        if xs:
            ax.plot(xs, ys, marker="o", ms=4)
        else:
            ax.text(0.5, 0.5, "not measured in this run", ha="center", va="center", transform=ax.transAxes)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    return plot


def _plot_length(summary: dict[str, Any], path: Path) -> None:
    """The mean words per reply, and the 10th-90th percentile band: a narrowing shows as a thinner band."""
    fig, ax = _axes(summary, "Words per held-out reply: mean, and the 10th-90th percentile band", "words")
    xs, ys = _series(summary, lambda e: e.get("mean_words"))
    ax.plot(xs, ys, marker="o", ms=4, label="mean")
    band = [(e["t"], e["words"]["p10"], e["words"]["p90"]) for e in summary.get("evaluations", []) if e.get("words")]
    if band:
        ax.fill_between([b[0] for b in band], [b[1] for b in band], [b[2] for b in band], alpha=0.2, label="p10-p90")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


FIGURES: dict[str, tuple[str, Callable[[dict[str, Any], Path], None]]] = {
    "violation.png": ("Violation rate vs time and versions", _plot_violation),
    "reward.png": ("Reward-model score of the served replies", _plot_one(
        "mean_reward", "Reward model's mean score of the held-out replies", "mean reward")),
    "kl.png": ("KL to the reference policy", _plot_one(
        "kl_to_ref", "Mean per-token KL to the reference (the gate's drift measure)", "KL (nats/token)")),
    "length.png": ("Reply length", _plot_length),
}


def _examples(summary: dict[str, Any]) -> str:
    rows = "\n".join(
        f"<tr><td>{html.escape(x['prompt'])}</td><td>{html.escape(x['base'])}</td><td>{html.escape(x['final'])}</td></tr>"
        for x in summary.get("examples", []))
    if not rows:
        return ""
    return (f"<h2>Held-out replies, base vs final policy (same seed)</h2><table><tr><th>prompt</th><th>base</th>"
            f"<th>final ({html.escape(str(summary.get('final_version', '')))})</th></tr>{rows}</table>")


def write_loop_report(out_dir: Path, summary: dict[str, Any]) -> Path:
    """index.html, the PNGs and summary.json in ``out_dir``; returns the HTML path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, (_, plot) in FIGURES.items():
        plot(summary, out_dir / name)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
    page = html_page("prefstream criteria loop", "prefstream: a criterion teaching the served policy", summary,
                     [(name, title) for name, (title, _) in FIGURES.items()], _examples(summary))
    path = out_dir / "index.html"
    path.write_text(page)
    return path


__all__ = ["FIGURES", "write_loop_report"]
