"""The ``ktray`` command: one subcommand per stage, plus data tools, the pipeline and sweeps.

Every stage subcommand takes ``CONFIG [key=value ...]``: a preset name (``tiny``,
``imagenette``, ``imagenet``) or a YAML path, then overrides such as ``cluster.k=500``. The
config is validated in full before any work starts. A stage runs whatever upstream stages
its inputs need and are not yet done in the run directory (``root`` in the config).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from ktray.config import STAGES, Config, ConfigError, load_config
from ktray.data.shards import DataError
from ktray.lifecycle import StageDamaged
from ktray.preflight import compare_stages, pipeline_stages, preflight
from ktray.schema import SchemaError
from ktray.tracking import TrackingUnavailable

_CONFIG_HELP = "preset name (tiny, imagenette, imagenet) or YAML path; default: tiny"
_EPILOG = "Overrides: key=value pairs after CONFIG, e.g. cluster.k=500 data.path=s3://bucket/shards"


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("items", nargs="*", metavar="CONFIG [key=value ...]", help=_CONFIG_HELP)


def _load(items: Sequence[str]) -> Config:
    items = list(items)
    preset = items.pop(0) if items and "=" not in items[0] else "tiny"
    return load_config(preset, items)


# --------------------------------------------------------------------------- data


def _cmd_data_pack(args: argparse.Namespace) -> None:
    from ktray.data.pack import pack

    report = pack(args.src, args.out, shard_mb=args.shard_mb, workers=args.workers,
                  follow_links=getattr(args, "follow_links", False), unlabeled=getattr(args, "unlabeled", False))
    _print_info(report)


def _cmd_data_info(args: argparse.Namespace) -> None:
    from ktray.data.pack import info

    report = info(args.path)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_info(report)


def printable(text: object) -> str:
    """``text`` safe for a terminal: control characters (escape codes) shown as escapes, never sent raw."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def _print_info(report: dict) -> None:
    classes = report["classes"]
    print(f"source:  {printable(report['source'])}")
    print(f"classes: {len(classes)}")
    print(f"bytes:   {report['bytes']:,}")
    for split, s in report["splits"].items():
        print(f"{printable(split)}: {s['images']:,} images")
        for cls, n in s["per_class"].items():
            print(f"    {printable(cls):<24} {n:>8,}")
    skipped = report["skipped"]
    print(f"skipped: {len(skipped)} files")
    for s in skipped[:20]:
        print(f"    {printable(s['path'])}: {printable(s['reason'])}")
    if len(skipped) > 20:
        print(f"    ... {len(skipped) - 20} more in pack_report.json")


def _cmd_data_sample(args: argparse.Namespace) -> None:
    from ktray.data.shards import sample_path

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out}: exists and is not an empty folder; the sample is written into a new or empty one")
    out.mkdir(parents=True, exist_ok=True)
    for f in sorted(Path(sample_path()).iterdir()):
        shutil.copy2(f, out / f.name)
    print(f"wrote the bundled sample (1,300 Imagenette images) to {out}")


def _cmd_data_fetch(args: argparse.Namespace) -> None:
    from ktray.fetch import fetch

    path = fetch(args.name_or_url, Path(args.out), sha256=args.sha256)
    print(f"downloaded {path}")
    if not args.no_pack:
        shards = str(Path(args.out) / "shards")
        _cmd_data_pack(argparse.Namespace(src=str(path), out=shards, shard_mb=256.0, workers=None))


# --------------------------------------------------------------------------- stages


def _cmd_stage(stage: str) -> Callable[[argparse.Namespace], None]:
    def run(args: argparse.Namespace) -> None:
        cfg = _load(args.items)  # validate before importing torch and Ray
        trunk = args.trunk if stage == "evaluate" else None
        preflight(cfg, pipeline_stages(cfg, stage, trunk), trunk=trunk)
        from ktray import pipeline

        extra = {"trunk": trunk} if stage == "evaluate" else {}
        out = pipeline.run_stage(cfg, stage, **extra)
        print(f"{stage}: {out.uri}")

    return run


def _cmd_run(args: argparse.Namespace) -> None:
    cfg = _load(args.items)
    preflight(cfg, pipeline_stages(cfg))  # every check that needs no stage, before the first one
    from ktray import pipeline

    pipeline.run(cfg, force=args.force)


def _cmd_compare(args: argparse.Namespace) -> None:
    cfg = _load(args.items)
    preflight(cfg, compare_stages(cfg))
    from ktray import compare

    compare.run(cfg)


def _cmd_sweep(args: argparse.Namespace) -> None:
    cfg = _load(args.items)
    preflight(cfg, pipeline_stages(cfg), sweep=True)
    from ktray import sweep

    sweep.run(cfg)


def _cmd_config(args: argparse.Namespace) -> None:
    from ktray.config import iter_fields

    cfg = _load(args.items)
    if args.fields:
        for name, _tp, f in iter_fields():
            print(f"{name:<34} {f.metadata.get('doc', '')}")
        return
    import yaml

    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")


def _cmd_export(args: argparse.Namespace) -> None:
    from ktray.export import ExportError, export

    taps = [t for t in args.taps.split(",") if t] if args.taps else None
    try:
        record = export(args.weights, args.format, args.out, image_size=args.image_size, taps=taps)
    except (ExportError, ValueError) as exc:
        raise SystemExit(f"ktray export: {printable(exc)}") from None
    entry = record["formats"][args.format]
    print(f"{record['arch']} x{record['width']:g} -> {Path(args.out) / entry['file']} "
          f"(+ preprocessing.json: {args.image_size} px, per-image standardisation)")


# --------------------------------------------------------------------------- parser


def _positive_mb(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of MB, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number of MB > 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="ktray",
        description="Self-supervised learning with knowledge transfer on Ray: Jigsaw++ teacher -> "
        "conv4 features -> k-means pseudo-labels -> student -> evaluation.",
    )
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = argparse.RawDescriptionHelpFormatter

    data = sub.add_parser("data", help="pack, inspect and fetch image shards")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    p = dsub.add_parser(
        "pack",
        help="pack images into Parquet shards",
        formatter_class=fmt,
        description="Read SRC (an ImageFolder directory train/<class>/*, val/<class>/*, a .zip or\n"
        ".tar of one, or a flat folder of unlabeled images) and write Parquet shards of the\n"
        "images schema (image_id, encoded image bytes, label, split) to OUT, plus\n"
        "OUT/pack_report.json listing counts and every skipped (undecodable) file.\n"
        "Rerunning into the same OUT writes only missing shards.",
    )
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--shard-mb", type=_positive_mb, default=256.0, help="target shard size in MB (default 256)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--follow-links", action="store_true",
                   help="follow symbolic links that stay inside SRC (default: skip and list them)")
    p.add_argument("--unlabeled", action="store_true",
                   help="pack every image without a label (a folder of images is otherwise read as classes)")
    p.set_defaults(func=_cmd_data_pack)
    p = dsub.add_parser(
        "info",
        help="counts per split and class, bytes, skipped files",
        description="Read the shards in PATH (and their pack_report.json) and print images per split\n"
        "and class, total bytes and the files skipped while packing. Writes nothing\n"
        "(rebuilds pack_report.json if it is missing or stale).",
        formatter_class=fmt,
    )
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_data_info)
    p = dsub.add_parser(
        "sample",
        help="write the bundled sample shards to OUT",
        description="Copy the bundled sample (1,300 Imagenette photos, 10 classes, 128 px, packed)\n"
        "to OUT. Reads nothing else; the tiny preset uses the sample when data.path is empty.",
        formatter_class=fmt,
    )
    p.add_argument("out")
    p.set_defaults(func=_cmd_data_sample)
    p = dsub.add_parser(
        "fetch",
        help="download a public data set (Imagenette) and pack it",
        description="Download NAME_OR_URL (imagenette-160, imagenette-320, imagenette, or any\n"
        "http(s)/file URL of an ImageFolder archive) into OUT, verify its sha256 when given,\n"
        "then pack it into OUT/shards.",
        formatter_class=fmt,
    )
    p.add_argument("name_or_url")
    p.add_argument("out")
    p.add_argument("--sha256", default=None, help="expected checksum of the download")
    p.add_argument("--no-pack", action="store_true", help="download only")
    p.set_defaults(func=_cmd_data_fetch)

    stage_docs = {
        "pretext": "Train the teacher on Jigsaw++ (or ISD: pretext.method=isd) with Ray Train. Reads the\n"
        "image shards (data.path); writes <root>/pretext-<hash>/: teacher.pt, per-epoch checkpoints\n"
        "(and permutations.npy for Jigsaw++, ema_teacher.pt for ISD).",
        "embed": "Run every image through the teacher's trunk on a Ray Data actor pool, max-pool the\n"
        "tap (embed.tap, default conv4) to a grid, optionally PCA-whiten and L2-normalise.\n"
        "Reads the shards and the teacher; writes <root>/embed-<hash>/features/*.parquet.",
        "cluster": "k-means over the features on a group of faiss actors. Reads the features; writes\n"
        "<root>/cluster-<hash>/: labels.parquet (image_id, cluster, distance), centroids.npy,\n"
        "gallery.png, objective.png, sizes.png, and NMI/ARI against real labels if known.",
        "transfer": "Train the student from scratch to classify the pseudo-labels (Ray Train), or with\n"
        "transfer.method=distill to match the teacher's similarities over a queue of its embed features.\n"
        "Reads the shards and the labels (or features); writes <root>/transfer-<hash>/student.pt.",
        "evaluate": "Freeze a trunk and measure it: linear probes per tap, kNN, few-shot, NMI.\n"
        "Reads the shards and the trunk (--trunk, default: the pipeline's student);\n"
        "writes <root>/evaluate-<hash>/results.{json,csv,md}.",
    }
    for stage in STAGES:
        p = sub.add_parser(stage, help=stage_docs[stage].split("\n")[0].rstrip(",;"), description=stage_docs[stage]
                           + " Upstream stages that are not done yet are run first.",
                           formatter_class=fmt, epilog=_EPILOG)
        _config_args(p)
        if stage == "evaluate":
            p.add_argument("--trunk", default=None,
                           help="weights file (ktray, torchvision layout or safetensors), random:<arch>[:<width>] "
                           "or torchvision:<name> (random weights); default: the student")
        p.set_defaults(func=_cmd_stage(stage))

    p = sub.add_parser("run", help="run the whole pipeline", formatter_class=fmt, epilog=_EPILOG,
                       description="pretext -> embed -> cluster -> transfer -> evaluate, skipping stages already\n"
                       "done in the run directory; prints each output and a summary table. With no\n"
                       "CONFIG it runs the tiny preset on the bundled sample.")
    _config_args(p)
    p.add_argument("--force", choices=STAGES, default=None, help="recompute from this stage on")
    p.set_defaults(func=_cmd_run)
    p = sub.add_parser("compare", help="the paper's baselines table", formatter_class=fmt, epilog=_EPILOG,
                       description="Random, Jigsaw++ (student), CC+Jigsaw++, CC+deep-Jigsaw++, CC+HOG, Supervised:\n"
                       "each evaluated the same way; writes <root>/compare-<hash>/table.{md,csv,png}.")
    _config_args(p)
    p.set_defaults(func=_cmd_compare)
    p = sub.add_parser("sweep", help="Ray Tune sweep over k and max_foreign", formatter_class=fmt, epilog=_EPILOG,
                       description="Ray Tune trials over cluster.k and pretext.max_foreign (sweep section), sharing\n"
                       "finished stages through the run directory; writes the results table and plot.")
    _config_args(p)
    p.set_defaults(func=_cmd_sweep)
    p = sub.add_parser("config", help="print the resolved config", formatter_class=fmt, epilog=_EPILOG,
                       description="Validate CONFIG with its overrides and print it as YAML (--fields: every field\n"
                       "with its documentation). Writes nothing.")
    _config_args(p)
    p.add_argument("--fields", action="store_true", help="list every field with its docstring")
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser("export", help="write a teacher or student as torchvision, safetensors, pt2 or ONNX",
                       formatter_class=fmt,
                       description="Read WEIGHTS_OR_STAGE (teacher.pt / student.pt, or a pretext or transfer stage\n"
                       "folder) and write OUT/model.{pth,safetensors,pt2,onnx} and OUT/preprocessing.json (image\n"
                       "size, the per-image standardisation, the taps). torchvision: the conv stages under\n"
                       "torchvision's key names (ResNet, VGG16-BN; AlexNet-BN as a documented module).\n"
                       "safetensors: the whole trunk. pt2/onnx: images -> taps, dynamic batch.\n"
                       "ONNX needs the onnx extra: pip install 'ktray[onnx]'.")
    p.add_argument("weights", metavar="WEIGHTS_OR_STAGE")
    p.add_argument("--format", required=True, choices=("torchvision", "safetensors", "pt2", "onnx"))
    p.add_argument("out", metavar="OUT", help="output folder (may hold other formats of the same weights)")
    p.add_argument("--image-size", type=int, default=224, help="input side S in px (default 224)")
    p.add_argument("--taps", default=None, help="pt2/onnx outputs, e.g. conv4,conv5 (default: every tap)")
    p.set_defaults(func=_cmd_export)

    from ktray.submit import cli as _cmd_submit  # light: the Ray client is imported when it runs

    p = sub.add_parser("submit", help="submit the pipeline, a sweep or a stage to a Ray cluster",
                       formatter_class=fmt, epilog=_EPILOG,
                       description="Validate CONFIG here, upload this working tree as the job's working directory\n"
                       "and submit `python jobs/<job>.py --config CONFIG ...` through the Ray Jobs API,\n"
                       "sending the cluster's token ($RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or\n"
                       "~/.ray/auth_token). Prints the job id and how to follow it. docs/cluster.md")
    _config_args(p)
    p.add_argument("--address", default=None,
                   help="Jobs API URL (default: $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS, http://127.0.0.1:8265)")
    p.add_argument("--job", default="pipeline", choices=("pipeline", "sweep", *STAGES), help="default: pipeline")
    p.add_argument("--follow", action="store_true", help="stream the logs; exit 1 unless the job succeeds")
    p.set_defaults(func=_cmd_submit)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    try:
        args.func(args)
    except ConfigError as exc:
        print(f"ktray: config error: {printable(exc)}", file=sys.stderr)
        return 2
    except (FileNotFoundError, TrackingUnavailable, DataError, StageDamaged, SchemaError) as exc:
        print(f"ktray: {printable(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:
        if args.command != "data":
            raise
        print(f"ktray: {printable(exc)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
