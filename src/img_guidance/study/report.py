"""What ``img-guidance study results`` writes: the summary of :func:`img_guidance.study.stats.summarize`
as a Markdown table and as a bar chart (the paper's user-study figure: each system's share of the
votes and the ties, with 95% intervals), under ``STUDY_DIR/results/``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

RESULTS = "results"
JSON_FILE = "results.json"
TABLE_FILE = "results.md"
CHART_FILE = "preference.png"


def _cell(rate: float | None, interval: list[float] | None, votes: int) -> str:
    if rate is None or interval is None:
        return "no votes"
    return f"{100 * rate:.1f}% [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}] ({votes})"


def _kappa(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.3f}"


def markdown_table(summary: dict[str, Any]) -> str:
    """The shares of votes with their intervals, for all raters and for the consistent ones, then
    each rater's consistency on the repeated pairs."""
    blocks = {"all raters": summary, "consistent raters": summary["consistent"]}
    header = ["", *(f"{label} ({block['raters']})" for label, block in blocks.items())]
    rows = [
        [
            f"{summary['a']['name']} preferred",
            *(_cell(b["a"]["preferred"], b["a"]["ci95"], b["a"]["votes"]) for b in blocks.values()),
        ],
        [
            f"{summary['b']['name']} preferred",
            *(_cell(b["b"]["preferred"], b["b"]["ci95"], b["b"]["votes"]) for b in blocks.values()),
        ],
        ["tie", *(_cell(b["ties"], b["ties_ci95"], b["tie_votes"]) for b in blocks.values())],
        ["votes", *(str(b["votes"]) for b in blocks.values())],
        ["pairs", *(str(b["pairs"]) for b in blocks.values())],
        ["Fleiss' kappa", *(_kappa(b["kappa"]) for b in blocks.values())],
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    consistency = summary["consistency"]
    lines += [
        "",
        f"Share of votes [95% interval, bootstrap over pairs and raters] (votes). Consistency: the "
        f"repeated pairs (sides swapped) answered alike; raters below {consistency['min_consistency']:.0%} "
        "are left out of the consistent raters.",
        "",
        "| rater | repeated pairs answered alike | kept |",
        "|---|---|---|",
    ]
    for rater, entry in consistency["raters"].items():
        alike = f"{entry['agree']} of {entry['checks']}" if entry["checks"] else "none answered twice"
        lines.append(f"| {rater} | {alike} | {'yes' if entry['kept'] else 'no'} |")
    return "\n".join(lines) + "\n"


def preference_chart(summary: dict[str, Any], path: str | os.PathLike, *, question: str) -> Path:
    """Bars of the share of votes for a, tie and b with 95% intervals (all raters, and the consistent
    raters where any was left out), through :func:`img_guidance.eval.plots.score_chart`."""
    from img_guidance.eval.plots import score_chart

    def columns(block: dict[str, Any]) -> dict[str, dict[str, Any]]:
        return {
            f"{summary['a']['name']} preferred": {
                "mean": block["a"]["preferred"],
                "ci95": block["a"]["ci95"] or [None, None],
            },
            "tie": {"mean": block["ties"], "ci95": block["ties_ci95"] or [None, None]},
            f"{summary['b']['name']} preferred": {
                "mean": block["b"]["preferred"],
                "ci95": block["b"]["ci95"] or [None, None],
            },
        }

    systems = {f"all raters ({summary['raters']})": columns(summary)}
    if summary["consistency"]["excluded"]:
        systems[f"consistent raters ({summary['consistent']['raters']})"] = columns(summary["consistent"])
    return score_chart(
        systems,
        path,
        title=f"{question} ({summary['votes']} votes, {summary['pairs']} pairs)",
        ylabel="share of votes (95% CI)",
    )


def write_results(root: str | os.PathLike, summary: dict[str, Any], *, question: str) -> list[Path]:
    """Write ``results.json``, ``results.md`` and (with matplotlib) ``preference.png`` under
    ``root/results/``, each through a temporary name; returns the files written."""
    from img_guidance.outputs import check_writable, write_json_atomic

    out = Path(root) / RESULTS
    check_writable(out)
    out.mkdir(exist_ok=True)
    write_json_atomic(out / JSON_FILE, summary)
    tmp = out / f".{TABLE_FILE}.tmp"
    try:
        tmp.write_text(markdown_table(summary), encoding="utf-8")
        os.replace(tmp, out / TABLE_FILE)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    written = [out / JSON_FILE, out / TABLE_FILE]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return written
    return [*written, preference_chart(summary, out / CHART_FILE, question=question)]
