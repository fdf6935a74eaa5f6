"""Benchmark: decode + Jigsaw++ puzzles, ktray's Ray Data path against a plain DataLoader.

ktray: ``read_images`` (Parquet shards) -> ``map_batches(puzzle_batch)`` on ``--workers`` CPUs
(decode with ``decode_batch``, then the vectorised ``make_puzzles``), iterated as numpy batches.

Baseline: what a user would otherwise write: a ``torch.utils.data.Dataset`` over the same
encoded bytes (held in memory), per sample PIL decode + torchvision ``Resize`` / ``CenterCrop``,
then the puzzle cut in torch (random crop, 9 jittered tiles with a per-channel shift, the
permutation); a ``collate_fn`` swaps in the foreign tiles from other samples of the batch,
greys and normalises each tile. Same geometry, same batch size, ``--workers`` loader workers.

Both make ``--repeats`` puzzles per decoded image and run ``--passes`` passes over the split;
the first pass is a warm-up (worker start-up, page cache) and is reported apart.

    python benchmarks/puzzles.py                          # the tiny preset's geometry, bundled sample
    python benchmarks/puzzles.py --workers 8 --image-size 256 --crop 225 --tile 64 --data /data/shards
"""

from __future__ import annotations

import io

import common
import numpy as np

GREY = (0.299, 0.587, 0.114)


# --------------------------------------------------------------------------- baseline


class PuzzleDataset:
    """Per-sample decode and puzzle cut (map-style dataset: a list of encoded images)."""

    def __init__(self, images: list[bytes], perms: np.ndarray, image_size: int, crop: int, tile: int,
                 shift: int, grey_prob: float, repeats: int):
        from torchvision import transforms

        self.images, self.perms = images, perms
        self.resize = transforms.Compose([transforms.Resize(image_size), transforms.CenterCrop(image_size)])
        self.image_size, self.crop, self.tile, self.shift = image_size, crop, tile, shift
        self.grey_prob, self.repeats = grey_prob, repeats

    def __len__(self) -> int:
        return len(self.images)

    def _puzzle(self, img):  # img: (3, S, S) uint8 tensor
        import torch

        cell, t, s = self.crop // 3, self.tile, self.shift
        y0, x0 = np.random.randint(0, self.image_size - self.crop + 1, size=2)
        tiles = torch.empty((9, 3, t, t), dtype=torch.uint8)
        for i in range(9):
            gy, gx = divmod(i, 3)
            jy, jx = np.random.randint(0, cell - t - s + 1, size=2)
            for ch in range(3):
                cy, cx = np.random.randint(0, s + 1, size=2)
                y, x = y0 + gy * cell + jy + cy, x0 + gx * cell + jx + cx
                tiles[i, ch] = img[ch, y : y + t, x : x + t]
        label = np.random.randint(len(self.perms))
        return tiles[torch.as_tensor(self.perms[label])], label, np.random.rand() < self.grey_prob

    def __getitem__(self, i: int):
        from PIL import Image
        from torchvision.transforms.functional import pil_to_tensor

        img = pil_to_tensor(self.resize(Image.open(io.BytesIO(self.images[i])).convert("RGB")))  # (3, S, S)
        return [self._puzzle(img) for _ in range(self.repeats)]


def collate(samples, max_foreign: int):
    """Stack the puzzles, swap in foreign tiles from other rows, grey, normalise each tile."""
    import torch

    flat = [p for s in samples for p in s]
    tiles = torch.stack([p[0] for p in flat])  # (B, 9, 3, t, t) uint8
    label = torch.as_tensor([p[1] for p in flat])
    grey = torch.as_tensor([bool(p[2]) for p in flat])
    b = len(flat)
    out = tiles.clone()
    if b > 1:
        for i in range(b):
            n = np.random.randint(max_foreign + 1)
            for pos in np.random.choice(9, n, replace=False):
                other = (i + np.random.randint(1, b)) % b
                out[i, pos] = tiles[other, np.random.randint(9)]
    x = out.float()
    if grey.any():
        w = torch.as_tensor(GREY).view(1, 1, 3, 1, 1)
        x[grey] = (x[grey] * w).sum(2, keepdim=True).expand(-1, -1, 3, -1, -1)
    mean = x.mean(dim=(2, 3, 4), keepdim=True)
    std = x.std(dim=(2, 3, 4), keepdim=True, unbiased=False)
    return {"tiles": (x - mean) / std.clamp_min(1.0), "label": label}


def baseline_loader(images, perms, args, device: str):
    from functools import partial

    import torch

    ds = PuzzleDataset(images, perms, args.image_size, args.crop, args.tile, args.channel_shift,
                       args.grey_prob, args.repeats)
    return torch.utils.data.DataLoader(
        ds, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
        collate_fn=partial(collate, max_foreign=args.max_foreign), persistent_workers=args.workers > 0,
        pin_memory=device == "cuda", worker_init_fn=common.nice_worker,
    )


def baseline_pass(loader, device: str) -> tuple[int, float, float]:
    import torch

    n = 0
    with common.Meter() as m:
        for batch in loader:
            n += batch["tiles"].to(device, non_blocking=True).shape[0]
        if device == "cuda":
            torch.cuda.synchronize()
    return n, m.wall, m.cpu


# --------------------------------------------------------------------------- ktray


def ktray_pass(path: str, split: str | None, perms: np.ndarray, args, device: str) -> tuple[int, float, float]:
    """One pass of the pretext stage's puzzle stream (ktray.methods.jigsaw.build_datasets, less the held-out filter)."""
    import torch

    from ktray.algos.jigsaw import PuzzleSpec
    from ktray.data.shards import read_images
    from ktray.methods.jigsaw import puzzle_batch

    spec = PuzzleSpec(crop=args.crop, tile=args.tile, max_foreign=args.max_foreign, grey_prob=args.grey_prob,
                      channel_shift=args.channel_shift)
    n = 0
    with common.Meter() as m:
        ds = read_images(path, split, block_rows=args.block_rows).map_batches(
            puzzle_batch, batch_size=args.batch_size, batch_format="numpy",
            fn_kwargs={"perms": perms, "spec": spec, "image_size": args.image_size, "repeats": args.repeats},
        )
        for batch in ds.iter_torch_batches(batch_size=args.batch_size * args.repeats, device=device):
            n += batch["tiles"].shape[0]
        if device == "cuda":
            torch.cuda.synchronize()
    return n, m.wall, m.cpu




def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--data", default="", help="shard directory (default: the bundled sample)")
    p.add_argument("--split", default="train", help="split to read ('all' for every split)")
    p.add_argument("--workers", type=int, default=2, help="Ray CPUs / DataLoader workers")
    p.add_argument("--passes", type=int, default=3, help="passes over the split (the first is a warm-up)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (data.decode_batch_size)")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--crop", type=int, default=111)
    p.add_argument("--tile", type=int, default=32)
    p.add_argument("--channel-shift", type=int, default=2)
    p.add_argument("--max-foreign", type=int, default=2)
    p.add_argument("--grey-prob", type=float, default=0.5)
    p.add_argument("--permutations", type=int, default=100)
    p.add_argument("--repeats", type=int, default=1, help="puzzles per decoded image (pretext.puzzles_per_image)")
    p.add_argument("--block-rows", type=int, default=None,
                   help="rows per Ray Data block (default: the batch size; 0: one block per shard, as before)")
    p.add_argument("--only", choices=["ktray", "baseline"], default=None, help="run one side (profiling)")
    args = p.parse_args()
    device = common.resolve_device(args.device)
    args.block_rows = args.batch_size if args.block_rows is None else args.block_rows

    import ray

    from ktray.algos.jigsaw import generate_permutations
    from ktray.data.shards import load_table, sample_path

    path = args.data or sample_path()
    split = None if args.split == "all" else args.split
    perms = generate_permutations(args.permutations, 3, 0)
    images = [bytes(b) for b in load_table(path, split, columns=["image"])["image"].to_pylist()]

    # The loader's workers fork before Ray starts; then the passes alternate, so that both
    # sides see the same load on a shared machine.
    loader = baseline_loader(images, perms, args, device) if args.only != "ktray" else None
    base: list[tuple[int, float]] = []
    ktr: list[tuple[int, float]] = []
    if loader is not None:
        base.append(baseline_pass(loader, device))
    if args.only != "baseline":
        common.init_ray(args.workers, device)
    for i in range(args.passes):
        if args.only != "baseline":
            ktr.append(ktray_pass(path, split, perms, args, device))
        if loader is not None and i > 0:
            base.append(baseline_pass(loader, device))
        print(f"pass {i + 1}: ktray {ktr[-1] if ktr else '-'}, baseline {base[-1] if base else '-'}", flush=True)
    ray.shutdown()

    rows = common.pass_rows("puzzles", ktr, base)
    common.report(
        "puzzles", f"decode + Jigsaw++ puzzles: {len(images)} images x {args.repeats} puzzle(s), "
        f"{args.image_size} px -> {args.crop} px crop, {args.tile} px tiles, {args.workers} workers, {device}",
        rows, baseline="DataLoader + PIL/torchvision per sample", device=device,
        params=vars(args) | {"images": len(images)}, extra={"ktray_passes": ktr, "baseline_passes": base},
        out=args.out,
    )


if __name__ == "__main__":
    main()
