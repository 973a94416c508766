"""Bar charts of the whole-step benchmark: ``bench/results_step.json`` -> ``bench/results_step.png``.

    python bench/plot_step.py [--json bench/results_step.json] [--out bench/results_step.png]

One row of panels per mode (LoRA, full fine-tuning): pairs per second and whole-process peak memory per
configuration, TRL in grey, fastpref in blue; rows that did not run (n/a, failed) are left out.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
GIB = 1 << 30


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in results["settings"]["modes"]
             if any(r.get("mode") == m and r.get("status") == "ok" for r in results.get("runs", []))]
    if not modes:
        raise SystemExit("plot_step: no successful training rows in the results")
    fig, axes = plt.subplots(len(modes), 2, figsize=(12, 3.2 + 0.35 * len(results["runs"]) / len(modes)),
                             squeeze=False)
    for i, mode in enumerate(modes):
        rows = [r for r in results["runs"] if r.get("mode") == mode and r.get("status") == "ok"]
        names = [r["config"] for r in rows]
        colors = ["#8c8c8c" if r["system"] == "trl" else "#1f77b4" for r in rows]
        title = "LoRA r=16" if mode == "lora" else "full fine-tuning"
        for ax, key, label, scale in ((axes[i][0], "pairs_per_s", "pairs / s (higher is better)", 1.0),
                                      (axes[i][1], "whole_peak", "whole-process peak, GiB (lower is better)", GIB)):
            vals = [r[key] / scale for r in rows]
            ax.barh(range(len(rows)), vals, color=colors)
            ax.set_yticks(range(len(rows)))
            ax.set_yticklabels(names, fontsize=8)
            ax.invert_yaxis()
            ax.set_xlabel(label, fontsize=9)
            ax.set_title(f"{title}: {label.split(',')[0].split(' (')[0]}", fontsize=10)
            for y, v in enumerate(vals):
                ax.text(v, y, f" {v:.3g}", va="center", fontsize=7)
    s = results["settings"]
    fig.suptitle(f"SmolLM2-135M DPO step, {s['pairs']} pairs x {s['steps']} steps, max {s['max_length']} tokens "
                 f"({results['machine'].get('cpu')}, {results['machine'].get('cores')} cores)"
                 + (" - QUICK smoke run" if s.get("quick") else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=str(HERE / "results_step.json"))
    ap.add_argument("--out", default=str(HERE / "results_step.png"))
    args = ap.parse_args(argv)
    path = Path(args.json)
    if not path.is_file():
        raise SystemExit(f"plot_step: {path}: no such file (run bench/step_vs_trl.py first)")
    plot(json.loads(path.read_text()), Path(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
