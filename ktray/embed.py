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
from ktray.rundir import StageDir, filesystem, read_bytes, stage_dir, write_bytes_atomic, write_manifest

if TYPE_CHECKING:
    import torch

    from ktray.config import Config

log = logging.getLogger(__name__)

FEATURES_DIR = "features"
PCA_FILE = "pca.npz"


# --------------------------------------------------------------------------- math


def standardise(pixels: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W), each image at zero mean and unit variance.

    The teacher saw Jigsaw tiles normalised this way, each on its own (ktray.jigsaw, after
    the release's per-tile normalisation), so whole images get the same treatment.
    """
    import torch

    x = torch.as_tensor(np.ascontiguousarray(pixels), device=device).permute(0, 3, 1, 2).float()  # (B, 3, H, W)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    std = x.std(dim=(1, 2, 3), keepdim=True, unbiased=False)
    return (x - mean) / std.clamp_min(1.0)


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
    from ktray.models import tap_shapes

    channels = tap_shapes(arch, width, cfg.embed.image_size, fc=False)[cfg.embed.tap][0]
    return channels * cfg.embed.grid**2


def fit_pca_whitening(x: np.ndarray, dim: int, seed: int = 0) -> dict[str, np.ndarray]:
    """PCA-whitening fitted on ``x`` (N, D): project on the top ``dim`` components, scale each to unit variance.

    Eigen power -0.5 as DeepCluster's ``faiss.PCAMatrix(D, dim, eigen_power=-0.5)``.
    Returns ``mean`` (D,), ``proj`` (D, dim) with the whitening folded in, ``eigenvalues`` (dim,).
    """
    from sklearn.decomposition import PCA

    n, d = x.shape
    if dim > min(n, d):
        raise ValueError(
            f"embed.pca_dim: {dim} components need at least that many samples and dimensions "
            f"(have {n} samples of {d} dims; raise embed.pca_sample or lower embed.pca_dim)"
        )
    pca = PCA(n_components=dim, whiten=False, random_state=seed).fit(x.astype(np.float64))
    ev = np.maximum(pca.explained_variance_, 1e-12 * max(pca.explained_variance_[0], 1e-30))
    proj = pca.components_.T / np.sqrt(ev)[None, :]  # (D, dim)
    return {"mean": pca.mean_.astype(np.float32), "proj": proj.astype(np.float32), "eigenvalues": ev.astype(np.float32)}


def apply_pca(x: np.ndarray, pca: dict[str, np.ndarray]) -> np.ndarray:
    """(N, D) -> (N, dim) whitened."""
    return ((x - pca["mean"]) @ pca["proj"]).astype(np.float32)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


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
    with np.load(io.BytesIO(read_bytes(uri))) as z:
        return {k: z[k] for k in z.files}


# --------------------------------------------------------------------------- Ray Data actor


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

        from ktray.models import load_trunk

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


# --------------------------------------------------------------------------- stage


def _split(cfg: Config) -> str | None:
    s = cfg.embed.split or cfg.data.train_split
    return None if s == "all" else s


def output_dir(cfg: Config, teacher: StageDir) -> StageDir:
    """Where :func:`run` writes for this config, teacher and data."""
    from ktray.data import data_key, data_path

    params = {
        "embed": cfg.embed.to_dict(),
        "split": _split(cfg),
        "limit": cfg.data.limit,
        "seed": cfg.seed if cfg.embed.pca_dim else None,  # only the PCA sample is random
    }
    return stage_dir(cfg.root, "embed", params, [teacher, data_key(data_path(cfg.data))])


def _embed_dataset(cfg: Config, ds: Any, weights: str, device: str, pca: str | None, l2: bool,
                   metadata: dict[str, Any] | None) -> Any:
    from ray.data import ActorPoolStrategy

    from ktray.data import decode_batch

    e = cfg.embed
    decoded = ds.map_batches(
        decode_batch, fn_kwargs={"size": e.image_size, "mode": "center", "stage": "embed"},
        batch_size=cfg.data.decode_batch_size, batch_format="numpy",
    )
    gpu = device == "cuda"
    return decoded.map_batches(
        Embedder,
        fn_constructor_args=(weights, e.tap, e.grid),
        fn_constructor_kwargs={
            "device": device, "amp": cfg.compute.amp and gpu, "pca": pca, "l2": l2,
            "threads": cfg.compute.cpus_per_worker, "metadata": metadata,
        },
        batch_size=e.batch_size,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=e.num_actors),  # fixed size: GPU pools do not autoscale well
        num_gpus=1 if gpu else 0,
        num_cpus=1 if gpu else cfg.compute.cpus_per_worker,
    )


def _count_rows(uri: str) -> tuple[int, list[str]]:
    fs, base = filesystem(uri)
    infos = fs.get_file_info(pa.fs.FileSelector(base, allow_not_found=True))
    files = sorted(i.path for i in infos if i.type == pa.fs.FileType.File and i.base_name.endswith(".parquet"))
    return sum(pq.ParquetFile(f, filesystem=fs).metadata.num_rows for f in files), files


def run(cfg: Config, teacher: StageDir) -> StageDir:
    """The embed stage: ``features/*.parquet`` (+ ``pca.npz``) under its stage folder."""
    import ray

    from ktray.data import data_key, data_path, read_images
    from ktray.kmeans import resolve_device
    from ktray.models import read_weights

    sd = output_dir(cfg, teacher)
    if sd.done():
        return sd
    started = time.time()
    e = cfg.embed
    sd.make()
    from ktray.pipeline import init_ray

    init_ray()  # the job's cluster (RAY_ADDRESS) or a local one
    fs, feat_dir = filesystem(sd.path(FEATURES_DIR))
    # A killed earlier attempt may have left files; they would be read as extra rows.
    fs.create_dir(feat_dir, recursive=True)
    fs.delete_dir_contents(feat_dir)

    weights = teacher.path("teacher.pt")
    info = read_weights(weights)
    arch, width = str(info["arch"]), float(info["width"])
    device = resolve_device(cfg.compute.device)
    path, split = data_path(cfg.data), _split(cfg)
    ds = read_images(path, split, cfg.data.limit, block_rows=cfg.data.decode_batch_size)
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
        from ktray.kmeans import features_to_numpy

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
    n_out, written = _count_rows(sd.path(FEATURES_DIR))
    metrics.record_rows("embed", n_out)
    if written:
        got = schema.feature_dim(pq.read_schema(written[0], filesystem=fs))
        if got != dim:
            raise RuntimeError(f"embed: wrote {got}-dim features, expected {dim}")
    if n_out != n_in:
        # decode_batch drops undecodable images (logged); packing already refuses them, so
        # this is rare, but a dropped row must not go unnoticed.
        log.warning("embed: %d images in, %d feature rows out (%d undecodable)", n_in, n_out, n_in - n_out)
    files_out += [f"{FEATURES_DIR}/{f.rsplit('/', 1)[1]}" for f in written]
    summary = {"rows_in": float(n_in), "rows": float(n_out), "dim": float(dim), "seconds": seconds,
               "images_per_second": n_out / max(seconds, 1e-9)}
    write_bytes_atomic(sd.path("features.json"), json.dumps({**metadata, "dim": dim, "rows": n_out}).encode())
    print(f"embed: {n_out} rows x {dim} dims in {seconds:.1f} s ({summary['images_per_second']:.1f} images/s)",
          flush=True)
    write_manifest(sd, config={"embed": e.to_dict(), "split": split, "limit": cfg.data.limit},
                   inputs=[teacher, data_key(path)], files=[*files_out, "features.json"],
                   metrics={"summary": summary, "history": []}, started=started)
    return sd
