"""Rebuild the bundled sample (ktray/sample/) from the Imagenette zip.

    python scripts/make_sample.py ../shared/data/imagenette/imagenette2-224.zip

Takes the first N train and M val images of each class (sorted file names, so the choice is
reproducible), downsizes them to at most 128 px, re-encodes them as JPEG and packs them with
`ktray.data.pack.pack` into ktray/sample/. See ktray/sample/README.md for provenance and licence.
"""

from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path

from PIL import Image

from ktray.data.pack import Source, _strip_common_root, layout, pack
from ktray.data.shards import sample_path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("zip", type=Path)
    ap.add_argument("--train", type=int, default=100, help="train images per class")
    ap.add_argument("--val", type=int, default=30, help="val images per class")
    ap.add_argument("--size", type=int, default=128, help="longest side after downsizing (px)")
    ap.add_argument("--quality", type=int, default=85, help="JPEG quality")
    args = ap.parse_args()

    source = Source(args.zip)
    entries, _ = source.list()
    root = _strip_common_root([e.relpath for e in entries])
    quota = {"train": args.train, "val": args.val}
    taken: dict[tuple[str, str], int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for e in entries:
            rel = e.relpath[len(root):]
            split, cls = layout(rel)
            if cls is None or split not in quota or taken.get((split, cls), 0) >= quota[split]:
                continue
            img = Image.open(io.BytesIO(source.read(e.relpath))).convert("RGB")
            img.thumbnail((args.size, args.size), Image.BICUBIC)
            dst = Path(tmp) / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            img.save(dst, "JPEG", quality=args.quality)
            taken[(split, cls)] = taken.get((split, cls), 0) + 1
        out = Path(sample_path())
        for f in out.glob("*.parquet"):
            f.unlink()
        report = pack(tmp, str(out), workers=1)
        (out / "pack_report.json").write_text((out / "pack_report.json").read_text().replace(tmp, str(args.zip.name)))
    print({s: v["images"] for s, v in report["splits"].items()})


if __name__ == "__main__":
    main()
