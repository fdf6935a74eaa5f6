"""Benchmark: ktray's distributed k-means (Ray actors + faiss search) against ``faiss.Kmeans``.

Both run on the same data, from the same initial centroids, for the same number of Lloyd
iterations, in one process run, so the times and the final objectives compare directly.
Every size in ``--sizes`` is run by faiss once and by ktray with every actor count in
``--actors`` (the actors split the CPUs; one GPU each with ``--device cuda``, where faiss's
own GPU k-means is the baseline when the installed faiss has GPUs).

    python benchmarks/kmeans.py                                     # 100k x 256, k=1000, 1/2/4 actors
    python benchmarks/kmeans.py --sizes 100000,200000,1000000 --niter 10
    python benchmarks/kmeans.py --sizes 1000000 --k 20000 --niter 25 --device cuda --actors 1

faiss's reference point (REFERENCES.md): 1M x 256 -> 20k centroids, 25 iterations: 55 s on
one P100, 11 min on CPU. Timings per iteration exclude data loading and actor start-up,
which are reported separately; faiss gets every CPU thread, the actors split them.

Prints a table and writes JSON (``--out``, default benchmarks/results/kmeans.json).
"""

from __future__ import annotations

import itertools
import os
import time

import common
import numpy as np


def make_data(n: int, d: int, centers: int, seed: int) -> np.ndarray:
    """Gaussian blobs: clustered like features are, so Lloyd does real work every iteration."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((centers, d)).astype(np.float32) * 2
    x = means[rng.integers(0, centers, n)]
    x += rng.standard_normal((n, d), dtype=np.float32)
    return x


def ints(text: str) -> list[int]:
    return [int(float(t)) for t in text.split(",") if t]


def run_faiss(x: np.ndarray, init: np.ndarray, args, use_gpu: bool) -> tuple[float, float]:
    """faiss.Kmeans from ``init``: (seconds per iteration, final objective)."""
    import faiss

    ref = faiss.Kmeans(x.shape[1], args.k, niter=args.niter, seed=args.seed, max_points_per_centroid=10**9,
                       gpu=use_gpu, verbose=False)
    t0 = time.perf_counter()
    ref.train(x, init_centroids=init.copy())
    return (time.perf_counter() - t0) / args.niter, float(ref.obj[-1])


def run_ktray(x: np.ndarray, init: np.ndarray, actors: int, args, device: str) -> dict:
    """ktray's actor group on ``x``: s/iter, objective, start-up and final assignment times."""
    import ray

    from ktray.stages import cluster

    n = len(x)
    cpus = args.cpus_per_actor or (os.cpu_count() or 1) / actors
    bounds = [i * n // actors for i in range(actors + 1)]
    t0 = time.perf_counter()
    refs = [ray.put(x[a:b]) for a, b in itertools.pairwise(bounds)]
    group = cluster.start_shards(refs, [None] * actors, device=device, cpus_per_actor=cpus)
    ray.get([a.info.remote() for a in group])
    startup = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = cluster.distributed_lloyd(group, args.k, args.niter, centroids=init, seed=args.seed)
    train = time.perf_counter() - t0
    t0 = time.perf_counter()
    table = cluster.assign_all(group, res.centroids)
    assign_s = time.perf_counter() - t0
    cluster.stop_shards(group)
    del refs
    assert table.num_rows == n
    return {"actors": actors, "cpus_per_actor": cpus, "s_per_iter": train / args.niter,
            "objective": res.objective[-1], "empty_splits": int(sum(res.splits)), "startup_s": startup,
            "final_assign_s": assign_s}


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--sizes", default="100000", help="comma-separated row counts")
    p.add_argument("--d", type=int, default=256, help="dimensions")
    p.add_argument("--k", type=int, default=1000, help="clusters")
    p.add_argument("--niter", type=int, default=5, help="Lloyd iterations")
    p.add_argument("--actors", default="1,2,4", help="comma-separated ktray actor counts")
    p.add_argument("--cpus-per-actor", type=float, default=0, help="0: all CPUs split over the actors")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--blobs", type=int, default=0, help="Gaussian blobs in the data (0: 2k)")
    args = p.parse_args()
    device = common.resolve_device(args.device)

    import faiss
    import ray

    from ktray.algos import kmeans as km

    ncpu = os.cpu_count() or 1
    faiss.omp_set_num_threads(ncpu)
    use_gpu = device == "cuda" and faiss.get_num_gpus() > 0
    sizes, actor_counts = ints(args.sizes), ints(args.actors)
    common.init_ray(ncpu, device, object_store_memory=max(1 << 30, int(max(sizes) * args.d * 4 * 2.5)))
    rows, runs = [], []
    for n in sizes:
        x = make_data(n, args.d, args.blobs or 2 * args.k, args.seed)
        init = x[km.init_rows(n, args.k, args.seed)].copy()  # the same start for every run
        faiss_s, faiss_obj = run_faiss(x, init, args, use_gpu)
        for a in actor_counts:
            r = run_ktray(x, init, a, args, device)
            r |= {"n": n, "faiss_s_per_iter": faiss_s, "faiss_objective": faiss_obj,
                  "objective_rel_diff": (r["objective"] - faiss_obj) / faiss_obj}
            runs.append(r)
            print(f"n={n} actors={a}: {r['s_per_iter']:.3f} s/iter (faiss {faiss_s:.3f}), objective "
                  f"{r['objective']:.6g} (faiss {faiss_obj:.6g}), start-up {r['startup_s']:.1f} s", flush=True)
            rows.append(common.Row(f"n={n:,} {a} actor(s)", r["s_per_iter"], faiss_s, "s/iter",
                                   higher_is_better=False))
            rows.append(common.Row(f"n={n:,} {a} actor(s)", r["objective"], faiss_obj, "objective",
                                   higher_is_better=False))
        del x
    ray.shutdown()
    common.report(
        "kmeans", f"k-means: d={args.d}, k={args.k}, {args.niter} Lloyd iterations from the same start, "
        f"{device}{' (faiss GPU)' if use_gpu else ''}",
        rows, baseline=f"faiss.Kmeans{' (GPU)' if use_gpu else f' ({ncpu} threads)'}", device=device,
        params=vars(args) | {"faiss_gpu": use_gpu, "faiss_version": faiss.__version__}, extra={"runs": runs},
        out=args.out,
    )


if __name__ == "__main__":
    main()
