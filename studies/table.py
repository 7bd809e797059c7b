"""Prints the README tables of the pre-training study from studies/results/<row>/ (JSON/JSONL written by
studies/run_study.sh): one row per encoder with k-NN, linear probe and fine-tuning top-1, and the pre-training runs
with their budget and skill curve.

    python studies/table.py [studies/results]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROWS = {"scratch": "from scratch (the runs' initialisation)", "hog": "FastMIM, HOG target",
        "pixel": "FastMIM, pixel target"}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _top1(path: Path) -> str:
    rows = [r for r in _jsonl(path) if "val_top1" in r]
    return f"{rows[-1]['val_top1']:.2f}" if rows else "–"


def main(root: Path) -> None:
    print("| encoder | k-NN top-1 | linear probe | fine-tune, 10 % labels | fine-tune, 100 % labels |")
    print("|---|---|---|---|---|")
    for row, name in ROWS.items():
        d = root / row
        knn = json.loads((d / "knn.json").read_text())["knn_top1"] if (d / "knn.json").is_file() else None
        cells = [f"{knn:.2f}" if knn is not None else "–", _top1(d / "linprobe.jsonl"),
                 _top1(d / "finetune_10pct.jsonl"), _top1(d / "finetune.jsonl")]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print()
    print("| pre-training | epochs | steps | wall time | img/s | last epoch's loss "
          "| skill ratio (init, then every 2 epochs) |")
    print("|---|---|---|---|---|---|---|")
    for row in ("hog", "pixel"):
        d = root / row
        rows = _jsonl(d / "pretrain.jsonl")
        epochs = [r for r in rows if "epoch_end" in r]
        if not epochs:
            continue
        steps = max(r["step"] for r in rows if "step" in r)
        wall = epochs[-1]["relative_time"]
        img_s = sum(r["img_per_s"] for r in epochs) / len(epochs)
        curve = " → ".join(f"{r['skill_ratio']:.3f}" for r in _jsonl(d / "curve.jsonl"))
        print(f"| {ROWS[row]} | {len(epochs)} | {steps} | {wall / 60:.0f} min | {img_s:.1f} | "
              f"{epochs[-1]['train_loss']:.4f} | {curve or '–'} |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "studies/results"))
