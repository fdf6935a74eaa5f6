"""Benchmark: embed, ktray's Ray Data actor-pool path against a bare DataLoader + model loop.

ktray: the embed stage's dataset (``ktray.stages.embed._embed_dataset``): ``read_images`` ->
``decode_batch`` tasks (center crop) -> the ``Embedder`` actor pool (trunk loaded once per
actor, conv4 max-pooled to a grid) -> features tables, iterated on the driver.

Baseline: a ``torch.utils.data.DataLoader`` with ``--workers`` workers decoding each image with
PIL + torchvision ``Resize`` / ``CenterCrop``, and the same trunk, tap, pooling and per-image
standardisation in the main process (``ktray.stages.embed.embed_pixels``' math, written out).

Same teacher (a seeded random trunk of the given architecture), same batch, same resources:
``--workers`` decode processes and ``--threads`` torch threads for the model on both sides
(Ray gets workers + threads CPUs; the actor pool reserves the threads). The passes alternate
between the two and the first of each is reported apart (actor and worker start-up).

    python benchmarks/embed.py                                    # the tiny preset's teacher and tap
    python benchmarks/embed.py --device cuda --arch vgg16 --width 1 --image-size 224 --batch-size 256
"""

from __future__ import annotations

import io
import tempfile

import common


class ImageDataset:
    """Encoded images -> (3, S, S) uint8, decoded per sample with PIL and torchvision."""

    def __init__(self, images: list[bytes], size: int):
        from torchvision import transforms

        self.images = images
        self.resize = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size)])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from PIL import Image
        from torchvision.transforms.functional import pil_to_tensor

        return pil_to_tensor(self.resize(Image.open(io.BytesIO(self.images[i])).convert("RGB")))


def baseline_pass(loader, trunk, args, device: str) -> tuple[int, float, float]:
    import torch

    n, out = 0, []
    with common.Meter() as m, torch.inference_mode():
        for pixels in loader:  # (B, 3, S, S) uint8
            x = pixels.to(device, non_blocking=True).float()
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            std = x.std(dim=(1, 2, 3), keepdim=True, unbiased=False)
            x = (x - mean) / std.clamp_min(1.0)
            if device == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
                act = trunk.taps(x, [args.tap])[args.tap]
            feat = torch.nn.functional.adaptive_max_pool2d(act.float(), args.grid).flatten(1)
            out.append(feat.cpu().numpy())
            n += len(feat)
    return n, m.wall, m.cpu


def ktray_pass(path: str, split: str | None, weights: str, cfg, device: str) -> tuple[int, float, float]:
    from ktray.data.shards import read_images
    from ktray.stages.embed import _embed_dataset

    n = 0
    with common.Meter() as m:
        ds = read_images(path, split, block_rows=cfg.data.decode_batch_size)
        out = _embed_dataset(cfg, ds, weights, device, None, False, None)
        for batch in out.iter_batches(batch_size=None, batch_format="pyarrow"):
            n += batch.num_rows
    return n, m.wall, m.cpu


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--data", default="", help="shard directory (default: the bundled sample)")
    p.add_argument("--split", default="train", help="split to read ('all' for every split)")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--tap", default="conv4")
    p.add_argument("--grid", type=int, default=4)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (and per decode batch)")
    p.add_argument("--workers", type=int, default=1, help="decode workers (Ray CPUs for decode tasks)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the model (the actor's CPUs)")
    p.add_argument("--passes", type=int, default=3, help="passes (the first is a warm-up)")
    args = p.parse_args()
    device = common.resolve_device(args.device)

    import ray
    import torch

    from ktray.config import load_config
    from ktray.data.shards import load_table, sample_path
    from ktray.models import trunks

    path = args.data or sample_path()
    split = None if args.split == "all" else args.split
    images = [bytes(b) for b in load_table(path, split, columns=["image"])["image"].to_pylist()]
    cfg = load_config("tiny", [
        f"compute.cpus_per_worker={args.threads}", "embed.num_actors=1", f"embed.batch_size={args.batch_size}",
        f"data.decode_batch_size={args.batch_size}", f"embed.tap={args.tap}", f"embed.grid={args.grid}",
        f"embed.image_size={args.image_size}",
    ])

    with tempfile.TemporaryDirectory(prefix="ktray-bench-") as tmp:
        weights = f"{tmp}/teacher.pt"
        torch.manual_seed(0)
        trunks.save_weights(trunks.build_trunk(args.arch, args.width), weights)
        trunk = trunks.load_trunk(weights).to(device).eval()
        if device == "cuda":
            trunk = trunk.to(memory_format=torch.channels_last)
        else:
            torch.set_num_threads(args.threads)
        loader = torch.utils.data.DataLoader(
            ImageDataset(images, args.image_size), batch_size=args.batch_size, num_workers=args.workers,
            persistent_workers=args.workers > 0, pin_memory=device == "cuda", worker_init_fn=common.nice_worker,
        )
        base = [baseline_pass(loader, trunk, args, device)]  # its workers fork before Ray starts
        common.init_ray(args.workers + args.threads, device)
        ktr = []
        for i in range(args.passes):
            ktr.append(ktray_pass(path, split, weights, cfg, device))
            if i > 0:
                base.append(baseline_pass(loader, trunk, args, device))
            print(f"pass {i + 1}: ktray {ktr[-1]}, baseline {base[-1]}", flush=True)
        ray.shutdown()

    rows = common.pass_rows("rows", ktr, base)
    common.report(
        "embed", f"embed: {len(images)} images, {args.arch} x{args.width:g} {args.tap} pooled {args.grid}x{args.grid} "
        f"at {args.image_size} px, batch {args.batch_size}, {args.workers} decode worker(s) + {args.threads} "
        f"model thread(s), {device}",
        rows, baseline="DataLoader + model loop", device=device, params=vars(args) | {"images": len(images)},
        extra={"ktray_passes": ktr, "baseline_passes": base}, out=args.out,
    )


if __name__ == "__main__":
    main()
