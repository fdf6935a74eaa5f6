"""Embed: every image through the teacher's trunk, one pooled tap per image, as Parquet.

The paper (Noroozi et al. 2018, Sec. 3.2) clusters the teacher's conv4 activations on whole
images, max-pooled to a small grid: 5x5x384 for AlexNet, 4x4x512 for VGG16. DeepCluster
(Caron et al. 2018) adds PCA-whitening to 256 dimensions and L2 normalisation before
k-means; both are options here (``embed.pca_dim``, ``embed.l2_normalize``).

On Ray this is a streaming Ray Data job:

    read_images (Parquet shards) -> decode_batch (CPU tasks, center crop)
      -> Embedder (actor pool: trunk loaded once per actor, one GPU each where GPUs exist)
      -> write_parquet (<stage>/features/*.parquet, the features schema of ktray.schema)

With PCA on, a first pass embeds a seeded sample of ``embed.pca_sample`` images, the
whitening is fitted on the driver (``pca.npz``), and the full pass applies it in the actors,
so the raw (larger) features are never written.
"""

from __future__ import annotations

import io
import json
import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ktray import metrics, schema
from ktray.algos.whitening import apply_pca, fit_pca_whitening, l2_normalize
from ktray.artifacts import FEATURES_DIR, TEACHER, parquet_files
from ktray.data.decode import decode_batch
from ktray.data.shards import data_identity, data_path, read_split
from ktray.lifecycle import Output, StageSpec, ensure
from ktray.models.trunks import load_trunk, read_weights, standardise, tap_shapes
from ktray.rundir import StageDir, filesystem, read_bytes, write_bytes_atomic
from ktray.runtime import actor_cpus, resolve_device
from ktray.schema import features_to_numpy

if TYPE_CHECKING:
    import torch

    from ktray.config import Config


log = logging.getLogger(__name__)

PCA_FILE = "pca.npz"


def embed_pixels(
    trunk: torch.nn.Module, pixels: np.ndarray, tap: str, grid: int, *, device: str = "cpu", amp: bool = False
) -> np.ndarray:
    """The tap of ``trunk`` on whole images, max-pooled to grid x grid and flattened: (B, C*grid*grid)."""
    import torch

    x = standardise(pixels, device)  # (B, 3, H, W)
    if x.is_cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=amp and x.is_cuda):
        act = trunk.taps(x, [tap])[tap]  # (B, C, h, w)
        # Adaptive max pooling gives exactly grid x grid cells for any input size (Sec. 3.2).
        pooled = torch.nn.functional.adaptive_max_pool2d(act.float(), grid)  # (B, C, grid, grid)
    return pooled.flatten(1).cpu().numpy().astype(np.float32)  # (B, C*grid*grid)


def feature_dim(cfg: Config, arch: str, width: float) -> int:
    """The documented dimension of the features: pca_dim, or channels(tap) * grid^2."""
    if cfg.embed.pca_dim:
        return cfg.embed.pca_dim

    channels = tap_shapes(arch, width, cfg.embed.image_size, fc=False)[cfg.embed.tap][0]
    return channels * cfg.embed.grid**2


def features_table(image_ids: Any, x: np.ndarray, metadata: dict[str, Any] | None = None) -> pa.Table:
    """A features table (``image_id``, ``feature`` fixed_size_list<float32>[d])."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    sch = schema.features_schema(x.shape[1])
    if metadata:
        sch = schema.with_metadata(sch, **metadata)
    feat = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), pa.float32()), x.shape[1])
    return pa.table({"image_id": pa.array(list(image_ids), pa.string()), "feature": feat}, schema=sch)


def save_pca(uri: str, pca: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **pca)
    write_bytes_atomic(uri, buf.getvalue())


def load_pca(uri: str) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(read_bytes(uri)), allow_pickle=False) as z:  # arrays only, never objects
        return {k: z[k] for k in z.files}


class Embedder:
    """Ray Data callable class: loads the teacher once per actor, embeds decoded batches.

    Input batches come from ``ktray.data.decode_batch`` (``image_id``, ``pixels`` (B, S, S, 3)
    uint8); the output is a features table, optionally PCA-whitened and L2-normalised.
    """

    def __init__(
        self,
        weights: str,
        tap: str,
        grid: int,
        *,
        device: str = "cpu",
        amp: bool = False,
        pca: str | None = None,
        l2: bool = False,
        threads: float = 0,
        metadata: dict[str, Any] | None = None,
    ):
        import torch


        if threads > 0 and device == "cpu":
            torch.set_num_threads(max(1, round(threads)))  # a fractional CPU share still runs one thread
        self.device = device
        self.trunk = load_trunk(weights).to(device).eval()
        if device == "cuda":
            self.trunk = self.trunk.to(memory_format=torch.channels_last)
        self.tap, self.grid, self.amp, self.l2 = tap, grid, amp, l2
        self.pca = load_pca(pca) if pca else None
        self.metadata = metadata

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        x = embed_pixels(self.trunk, batch["pixels"], self.tap, self.grid, device=self.device, amp=self.amp)
        if self.pca is not None:
            x = apply_pca(x, self.pca)
        if self.l2:
            x = l2_normalize(x)
        bad = ~np.isfinite(x).all(axis=1)
        if bad.any():
            # k-means cannot place a NaN; a diverged teacher must stop here, not in faiss.
            raise ValueError(f"non-finite features for {int(bad.sum())} images, e.g. {batch['image_id'][bad][:3]}")
        metrics.record_embed(len(batch["image_id"]))
        return features_table(batch["image_id"], x, self.metadata)


def _split(cfg: Config) -> str | None:
    s = cfg.embed.split or cfg.data.train_split
    return None if s == "all" else s


def params(cfg: Config) -> dict[str, Any]:
    """What the features depend on besides the teacher and the data (the folder hash)."""
    return {
        "embed": cfg.embed.to_dict(),
        "split": _split(cfg),
        "limit": cfg.data.limit,
        "seed": cfg.seed if cfg.embed.pca_dim else None,  # only the PCA sample is random
    }


def spec(cfg: Config, teacher: StageDir) -> StageSpec:
    return StageSpec("embed", cfg, params(cfg), [teacher, data_identity(cfg.data)], compute, args=(teacher,),
                     data=(data_path(cfg.data),))


def output_dir(cfg: Config, teacher: StageDir) -> StageDir:
    return spec(cfg, teacher).dir


def run(cfg: Config, teacher: StageDir, **how: Any) -> StageDir:
    """The features' stage folder, computed first unless done (``how``: ``force``, ``tracker``)."""
    return ensure(spec(cfg, teacher), **how)


def _embed_dataset(cfg: Config, ds: Any, weights: str, device: str, pca: str | None, l2: bool,
                   metadata: dict[str, Any] | None) -> Any:
    from ray.data import ActorPoolStrategy

    e = cfg.embed
    decoded = ds.map_batches(
        decode_batch, fn_kwargs={"size": e.image_size, "mode": "center", "stage": "embed"},
        batch_size=cfg.data.decode_batch_size, batch_format="numpy",
    )
    gpu = device == "cuda"
    cpus = 1 if gpu else actor_cpus(cfg.compute.cpus_per_worker, e.num_actors)
    return decoded.map_batches(
        Embedder,
        fn_constructor_args=(weights, e.tap, e.grid),
        fn_constructor_kwargs={
            "device": device, "amp": cfg.compute.amp and gpu, "pca": pca, "l2": l2,
            "threads": cpus, "metadata": metadata,
        },
        batch_size=e.batch_size,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=e.num_actors),  # fixed size: GPU pools do not autoscale well
        num_gpus=1 if gpu else 0,
        num_cpus=cpus,
    )


def compute(cfg: Config, sd: StageDir, teacher: StageDir) -> Output:
    """The embed stage: ``features/*.parquet`` (+ ``pca.npz``) under its stage folder."""
    import ray

    e = cfg.embed
    fs, feat_dir = filesystem(sd.path(FEATURES_DIR))
    # A killed earlier attempt may have left files; they would be read as extra rows.
    fs.create_dir(feat_dir, recursive=True)
    fs.delete_dir_contents(feat_dir)

    weights = teacher.path(TEACHER)
    info = read_weights(weights)
    arch, width = str(info["arch"]), float(info["width"])
    device = resolve_device(cfg.compute.device)
    split = _split(cfg)
    ds = read_split(cfg.data, split)
    n_in = ds.count()
    dim = feature_dim(cfg, arch, width)
    metadata = {"arch": arch, "width": width, "tap": e.tap, "grid": e.grid, "image_size": e.image_size,
                "pca_dim": e.pca_dim, "l2_normalize": e.l2_normalize, "teacher": teacher.name}
    print(f"embed: {n_in} images ({split or 'all splits'}) through {arch} x{width:g} {e.tap}, "
          f"pooled {e.grid}x{e.grid} -> {dim} dims, {e.num_actors} actor(s) on {device}", flush=True)

    pca_uri = None
    files_out: list[str] = []
    if e.pca_dim:
        m = min(e.pca_sample, n_in)
        sample = ds.random_sample(min(1.0, 1.2 * m / max(n_in, 1)), seed=cfg.seed).limit(m)
        raw = pa.concat_tables(ray.get(_embed_dataset(cfg, sample, weights, device, None, False, None)
                                       .to_arrow_refs()))

        pca = fit_pca_whitening(features_to_numpy(raw["feature"]), e.pca_dim, seed=cfg.seed)
        pca_uri = sd.path(PCA_FILE)
        save_pca(pca_uri, pca)
        files_out.append(PCA_FILE)
        print(f"embed: PCA-whitening fitted on {raw.num_rows} images, "
              f"{raw.schema.field('feature').type.list_size} -> {e.pca_dim} dims", flush=True)

    t0 = time.time()
    out = _embed_dataset(cfg, ds, weights, device, pca_uri, e.l2_normalize, metadata)
    out.write_parquet(feat_dir, filesystem=fs)
    seconds = time.time() - t0
    written = parquet_files(sd.path(FEATURES_DIR))
    n_out = sum(rows for _, rows in written)
    metrics.record_rows("embed", n_out)
    if written:
        got = schema.feature_dim(pq.read_schema(filesystem(written[0][0])[1], filesystem=fs))
        if got != dim:
            raise RuntimeError(f"embed: wrote {got}-dim features, expected {dim}")
    # A retried write task must not leave a second copy of its rows behind (the contract: one row per image).
    schema.check_unique_ids("features", pq.read_table(feat_dir, filesystem=fs, columns=["image_id"])["image_id"])
    if n_out != n_in:
        # decode_batch drops undecodable images (logged); packing already refuses them, so
        # this is rare, but a dropped row must not go unnoticed.
        log.warning("embed: %d images in, %d feature rows out (%d undecodable)", n_in, n_out, n_in - n_out)
    files_out += [f"{FEATURES_DIR}/{f.rsplit('/', 1)[1]}" for f, _ in written]
    summary = {"rows_in": float(n_in), "rows": float(n_out), "dim": float(dim), "seconds": seconds,
               "images_per_second": n_out / max(seconds, 1e-9)}
    write_bytes_atomic(sd.path("features.json"), json.dumps({**metadata, "dim": dim, "rows": n_out}).encode())
    print(f"embed: {n_out} rows x {dim} dims in {seconds:.1f} s ({summary['images_per_second']:.1f} images/s)",
          flush=True)
    return Output([*files_out, "features.json"], summary)
