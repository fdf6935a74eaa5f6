"""Benchmark: ktray's distributed k-means (Ray actors + faiss search) against ``faiss.Kmeans``.

Both run on the same data, from the same initial centroids, for the same number of Lloyd
iterations, in one process run, so the times and the final objectives compare directly.

    python benchmarks/kmeans.py                        # 200k x 256, k=1000, 2 actors, 10 iterations
    python benchmarks/kmeans.py --n 1000000 --k 20000 --niter 25 --device cuda --actors 1

faiss's reference point (REFERENCES.md): 1M x 256 -> 20k centroids, 25 iterations: 55 s on
one P100, 11 min on CPU. Timings per iteration exclude data loading and actor start-up,
which are reported separately; faiss gets every CPU thread, the actors split them.

Prints a table and writes JSON (``--out``, default benchmarks/results/kmeans.json).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import time
from pathlib import Path

import numpy as np


def make_data(n: int, d: int, centers: int, seed: int) -> np.ndarray:
    """Gaussian blobs: clustered like features are, so Lloyd does real work every iteration."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((centers, d)).astype(np.float32) * 2
    x = means[rng.integers(0, centers, n)]
    x += rng.standard_normal((n, d), dtype=np.float32)
    return x


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200_000, help="rows")
    p.add_argument("--d", type=int, default=256, help="dimensions")
    p.add_argument("--k", type=int, default=1000, help="clusters")
    p.add_argument("--niter", type=int, default=10, help="Lloyd iterations")
    p.add_argument("--actors", type=int, default=2, help="ktray k-means actors")
    p.add_argument("--cpus-per-actor", type=float, default=0, help="0: all CPUs split over the actors")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--blobs", type=int, default=0, help="Gaussian blobs in the data (0: 2k)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "kmeans.json"))
    args = p.parse_args()

    import faiss
    import ray

    from ktray import kmeans as km

    ncpu = os.cpu_count() or 1
    x = make_data(args.n, args.d, args.blobs or 2 * args.k, args.seed)
    init = x[km.init_rows(args.n, args.k, args.seed)].copy()  # the same start for both

    # ---- faiss.Kmeans, all threads (GPU when asked and faiss has it)
    faiss.omp_set_num_threads(ncpu)
    use_gpu = args.device == "cuda" and faiss.get_num_gpus() > 0
    ref = faiss.Kmeans(args.d, args.k, niter=args.niter, seed=args.seed, max_points_per_centroid=10**9,
                       gpu=use_gpu, verbose=False)
    t0 = time.perf_counter()
    ref.train(x, init_centroids=init.copy())
    faiss_train = time.perf_counter() - t0
    faiss_obj = float(ref.obj[-1])

    # ---- ktray: actors each hold a slice (through the object store), the driver reduces
    ray.init(num_cpus=ncpu, num_gpus=None if args.device == "cuda" else 0, include_dashboard=False,
             object_store_memory=max(1 << 30, int(x.nbytes * 2.5)))
    cpus = args.cpus_per_actor or ncpu / args.actors
    bounds = [i * args.n // args.actors for i in range(args.actors + 1)]
    t0 = time.perf_counter()
    refs = [ray.put(x[a:b]) for a, b in itertools.pairwise(bounds)]
    actors = km.start_shards(refs, [None] * args.actors, device=args.device, cpus_per_actor=cpus)
    ray.get([a.info.remote() for a in actors])
    startup = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = km.distributed_lloyd(actors, args.k, args.niter, centroids=init, seed=args.seed)
    ktray_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    table = km.assign_all(actors, res.centroids)
    assign_s = time.perf_counter() - t0
    km.stop_shards(actors)
    ray.shutdown()
    assert table.num_rows == args.n

    row = {
        "n": args.n, "d": args.d, "k": args.k, "niter": args.niter, "actors": args.actors,
        "cpus_per_actor": cpus, "device": args.device, "faiss_gpu": use_gpu,
        "ktray_s_per_iter": ktray_train / args.niter,
        "faiss_s_per_iter": faiss_train / args.niter,
        "ratio": ktray_train / faiss_train,
        "ktray_objective": res.objective[-1],
        "faiss_objective": faiss_obj,
        "objective_rel_diff": (res.objective[-1] - faiss_obj) / faiss_obj,
        "ktray_empty_splits": int(sum(res.splits)),
        "ktray_startup_s": startup,
        "ktray_final_assign_s": assign_s,
        "cpus": ncpu,
        "machine": platform.processor() or platform.machine(),
        "faiss_version": faiss.__version__,
        "ray_version": ray.__version__,
    }
    print(f"\n{args.n} x {args.d}, k={args.k}, {args.niter} iterations, {args.actors} actor(s) x {cpus:g} CPU, "
          f"device {args.device}{' (faiss GPU)' if use_gpu else ''}, {ncpu} CPUs")
    print(f"{'':10s} {'s/iter':>10s} {'objective':>16s}")
    print(f"{'ktray':10s} {row['ktray_s_per_iter']:10.3f} {row['ktray_objective']:16.6g}")
    print(f"{'faiss':10s} {row['faiss_s_per_iter']:10.3f} {row['faiss_objective']:16.6g}")
    print(f"ratio ktray/faiss: {row['ratio']:.2f}x; objective difference {row['objective_rel_diff']:+.2e}; "
          f"actor start-up {startup:.1f} s, final assignment {assign_s:.2f} s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
