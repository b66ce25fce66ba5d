"""The one table and the one chart of a run."""
from __future__ import annotations

from .common import Run

COLUMNS = (("many", "many callers / batched"), ("one", "one caller, one at a time"))


def rows(runs: list[Run]) -> dict[str, dict[str, Run]]:
    out: dict[str, dict[str, Run]] = {}
    for run in runs:
        out.setdefault(run.row or run.peer, {})[run.column] = run
    return out


def _cells(run: Run | None) -> list[str]:
    if run is None:
        return ["—", "—"]
    per = "" if run.latency_of == "payment" else f" per {run.latency_of}"
    return [f"{run.rate:,.0f}",
            f"{run.percentile_ms(50):.3g} / {run.percentile_ms(99):.3g}{per}"]


def table(runs: list[Run], started: str, load: str) -> str:
    """Markdown: payments/s and latency p50/p99 (ms) per peer and column,
    and what each figure measured."""
    lines = [f"Peers benchmark, {started} ({load})", "",
             "| peer | many callers / batched: payments/s | p50 / p99 ms | "
             "one caller, one at a time: payments/s | p50 / p99 ms | measured |",
             "|---|--:|--:|--:|--:|---|"]
    for name, cols in rows(runs).items():
        many, one = cols.get("many"), cols.get("one")
        how = "; ".join(f"{label}: {r.payments:,} payments, {r.how}"
                        for (key, label), r in zip(COLUMNS, (many, one)) if r is not None)
        lines.append("| " + " | ".join([name, *_cells(many), *_cells(one), how]) + " |")
    return "\n".join(lines)


def chart(runs: list[Run], path: str, subtitle: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table_rows = rows(runs)
    names = list(table_rows)
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(names) + 1.6), dpi=90)
    height = 0.38
    for k, ((key, label), color) in enumerate(zip(COLUMNS, ("#3b6ea5", "#e09f3e"))):
        ys, xs = [], []
        for i, name in enumerate(names):
            run = table_rows[name].get(key)
            if run is not None:
                ys.append(i + (k - 0.5) * height)
                xs.append(run.rate)
        bars = ax.barh(ys, xs, height=height, color=color, label=label)
        ax.bar_label(bars, labels=[f"{x:,.0f}" for x in xs], padding=3, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("payments per second (log scale); every peer ended in Scanpay's state")
    ax.set_title(f"Scan-to-pay with coupons: Scanpay and its peers\n{subtitle}", fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_xlim(right=max(r.rate for r in runs) * 8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
