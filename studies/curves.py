"""Quality curves of a finished pre-training run, read from its checkpoints: for the initialisation (the run's YAML
config) and every kept checkpoint tag, the reconstruction skill and the weighted k-NN top-1, measured exactly as
during training (fastmim_ds.quality.QualityMonitor, one rank, centre crops at the run's size).

    python studies/curves.py RUN_DIR CONFIG.yaml --val data/imagenette128/val.beton --out results.jsonl

The study runs were started before the in-training signals existed; later runs log the same fields in their
metrics.jsonl (``eval.skill_every``, ``eval.knn_every``).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fastmim_ds.checkpoint import CKPT_SUBDIR, complete_tags, read_client_state
from fastmim_ds.config import PretrainEvalCfg
from fastmim_ds.data import dataset_info
from fastmim_ds.methods import initial_mim_model
from fastmim_ds.quality import QualityMonitor
from fastmim_ds.visualize import load_mim_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("config", help="the run's pre-training YAML (its initialisation is the first point)")
    ap.add_argument("--val", required=True)
    ap.add_argument("--bank-images", type=int, default=0, help="k-NN bank size, spread over the train set (0 = all)")
    ap.add_argument("--knn", action="store_true", help="also the k-NN top-1 at every point (the skill ratio always)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    init, cfg = initial_mim_model(args.config)
    ev = PretrainEvalCfg(skill_every=1, knn_every=int(args.knn), knn_bank_images=args.bank_images)
    num_classes = dataset_info(cfg.data.train).num_classes
    mon = QualityMonitor(ev, train=cfg.data.train, val=args.val, num_classes=num_classes,
                         rank=0, world_size=1, device=torch.device("cpu"), num_workers=2)
    points = [("init", 0, init)]
    for tag in complete_tags(Path(args.run) / CKPT_SUBDIR):
        done = read_client_state(tag)["epoch"]  # the loop state names the next epoch: the number of epochs done
        points.append((tag.name, done, load_mim_model(tag)[0]))
    out = Path(args.out)
    measured = {json.loads(line)["tag"] for line in out.read_text().splitlines()} if out.is_file() else set()
    for tag, epochs_done, model in points:
        if tag in measured:
            continue
        t0 = time.time()
        row = {"tag": tag, "epochs_done": epochs_done, **mon(model, 0, cfg.data.img_size)}
        row["seconds"] = round(time.time() - t0, 1)
        print(json.dumps(row), flush=True)
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
