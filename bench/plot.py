"""Plot bench/results.json: time and peak memory per case and method (bench/results.png).

    python bench/plot.py [results.json] [out.png]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ["cpp", "cpp-keep", "torch", "naive", "cce"]
COLORS = {"cpp": "#1f77b4", "cpp-keep": "#7fb3de", "torch": "#9467bd", "naive": "#d62728", "cce": "#2ca02c"}


def plot(data: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = data["results"]
    names = [r["name"].replace(" prompt", "") for r in results]
    fig, (ax_t, ax_m) = plt.subplots(2, 1, figsize=(max(8, 1.1 * len(results)), 8), sharex=True)
    width = 0.8 / len(ORDER)
    for j, m in enumerate(ORDER):
        xs, ts, ms = [], [], []
        for i, r in enumerate(results):
            row = r["rows"].get(m, {})
            if "times" not in row:
                continue
            t = sorted(row["times"])[len(row["times"]) // 2]
            xs.append(i + (j - len(ORDER) / 2 + 0.5) * width)
            ts.append(t / r["floor"]["floor3"])
            ms.append(row["peak_mib"])
        ax_t.bar(xs, ts, width, label=m, color=COLORS[m])
        ax_m.bar(xs, ms, width, label=m, color=COLORS[m])
    for i, r in enumerate(results):
        ax_t.hlines(r["floor"]["floor4"] / r["floor"]["floor3"], i - 0.4, i + 0.4, colors="k", linestyles="dashed")
        ax_m.hlines(r["grad_mib"] + 64, i - 0.4, i + 0.4, colors="k", linestyles="dashed")
    ax_t.axhline(1.0, color="k", lw=0.8)
    ax_t.set_ylabel("time / 3-GEMM floor\n(dashed: 4-GEMM floor)")
    ax_m.set_ylabel("peak extra MiB (log)\n(dashed: gradients + 64 MiB)")
    ax_m.set_yscale("log")
    ax_m.set_xticks(range(len(results)))
    ax_m.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax_t.legend(ncol=len(ORDER), fontsize=8)
    info = data["machine"]
    fig.suptitle(f"forward + backward, {info['cpu']} ({info['cores']} cores), torch {info['torch']}, {info['date']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


if __name__ == "__main__":
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "results.json"
    dst = Path(sys.argv[2]) if len(sys.argv) > 2 else HERE / "results.png"
    print(plot(json.loads(src.read_text()), dst))
