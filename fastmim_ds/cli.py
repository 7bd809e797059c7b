"""``fastmim-ds`` command line: prepare, check, pretrain, finetune, linprobe, export, visualize, predict.

Every training command takes ``--config FILE`` (YAML holding what differs from the defaults) and any number of
``--set section.key=value`` overrides; ``check`` validates a config for a world size before anything launches.
Configuration errors print one line (``config error: <key>: <problem>``) and exit with status 2.
``export``, ``visualize`` and ``predict`` run in one process on the CPU (no launcher).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .config import ConfigError, FinetuneCfg, LinprobeCfg, PretrainCfg, load_config

__all__ = ["main", "hostfile_world_size"]


def hostfile_world_size(path: str) -> int:
    """Total ``slots=`` of a DeepSpeed hostfile (``worker-1 slots=8`` per line)."""
    total = 0
    for line in Path(path).read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        slots = [t for t in line.split() if t.startswith("slots=")]
        if not slots:
            raise ConfigError(f"hostfile {path}: line '{line}' has no slots=N")
        total += int(slots[0].split("=", 1)[1])
    return total


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="experiment YAML (only what differs from the defaults)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. --set optim.blr=1.5e-4 (repeatable)")


def _finetune_overrides(args) -> list[str]:
    return args.set + ([f"model.pretrained={args.pretrained}"] if getattr(args, "pretrained", None) else [])


PREPARE_EXIT_STATUS = ("exit status: 0 every image converted; 1 converted, but some images were skipped (listed in "
                       "<out>/<split>_skipped.tsv); 2 bad arguments or source folder; 3 a split could not be written "
                       "or failed verification (no beton is left under its final name)")


def _int_in(lo: int, hi: int | None):
    """argparse ``type``: an int in [lo, hi] (hi None: unbounded); anything else is a usage error (exit 2)."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: '{text}'") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"{v} is outside [{lo}, {'inf' if hi is None else hi}]")
        return v

    return parse


def _prepare(args: argparse.Namespace) -> int:
    """``fastmim-ds prepare``: converts, prints one summary line per split; returns the exit status."""
    from .data.convert import ConversionError, convert_source
    from .data.sources import detect_source

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        source = detect_source(args.src, unlabeled=args.unlabeled, val_fraction=args.val_fraction, seed=args.seed,
                               image_column=args.image_column, label_column=args.label_column,
                               val_labels=args.val_labels)
        reports = convert_source(source, args.out, max_res=args.max_res, jpeg_quality=args.jpeg_quality,
                                 write_mode=args.write_mode, num_workers=args.workers)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError) as e:  # e.g. train/ and val/ with different class folders
        print(f"error: {e}", file=sys.stderr)
        return 2
    for r in reports:
        print(f"{r.split}: {r.written} written, {len(r.skipped)} skipped -> {r.beton} (skipped: {r.skipped_file})")
    print(f"verified per-class counts: {Path(args.out) / 'classes.json'}")
    return 1 if any(r.skipped for r in reports) else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastmim-ds", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="convert images (ImageFolder, unlabeled folder, ImageNet tars or Kaggle layout, "
                       "Hugging Face dataset) into FFCV .beton files",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter, epilog=PREPARE_EXIT_STATUS)
    p.add_argument("--src", required=True, help="train/<class>/* + val/<class>/*; a folder of images at any depth "
                   "(unlabeled); the ILSVRC2012 tars + devkit; Kaggle's ILSVRC/ + LOC_val_solution.csv; train/<class>/ "
                   "+ a flat val/ with a labels file; a datasets save_to_disk folder or parquet/arrow shards")
    p.add_argument("--unlabeled", action="store_true", help="ignore any classes: every image at any depth, label 0 "
                   "(pre-training only); a folder with no class layout is detected as unlabeled anyway")
    p.add_argument("--val-fraction", type=float, default=0.02,
                   help="share of the images drawn as val (seeded) when the source has no val split")
    p.add_argument("--seed", type=_int_in(0, None), default=0, help="seed of the --val-fraction draw")
    p.add_argument("--val-labels", default=None, help="labels file of a flat val/ folder ('<file>,<class>' lines)")
    p.add_argument("--image-column", default="image", help="Hugging Face datasets: the image column")
    p.add_argument("--label-column", default="label", help="Hugging Face datasets: the label column")
    p.add_argument("--out", required=True, help="output folder for train.beton, val.beton, classes.json")
    p.add_argument("--max-res", type=_int_in(0, None), default=256, help="longest stored side in px (0 = keep)")
    p.add_argument("--jpeg-quality", type=_int_in(1, 100), default=90)
    p.add_argument("--write-mode", default="jpg", choices=["jpg", "raw", "smart", "proportion"])
    p.add_argument("--workers", type=_int_in(-1, None), default=-1,
                   help="conversion threads/processes (-1 or 0 = all cores)")

    p = sub.add_parser("check", help="validate a config before launching",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("kind", choices=["pretrain", "finetune", "linprobe"])
    _add_config_args(p)
    p.add_argument("--world-size", type=int, default=1, help="ranks per node (NUM_GPUS)")
    p.add_argument("--hostfile", default=None, help="DeepSpeed hostfile; its slots give the world size")
    p.add_argument("--pretrained", default=None)

    p = sub.add_parser("pretrain", help="masked image modeling pre-training (run under `deepspeed`)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_config_args(p)
    p.add_argument("--resume", default=None, help="'auto' (newest checkpoint of the run) or a checkpoint tag folder")

    p = sub.add_parser("finetune", help="fine-tune + evaluate a classifier (run under `deepspeed`)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_config_args(p)
    p.add_argument("--pretrained", default=None, help="pre-training run folder, checkpoint or .pth/.safetensors")
    p.add_argument("--resume", default=None, help="'auto' or a checkpoint tag folder")

    p = sub.add_parser("linprobe", help="linear probe of the frozen pre-trained encoder (run under `deepspeed`)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_config_args(p)
    p.add_argument("--pretrained", default=None, help="pre-training run folder, checkpoint or .pth/.safetensors")
    p.add_argument("--resume", default=None, help="'auto' or a checkpoint tag folder")

    p = sub.add_parser("export", help="write a run's weights as timm weights (.safetensors + pretrained_cfg)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       epilog="pre-training runs give the encoder (no head); fine-tuning and linear-probe runs the "
                              "classifier with its class names")
    p.add_argument("checkpoint", help="run folder, <run>/ckpt or a checkpoint tag folder")
    p.add_argument("--out", default="model.safetensors",
                   help="a .safetensors file, or a folder (model.safetensors + config.json: timm 'local-dir:')")

    p = sub.add_parser("visualize", help="reconstruction grid of a pre-training run: input, masked, target, prediction",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", help="pre-training run folder, <run>/ckpt or a checkpoint tag folder")
    p.add_argument("--images", required=True, nargs="+", help="image files and/or folders (searched recursively, "
                   "sorted); the first --num-images are shown")
    p.add_argument("--out", default="reconstructions.png", help="PNG to write")
    p.add_argument("--num-images", type=_int_in(1, 64), default=4, help="rows (the first images of --images)")
    p.add_argument("--seed", type=_int_in(0, None), default=0, help="mask seed")
    p.add_argument("--panel", type=_int_in(16, 1024), default=128, help="panel side in px")

    p = sub.add_parser("knn", help="weighted k-NN top-1 of an encoder's frozen features (train = bank, val = queries)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       epilog="SOURCE: a pre-training run folder or checkpoint tag (its encoder), a pre-training YAML "
                              "config (the encoder as that run starts: the untrained baseline), or timm:<name>")
    p.add_argument("source", help="run folder, checkpoint tag, pre-training YAML config or timm:<name>")
    p.add_argument("--train", default=None, help="train .beton (the bank); default: the source config's data.train")
    p.add_argument("--val", default=None, help="val .beton (the queries); default: the source config's data.val")
    p.add_argument("--img-size", type=_int_in(8, None), default=None, help="default: the source config's")
    p.add_argument("--k", type=_int_in(1, None), default=20, help="neighbours")
    p.add_argument("--temperature", type=float, default=0.07, help="vote weight exp(cosine / temperature)")
    p.add_argument("--bank-images", type=_int_in(0, None), default=0, help="train images in the bank (0 = all)")
    p.add_argument("--batch-size", type=_int_in(1, None), default=256)
    p.add_argument("--workers", type=_int_in(1, None), default=2, help="FFCV decoding threads")
    p.add_argument("--json", default=None, help="also write the result as JSON to this file")

    p = sub.add_parser("predict", help="classify images with a fine-tuned run or an exported classifier",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("weights", help="fine-tuning/linear-probe run (or checkpoint tag), or exported .safetensors/folder")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--topk", type=_int_in(1, None), default=1, help="classes printed per image")
    return parser


def _export(args: argparse.Namespace) -> int:
    from .export import export, timm_call

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    weights, config = export(args.checkpoint, args.out)
    kind = config["fastmim_ds"]["kind"]
    print(f"exported {config['architecture']} ({kind}, {config['num_classes']} classes) -> {weights}")
    print(f"load with timm (import fastmim_ds first for mixmim_* models):\n  {timm_call(args.out, config)}")
    return 0


def _visualize(args: argparse.Namespace) -> int:
    from .visualize import visualize

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    print(visualize(args.checkpoint, args.images, args.out, num_images=args.num_images, seed=args.seed,
                    panel=args.panel))
    return 0


def _knn(args: argparse.Namespace) -> int:
    import json

    import torch

    from .data import dataset_info, eval_loader
    from .knn import encoder_features, knn_evaluate, load_source
    from .quality import spread_indices

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    model, data = load_source(args.source, img_size=args.img_size)
    train, val = args.train or data["train"], args.val or data["val"]
    if not train or not val:
        raise FileNotFoundError(f"{args.source}: name the data with --train and --val")
    cpu = torch.device("cpu")
    common = dict(img_size=data["img_size"], batch_size=args.batch_size, crop_ratio=224 / 256,
                  num_workers=args.workers, rank=0, world_size=1, device=cpu)
    info = dataset_info(train)
    bank = eval_loader(train, indices=spread_indices(info.num_images, args.bank_images), **common)
    queries = eval_loader(val, **common)
    result = knn_evaluate(encoder_features(model), bank, queries, num_classes=info.num_classes, device=cpu, k=args.k,
                          temperature=args.temperature, model=model)
    result.update(source=args.source, train=train, val=val, img_size=data["img_size"], k=args.k,
                  temperature=args.temperature)
    print(f"k-NN top-1 {result['knn_top1']:.2f}% | k {args.k}, temperature {args.temperature} | bank "
          f"{result['knn_bank']} train images, {result['knn_queries']} val queries at {data['img_size']} px | "
          f"{result['knn_seconds']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from .inference import Predictor

    predictor = Predictor.load(args.weights)
    for image in args.images:
        top = predictor.predict(image, topk=args.topk)
        print(f"{image}\t" + "\t".join(f"{p.index}:{p.name}:{p.score:.4f}" + (f" ({p.description})" if p.description
                                                                                   else "") for p in top))
    return 0


def _train(args) -> None:
    """Runs ``pretrain`` / ``finetune`` / ``linprobe`` on this rank, then closes the process group (only after
    the run ended normally on this rank; see :func:`runtime.close_distributed`)."""
    import importlib

    from .runtime import close_distributed

    if args.command == "pretrain":
        cfg = load_config(PretrainCfg, args.config, args.set)
    else:
        cfg = load_config(LinprobeCfg if args.command == "linprobe" else FinetuneCfg, args.config,
                          _finetune_overrides(args))
    importlib.import_module(f".{args.command}", __package__).main(cfg, resume=args.resume)
    close_distributed()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "prepare":
            return _prepare(args)
        if args.command == "check":
            from .checks import check_finetune, check_pretrain

            world = hostfile_world_size(args.hostfile) if args.hostfile else args.world_size
            if args.kind == "pretrain":
                cfg = load_config(PretrainCfg, args.config, args.set)
                derived = check_pretrain(cfg, world)
            elif args.kind == "linprobe":
                from .linprobe import check_linprobe

                derived = check_linprobe(load_config(LinprobeCfg, args.config, _finetune_overrides(args)), world)
            else:
                cfg = load_config(FinetuneCfg, args.config, _finetune_overrides(args))
                derived = check_finetune(cfg, world)
            print(f"config ok: world size {derived.world_size}, effective batch {derived.eff_batch}, "
                  f"lr {derived.lr:.4g}")
            return 0
        if args.command in ("pretrain", "finetune", "linprobe"):
            _train(args)
            return 0
        if args.command in ("export", "visualize", "predict", "knn"):
            try:
                return {"export": _export, "visualize": _visualize, "predict": _predict,
                        "knn": _knn}[args.command](args)
            except ValueError as e:  # a checkpoint of the wrong kind, weights that do not fit the architecture
                print(f"error: {e}", file=sys.stderr)
                return 2
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # unwritable output dir, no room for a checkpoint (checked before training)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # engine.TrainingDiverged: names the step, lr and last good checkpoint
        print(f"training stopped: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
