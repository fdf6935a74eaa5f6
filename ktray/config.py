"""Typed, frozen configuration for every stage, loaded from YAML presets.

A config is a tree of frozen dataclasses. Every field is declared with :func:`param`,
which carries its docstring and its constraints, so that validation, error messages,
``ktray config --help``-style listings and the reliability tests that try an invalid
value for every field are all generated from one declaration.

    cfg = load_config("configs/tiny.yaml", ["cluster.k=500"])
    cfg.cluster.k  # 500

Unknown keys, wrong types and out-of-range values raise :class:`ConfigError` naming the
field (``cluster.k``) and what it accepts, before any work starts.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

STAGES = ("pretext", "embed", "cluster", "transfer", "evaluate")  # the pipeline's stages in order
PRESETS_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type or out of range."""


def param(
    default: Any,
    doc: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    pattern: str | None = None,
) -> Any:
    """Declare a config field with its docstring, numeric bounds and, for strings, a full-match regex."""
    meta = {"doc": doc, "ge": ge, "gt": gt, "le": le, "lt": lt, "pattern": pattern}
    if isinstance(default, (list, dict)):
        raise TypeError("use tuples for sequence defaults: configs are frozen")
    return field(default=default, metadata=meta)


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _coerce(name: str, tp: Any, value: Any) -> Any:
    """Return ``value`` as type ``tp`` or raise ConfigError naming ``name``."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{name}: expected {_describe(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp) or isinstance(value, bool) != any(
            isinstance(a, bool) for a in typing.get_args(tp)
        ):
            raise bad
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(name, arg, value)
            except ConfigError:
                continue
        raise bad
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad
        (item_tp, *_rest) = typing.get_args(tp)
        return tuple(_coerce(f"{name}[{i}]", item_tp, v) for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        if not math.isfinite(value):
            raise ConfigError(f"{name}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise TypeError(f"{name}: unsupported config type {tp!r}")


def _check_bounds(name: str, meta: dict[str, Any], value: Any) -> None:
    items = value if isinstance(value, tuple) else (value,)
    for v in items:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        for key, ok, word in (
            ("ge", lambda a, b: a >= b, ">="),
            ("gt", lambda a, b: a > b, ">"),
            ("le", lambda a, b: a <= b, "<="),
            ("lt", lambda a, b: a < b, "<"),
        ):
            bound = meta.get(key)
            if bound is not None and not ok(v, bound):
                raise ConfigError(f"{name}: must be {word} {bound}, got {v!r}")


def _check_pattern(name: str, meta: dict[str, Any], value: Any) -> None:
    pattern = meta.get("pattern")
    if pattern is not None and isinstance(value, str) and not re.fullmatch(pattern, value):
        raise ConfigError(f"{name}: must match {pattern} (letters, digits and {SAFE_PUNCT!r}), got {value!r}")


# Names that end up in file names, shard filters, run names or job ids: no '/', no '..', nothing a
# shell or a path could read as more than one word, so a config can never point outside the run root.
SAFE_PUNCT = "_-.:=,"
SAFE_NAME = r"(?!\.)[A-Za-z0-9_\-.:=,]{1,128}"
SPLIT_NAME = r"[A-Za-z0-9_]{1,64}"  # the split part of a shard file name (data._SHARD_RE)

# The largest sizes a config may ask for. A --trunk spec, a weights file's width and a labels
# table's k are held to the same bounds, so no size read from a file allocates beyond them.
MAX_WIDTH = 4.0  # channel width multiplier of a trunk
MAX_K = 100_000  # clusters (or classes) of a labels table: ImageNet-21k's 21,841 classes fit


class Section:
    """Base of every config section: validates its fields on construction."""

    _prefix: typing.ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            name = f"{self._prefix}.{f.name}" if self._prefix else f.name
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(hints[f.name]):
                continue
            coerced = _coerce(name, hints[f.name], value)
            _check_bounds(name, dict(f.metadata), coerced)
            _check_pattern(name, dict(f.metadata), coerced)
            object.__setattr__(self, f.name, coerced)
        self.check()

    def check(self) -> None:
        """Cross-field rules; raise ConfigError naming the field."""

    @classmethod
    def from_dict(cls, data: dict[str, Any], prefix: str = "") -> Section:
        if not isinstance(data, dict):
            raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
        hints = typing.get_type_hints(cls)
        known = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in known:
                allowed = ", ".join(sorted(known))
                raise ConfigError(f"{name}: unknown key; allowed keys here: {allowed}")
            tp = hints[key]
            if dataclasses.is_dataclass(tp):
                value = tp.from_dict(value, name)  # type: ignore[union-attr]
            kwargs[key] = value
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, Section):
                out[f.name] = value.to_dict()
            elif isinstance(value, tuple):
                out[f.name] = list(value)
            else:
                out[f.name] = value
        return out


def _section(prefix: str):
    """Make a frozen dataclass section whose errors are prefixed with ``prefix``."""

    def wrap(cls: type) -> type:
        cls._prefix = prefix  # type: ignore[attr-defined]
        return dataclass(frozen=True)(cls)

    return wrap


Arch = Literal["alexnet", "vgg16", "resnet18", "resnet50"]
Device = Literal["auto", "cpu", "cuda"]
Tap = Literal["conv1", "conv2", "conv3", "conv4", "conv5"]
CompareRow = Literal[
    "random", "jigsaw", "cc_jigsaw", "cc_deep", "cc_hog", "supervised", "isd", "cc_isd", "distill_deep"
]


@_section("data")
class DataConfig(Section):
    path: str = param("", "Directory or URI of packed image shards; empty means the bundled sample.")
    train_split: str = param("train", "Split used for training every stage.", pattern=SPLIT_NAME)
    val_split: str = param("val", "Split used only for evaluation.", pattern=SPLIT_NAME)
    limit: int = param(0, "Use this many images per split, the classes in turn (0: all). For smoke tests.", ge=0)
    decode_batch_size: int = param(64, "Images decoded per Ray Data batch.", ge=1)
    long_tail: float = param(
        0.0,
        "Long-tailed train split: imbalance ratio r (largest / smallest class) of a subset chosen by the real "
        "labels, class counts falling off geometrically; the labels are then hidden as always. 0 or 1: off.",
        ge=0,
    )
    long_tail_seed: int = param(0, "Seed of the long-tailed subset (class order and which images stay).", ge=0)

    def check(self) -> None:
        if 0 < self.long_tail < 1:
            raise ConfigError(
                f"data.long_tail: must be 0 (off) or >= 1 (largest / smallest class), got {self.long_tail}"
            )


@_section("compute")
class ComputeConfig(Section):
    device: Device = param("auto", "auto: GPUs when the Ray cluster has them, else CPU.")
    num_workers: int = param(2, "Ray Train workers for the training stages.", ge=1)
    cpus_per_worker: float = param(
        1.0,
        "CPUs reserved per Ray Train worker; a fraction leaves cores to the Ray Data tasks that "
        "build the batches (needed when workers x CPUs would take every core, e.g. 2 workers on 2 cores).",
        gt=0,
    )
    threads_per_worker: int = param(
        0,
        "CPU only: torch intra-op threads per Ray Train worker (0: one per reserved CPU, at least one). "
        "More than reserved overlaps the model with the Ray Data tasks that feed it (1 worker x 2 threads "
        "on 2 cores beat 2 workers x 1 by 1.12x: 281 against 251 puzzles/s, tiny teacher).",
        ge=0,
    )
    amp: bool = param(
        True, "bf16 autocast where it is faster than float32: on GPU, and on CPUs with AMX (else float32)."
    )
    max_failures: int = param(
        3,
        "Training worker failures (a killed process, a lost spot node) survived per training stage: the worker "
        "group restarts from the last epoch checkpoint. -1: no limit; 0: fail at once.",
        ge=-1,
    )


@_section("pretext")
class PretextConfig(Section):
    method: Literal["jigsaw", "isd"] = param(
        "jigsaw", "Pretext task: Jigsaw++ (Noroozi et al. 2018) or ISD (Tejankar et al. 2020; settings in `isd`)."
    )
    arch: Arch = param("vgg16", "Teacher architecture (the paper: VGG16).")
    width: float = param(1.0, "Channel width multiplier of the trunk.", gt=0, le=MAX_WIDTH)
    num_permutations: int = param(1000, "Permutations in the set (the paper: 1000; release: 701).", ge=2)
    min_hamming: int = param(3, "Guaranteed minimum pairwise Hamming distance of the set.", ge=1, le=9)
    permutation_seed: int = param(0, "Seed of the greedy permutation search.", ge=0)
    crop: int = param(225, "Side of the random crop the 3x3 grid is cut from (px).", ge=12)
    tile: int = param(64, "Side of each tile (px); must fit in a cell of crop // 3.", ge=4)
    max_foreign: int = param(2, "Tiles replaced by another image's tiles: uniform in 0..max_foreign.", ge=0, le=8)
    grey_prob: float = param(0.5, "Probability that a puzzle is made greyscale.", ge=0, le=1)
    channel_shift: int = param(2, "Max per-channel shift in px (against chromatic aberration).", ge=0)
    epochs: int = param(70, "Training epochs.", ge=1)
    batch_size: int = param(256, "Puzzles per optimizer step, over all workers.", ge=1)
    lr: float = param(0.01, "SGD learning rate.", gt=0)
    momentum: float = param(0.9, "SGD momentum.", ge=0, lt=1)
    weight_decay: float = param(5e-4, "SGD weight decay.", ge=0)
    lr_step_epochs: int = param(30, "Multiply the learning rate by 0.1 every this many epochs.", ge=1)
    val_puzzles: int = param(1000, "Fixed held-out puzzles scored every epoch.", ge=1)
    image_size: int = param(
        256, "Images are resized (short side) and center-cropped to this side before the random crop.", ge=12
    )
    color_jitter: float = param(
        0.2, "Per-tile, per-channel gain jitter: each channel scaled by U[1-j, 1+j] (against colour shortcuts).",
        ge=0, lt=1,
    )
    tile_dim: int = param(512, "Per-tile fc width of the Jigsaw head (the paper's fc6: 512).", ge=1)
    hidden: int = param(4096, "Width of the fc layer over the 9 concatenated tiles (the paper's fc7: 4096).", ge=1)
    val_fraction: float = param(
        0.01, "Fraction of train images (chosen by a hash of image_id) held out for the validation puzzles.",
        gt=0, lt=1,
    )
    puzzles_per_image: int = param(
        1, "Puzzles built from each image per epoch (own crop, permutation, foreign tiles); >1 for small data.",
        ge=1,
    )
    shuffle_images: bool = param(
        True,
        "Shuffle image rows (Ray Data random_shuffle) every epoch before puzzles are built, so foreign "
        "tiles (taken from other rows of a batch) come from random images, not class-sorted neighbours.",
    )

    def check(self) -> None:
        # Singleton bound of permutation codes: at most 9! / (d - 1)! permutations of 9 tiles
        # differ pairwise in d places, so a larger set cannot be found, however long the search.
        most = math.factorial(9) // math.factorial(self.min_hamming - 1)
        if self.num_permutations > most:
            raise ConfigError(
                f"pretext.num_permutations: at most {most:,} permutations of 9 tiles can differ pairwise in "
                f"min_hamming = {self.min_hamming} places, got {self.num_permutations}"
            )
        if self.tile > self.crop // 3:
            raise ConfigError(
                f"pretext.tile: must be <= crop // 3 = {self.crop // 3} (a tile lies in one cell), got {self.tile}"
            )
        if self.tile + self.channel_shift > self.crop // 3:
            raise ConfigError(
                f"pretext.channel_shift: tile + channel_shift must fit in a cell of crop // 3 = "
                f"{self.crop // 3} px, got {self.tile} + {self.channel_shift}"
            )
        if self.crop > self.image_size:
            raise ConfigError(
                f"pretext.crop: must be <= pretext.image_size = {self.image_size}, got {self.crop}"
            )


@_section("isd")
class IsdConfig(Section):
    view_size: int = param(224, "Side (px) of each augmented view (random resized crop of the image).", ge=16)
    teacher_aug: Literal["weak", "strong"] = param(
        "weak", "Teacher's view: weak (crop + flip; ISD's later variant) or the student's strong augmentation."
    )
    min_scale: float = param(0.2, "Smallest area fraction of the random resized crops.", gt=0, le=1)
    proj_dim: int = param(128, "Output width of the projection head (the embedding the queue holds).", ge=2)
    proj_hidden: int = param(2048, "Hidden width of the projection and prediction MLPs.", ge=1)
    queue_size: int = param(128000, "Teacher embeddings in the FIFO queue of anchors (the paper: 128k).", ge=1)
    ema: float = param(0.999, "Momentum of the EMA teacher: t <- m t + (1 - m) s (ISD: 0.999; later 0.99).", ge=0, lt=1)
    t_teacher: float = param(0.02, "Teacher's softmax temperature (ISD: 0.02; later variant 0.01).", gt=0)
    t_student: float = param(0.02, "Student's softmax temperature (ISD: 0.02; later variant 0.1).", gt=0)
    epochs: int = param(200, "Training epochs.", ge=1)
    batch_size: int = param(256, "Images per optimizer step, over all workers.", ge=2)
    lr: float = param(0.05, "SGD learning rate (ISD: 0.05).", gt=0)
    momentum: float = param(0.9, "SGD momentum.", ge=0, lt=1)
    weight_decay: float = param(1e-4, "SGD weight decay.", ge=0)
    lr_step_epochs: int = param(140, "Multiply the learning rate by 0.1 every this many epochs.", ge=1)
    image_size: int = param(256, "Images are decoded with their short side at most this (px) before cropping.", ge=16)

    def check(self) -> None:
        if self.view_size > self.image_size:
            raise ConfigError(f"isd.view_size: must be <= isd.image_size = {self.image_size}, got {self.view_size}")


@_section("embed")
class EmbedConfig(Section):
    tap: Tap = param("conv4", "Trunk layer whose activations are clustered (the paper: conv4).")
    grid: int = param(4, "Max-pool the tap to grid x grid (the paper: 5 for AlexNet, 4 for VGG16).", ge=1)
    image_size: int = param(224, "Images are resized and center-cropped to this side (px).", ge=16)
    pca_dim: int = param(0, "PCA-whiten to this many dimensions (0: off; DeepCluster: 256).", ge=0)
    l2_normalize: bool = param(True, "L2-normalise the features (after PCA, as DeepCluster).")
    batch_size: int = param(64, "Images per forward pass.", ge=1)
    num_actors: int = param(1, "Embedding actors (one GPU each on a GPU cluster).", ge=1)
    pca_sample: int = param(10000, "Images the PCA-whitening is fitted on (a seeded sample).", ge=2)
    split: str = param(
        "", "Split to embed (empty: data.train_split; 'all': every split).", pattern=r"[A-Za-z0-9_]{0,64}"
    )


@_section("cluster")
class ClusterConfig(Section):
    k: int = param(2000, "Number of clusters (the paper: 2000).", ge=2, le=MAX_K)
    niter: int = param(20, "Lloyd iterations.", ge=1)
    seed: int = param(1234, "Seed for the initial centroids and subsampling (faiss default 1234).", ge=0)
    num_actors: int = param(1, "k-means actors, each holding one partition of the features.", ge=1)
    init: Literal["random", "kmeans++"] = param("random", "Initial centroids: sampled rows or k-means++.")
    max_points_per_centroid: int = param(
        0,
        "Subsample: train on at most k times this many random rows, then assign every row to the final "
        "centroids. Not a cap on cluster size. faiss's default is 256; 0 trains on all rows (DeepCluster, CompRess).",
        ge=0,
    )
    init_sample: int = param(
        0, "Rows k-means++ runs on (0: min(rows, 32*k)); its cost grows as k*log(k)*rows*dim.", ge=0
    )
    spherical: bool = param(False, "Spherical k-means: unit-norm centroids, inner-product search.")
    cpus_per_actor: int = param(1, "CPUs (faiss threads) reserved per k-means actor.", ge=1)
    gallery_clusters: int = param(12, "Clusters shown in the gallery (largest, smallest, random).", ge=0)
    gallery_images: int = param(8, "Images shown per gallery row (nearest to the centroid first).", ge=1)


TransferMethod = Literal["cluster", "distill"]
# Fields that only the distill method reads: left out of a cluster transfer's stage hash (transfer.stage_config).
DISTILL_FIELDS = ("method", "distill_queue", "distill_t_teacher", "distill_t_student", "distill_hidden")


@_section("transfer")
class TransferConfig(Section):
    arch: Arch = param("alexnet", "Student architecture (the paper: AlexNet).")
    width: float = param(1.0, "Channel width multiplier of the student.", gt=0, le=MAX_WIDTH)
    image_size: int = param(224, "Training crop side (px).", ge=16)
    epochs: int = param(90, "Training epochs.", ge=1)
    batch_size: int = param(256, "Images per optimizer step, over all workers.", ge=1)
    lr: float = param(0.1, "SGD learning rate.", gt=0)
    momentum: float = param(0.9, "SGD momentum.", ge=0, lt=1)
    weight_decay: float = param(1e-4, "SGD weight decay.", ge=0)
    balanced: bool = param(True, "Sample uniformly over clusters (DeepCluster's sampler).")
    holdout_fraction: float = param(0.05, "Fraction of images held out to score pseudo-label accuracy.", ge=0, lt=1)
    lr_step_epochs: int = param(30, "Multiply the learning rate by 0.1 every this many epochs (CompRess: 30).", ge=1)
    method: TransferMethod = param(
        "cluster",
        "cluster: classify the teacher's k-means clusters (the paper's CC). distill: match the teacher's "
        "similarities over a queue of its embed features (ISD / CompRess similarity distillation).",
    )
    distill_queue: int = param(128000, "distill: teacher embeddings in the FIFO queue of anchors.", ge=1)
    distill_t_teacher: float = param(0.04, "distill: teacher's softmax temperature (CompRess: 0.04).", gt=0)
    distill_t_student: float = param(0.04, "distill: student's softmax temperature (CompRess: 0.04).", gt=0)
    distill_hidden: int = param(2048, "distill: hidden width of the student's MLP head onto the teacher's space.", ge=1)


@_section("evaluate")
class EvaluateConfig(Section):
    taps: tuple[Tap, ...] = param(("conv1", "conv2", "conv3", "conv4", "conv5"), "Layers probed.")
    max_dim: int = param(9216, "Pool each tap spatially until it has at most this many dimensions.", ge=1)
    image_size: int = param(224, "Images are resized and center-cropped to this side (px).", ge=16)
    knn_k: int = param(20, "Neighbours in the kNN classifier (cosine).", ge=1)
    knn_temperature: float = param(0.07, "Temperature of the kNN vote weights.", gt=0)
    fewshot_ways: int = param(5, "Classes per few-shot episode.", ge=2)
    fewshot_shots: int = param(5, "Support images per class.", ge=1)
    fewshot_queries: int = param(15, "Query images per class.", ge=1)
    fewshot_episodes: int = param(600, "Few-shot episodes.", ge=1)
    fewshot_metric: Literal["cosine", "euclidean"] = param("cosine", "Distance to the class prototypes.")
    data: str = param(
        "", "Labeled shards the trunk is measured on (any packed set; empty: data.path), e.g. to transfer across sets."
    )
    pool: Literal["max", "avg"] = param("max", "Spatial pooling of each tap down to max_dim.")
    batch_size: int = param(64, "Images per forward pass when extracting features.", ge=1)
    num_actors: int = param(1, "Feature-extraction actors (one GPU each on a GPU cluster).", ge=1)
    probe_c: tuple[float, ...] = param(
        (1e-4, 1e-3, 1e-2, 1e-1), "Inverse L2 strengths of the linear probe, chosen on a held-out fifth of train."
    )
    probe_max_iter: int = param(200, "L-BFGS iterations of each linear-probe fit.", ge=1)
    hog_words: int = param(1000, "Visual words of the HOG bag-of-words baseline (k-means vocabulary).", ge=2)
    hog_image_size: int = param(224, "Side (px) of the images HOG is computed on.", ge=16)
    hog_vocab_images: int = param(2000, "Images sampled to learn the HOG vocabulary.", ge=1)
    compare_rows: tuple[CompareRow, ...] = param(
        ("random", "jigsaw", "cc_jigsaw", "cc_deep", "cc_hog", "supervised"),
        "Rows of `ktray compare` (the paper's baselines), in table order.",
    )
    compare_seeds: int = param(
        1, "Training seeds of each `seed_rows` row in `ktray compare` (seed, seed+1, ...): mean and spread.", ge=1
    )
    seed_rows: tuple[CompareRow, ...] = param(
        ("jigsaw", "cc_jigsaw"), "Rows of `ktray compare` trained `compare_seeds` times (the paper's decisive pair)."
    )

    def check(self) -> None:
        if not self.probe_c or any(c <= 0 for c in self.probe_c):
            raise ConfigError(f"evaluate.probe_c: expected a non-empty list of numbers > 0, got {list(self.probe_c)}")
        if not self.taps or len(set(self.taps)) != len(self.taps):
            raise ConfigError(f"evaluate.taps: expected distinct taps, at least one, got {list(self.taps)}")
        if not self.compare_rows or len(set(self.compare_rows)) != len(self.compare_rows):
            raise ConfigError(
                f"evaluate.compare_rows: expected distinct rows, at least one, got {list(self.compare_rows)}"
            )


@_section("tracking")
class TrackingConfig(Section):
    uri: str = param("", "MLflow tracking URI; empty: $MLFLOW_TRACKING_URI, else a store in the run root.")
    experiment: str = param("ktray", "MLflow experiment name.", pattern=SAFE_NAME)


@_section("sweep")
class SweepConfig(Section):
    k: tuple[int, ...] = param((250, 500, 1000), "cluster.k values tried (a grid with max_foreign).", ge=2,
                               le=MAX_K)
    max_foreign: tuple[int, ...] = param((0, 1, 2), "pretext.max_foreign values tried.", ge=0, le=8)
    metric: Literal["linear_top1", "knn_top1"] = param(
        "linear_top1", "Objective: best linear-probe top-1 over the taps, or kNN top-1 on the best tap."
    )
    max_concurrent: int = param(1, "Trials run at once (each runs its own Ray Train jobs).", ge=1)


@_section("")
class Config(Section):
    name: str = param("ktray", "Name of the pipeline run (MLflow parent run, Ray job).", pattern=SAFE_NAME)
    root: str = param("runs", "Run directory: local path or URI (s3://, gs://) holding every stage output.")
    seed: int = param(0, "Global seed for data order, puzzles and initialisation.", ge=0)
    data: DataConfig = field(default_factory=DataConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    pretext: PretextConfig = field(default_factory=PretextConfig)
    isd: IsdConfig = field(default_factory=IsdConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)


# A config is a few hundred values: more means YAML aliases expanding (a "billion laughs" bomb).
MAX_CONFIG_VALUES = 10_000
MAX_CONFIG_BYTES = 1 << 20


def _check_size(where: str, tree: Any) -> None:
    """Refuse a loaded YAML tree that expands to more than MAX_CONFIG_VALUES values (aliases counted
    every time they are used), without expanding it."""
    budget = MAX_CONFIG_VALUES
    stack = [tree]
    while stack:
        node = stack.pop()
        budget -= 1
        if budget < 0:
            raise ConfigError(f"{where}: expands to more than {MAX_CONFIG_VALUES:,} values (YAML aliases?)")
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)


def _yaml(where: str, text: str) -> Any:
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML: {' '.join(str(exc).split())}") from None
    _check_size(where, value)
    return value


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {key} is not a section")
    node[keys[-1]] = value


def parse_overrides(overrides: typing.Iterable[str]) -> dict[str, Any]:
    """Turn ``["cluster.k=500", "data.path=/x"]`` into a nested dict (values parsed as YAML)."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. cluster.k=500")
        key, raw = item.split("=", 1)
        _set_path(tree, key.strip(), _yaml(f"override {key.strip()}", raw) if raw.strip() else "")
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def resolve_preset(path: str | Path) -> Path:
    """A preset name (``tiny``) or a path to a YAML file.

    A bare name (no ``/``, no ``.yaml``/``.yml``) that names a preset is the preset, whatever
    the working directory holds (``./tiny`` means the file); anything else is a path, and
    must be a file.
    """
    text = str(path)
    named = PRESETS_DIR / f"{text}.yaml"
    bare = "/" not in text and not text.endswith((".yaml", ".yml"))
    if bare and re.fullmatch(r"[A-Za-z0-9_\-]+", text) and named.is_file():
        return named
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config {text!r}: is a folder, not a YAML file (a preset is one of: {_preset_names()})")
    if p.exists():
        return p
    raise ConfigError(f"config {text!r}: no such file or preset (presets: {_preset_names()})")


def _preset_names() -> str:
    return ", ".join(sorted(q.stem for q in PRESETS_DIR.glob("*.yaml")))


def load_config(path: str | Path | None = None, overrides: typing.Iterable[str] = ()) -> Config:
    """Load a YAML preset or file, apply ``key=value`` overrides, validate everything."""
    tree: dict[str, Any] = {}
    if path is not None:
        file = resolve_preset(path)
        where = f"config {str(path)!r}"
        try:
            with open(file, "rb") as f:
                blob = f.read(MAX_CONFIG_BYTES + 1)
        except OSError as exc:
            raise ConfigError(f"{where}: cannot be read ({exc.strerror or exc})") from None
        if len(blob) > MAX_CONFIG_BYTES:
            raise ConfigError(f"{where}: larger than {MAX_CONFIG_BYTES:,} bytes; not a config")
        try:
            text = blob.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"{where}: not UTF-8 text") from None
        tree = _yaml(where, text)
        if tree is None:
            tree = {}
        if not isinstance(tree, dict):
            raise ConfigError(f"{where}: expected a mapping of sections (data:, cluster: ...), got a "
                              f"{type(tree).__name__}")
    tree = _merge(tree, parse_overrides(overrides))
    return Config.from_dict(tree)  # type: ignore[return-value]


def replace(cfg: Config, overrides: typing.Iterable[str]) -> Config:
    """A copy of ``cfg`` with ``key=value`` overrides applied and validated."""
    return Config.from_dict(_merge(cfg.to_dict(), parse_overrides(overrides)))  # type: ignore[return-value]


def iter_fields(cls: type = Config, prefix: str = "") -> typing.Iterator[tuple[str, Any, dataclasses.Field]]:
    """Yield ``(dotted_name, type, field)`` for every leaf field: for docs and generated tests."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        name = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(hints[f.name]):
            yield from iter_fields(hints[f.name], name)
        else:
            yield name, hints[f.name], f


def width_ok(value: object) -> bool:
    """Whether ``value`` is a width multiplier a config accepts: a finite number in (0, MAX_WIDTH]."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and 0 < value <= MAX_WIDTH)


RANDOM_TRUNK = "random:"  # --trunk random:<arch>[:<width>]: a seeded random network
TORCHVISION_TRUNK = "torchvision:"  # --trunk torchvision:<name>: torchvision's published weights


def parse_random_trunk(spec: str, width: float) -> tuple[str, float]:
    """``random:<arch>[:<width>]`` as ``(arch, width)``; ``width`` when the spec names none.

    The width obeys the config's width bounds, so a spec asks for no larger trunk than a config
    could. A spec that does not parse raises ConfigError naming ``--trunk``.
    """
    where = f"--trunk {spec!r}"
    parts = spec.removeprefix(RANDOM_TRUNK).split(":")
    if not spec.startswith(RANDOM_TRUNK) or len(parts) > 2 or not parts[0]:
        raise ConfigError(f"{where}: expected random:<arch>[:<width>], e.g. random:alexnet:0.5")
    archs = typing.get_args(Arch)
    if parts[0] not in archs:
        raise ConfigError(f"{where}: unknown architecture {parts[0]!r}; one of {', '.join(archs)}")
    if len(parts) == 2:
        try:
            width = float(parts[1])
        except ValueError:
            raise ConfigError(f"{where}: width {parts[1]!r} is not a number") from None
    if not width_ok(width):
        raise ConfigError(f"{where}: width must be a finite number > 0 and <= {MAX_WIDTH:g}, got {width!r}")
    return parts[0], float(width)
