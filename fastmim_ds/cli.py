"""``fastmim-ds`` command line: prepare, check, pretrain, finetune.

Every training command takes ``--config FILE`` (YAML holding what differs from the defaults) and any number of
``--set section.key=value`` overrides; ``check`` validates a config for a world size before anything launches.
Configuration errors print one line (``config error: <key>: <problem>``) and exit with status 2.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .config import ConfigError, FinetuneCfg, PretrainCfg, dump_yaml, load_config

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastmim-ds", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="convert an ImageFolder (train/, val/) into FFCV .beton files",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--src", required=True, help="folder with train/<class>/* and val/<class>/*")
    p.add_argument("--out", required=True, help="output folder for train.beton, val.beton, classes.json")
    p.add_argument("--max-res", type=int, default=256, help="longest stored side in px (0 = keep)")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--write-mode", default="jpg", choices=["jpg", "raw", "smart", "proportion"])
    p.add_argument("--workers", type=int, default=-1, help="conversion threads/processes (-1 = all cores)")

    p = sub.add_parser("check", help="validate a config before launching", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("kind", choices=["pretrain", "finetune"])
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "prepare":
            logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
            from .data.convert import convert_image_folder

            reports = convert_image_folder(args.src, args.out, max_res=args.max_res, jpeg_quality=args.jpeg_quality,
                                           write_mode=args.write_mode, num_workers=args.workers)
            for r in reports:
                counts = ", ".join(f"{c}: {n}" for c, n in r.per_class.items())
                print(f"{r.split}: {r.written} images, {len(r.skipped)} skipped -> {Path(args.out) / (r.split + '.beton')}")
                print(f"  per class: {counts}")
                if r.skipped:
                    print(f"  skipped files listed in {Path(args.out) / (r.split + '_skipped.tsv')}")
            return 1 if any(r.skipped for r in reports) else 0
        if args.command == "check":
            from .validate import check_finetune, check_pretrain

            world = hostfile_world_size(args.hostfile) if args.hostfile else args.world_size
            if args.kind == "pretrain":
                cfg = load_config(PretrainCfg, args.config, args.set)
                derived = check_pretrain(cfg, world)
            else:
                cfg = load_config(FinetuneCfg, args.config, _finetune_overrides(args))
                derived = check_finetune(cfg, world)
            print(f"config ok: world size {derived.world_size}, effective batch {derived.eff_batch}, "
                  f"lr {derived.lr:.4g}")
            return 0
        if args.command == "pretrain":
            from . import pretrain

            pretrain.main(load_config(PretrainCfg, args.config, args.set), resume=args.resume)
            return 0
        if args.command == "finetune":
            from . import finetune

            finetune.main(load_config(FinetuneCfg, args.config, _finetune_overrides(args)), resume=args.resume)
            return 0
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
