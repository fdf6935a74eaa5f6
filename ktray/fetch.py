"""Download a public image set (Imagenette by default) with a checksum, resumably.

The real download path: ``urllib`` over http(s) (or ``file://`` in tests), written to a
``.part`` file and renamed once complete and verified, so an interrupted download is never
mistaken for a finished one.
"""

from __future__ import annotations

import hashlib
import shutil
import urllib.parse
import urllib.request
from pathlib import Path

# fast.ai's official Imagenette archives (ImageFolder layout: train/<wnid>/, val/<wnid>/).
KNOWN = {
    "imagenette": "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2.tgz",
    "imagenette-320": "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-320.tgz",
    "imagenette-160": "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-160.tgz",
}


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fetch(name_or_url: str, out: Path, sha256: str | None = None, timeout: float = 60.0) -> Path:
    """Download ``name_or_url`` into ``out``; return the archive's path (kept if already there)."""
    url = KNOWN.get(name_or_url, name_or_url)
    if urllib.parse.urlparse(url).scheme not in ("http", "https", "file"):
        raise ValueError(f"{name_or_url!r}: not a known data set ({', '.join(KNOWN)}) nor an http(s)/file URL")
    out.mkdir(parents=True, exist_ok=True)
    target = out / Path(urllib.parse.urlparse(url).path).name
    if target.exists() and (sha256 is None or sha256_of(target) == sha256):
        return target
    part = target.with_name(target.name + ".part")
    with urllib.request.urlopen(url, timeout=timeout) as resp, open(part, "wb") as f:
        shutil.copyfileobj(resp, f, length=1 << 20)
    if sha256 is not None and (got := sha256_of(part)) != sha256:
        part.unlink()
        raise ValueError(f"{url}: sha256 {got} does not match the expected {sha256}")
    part.replace(target)
    return target
