"""A finished stage whose folder was damaged after the fact: never reused, never a bare traceback.

Faults and what must happen:
- a file the manifest lists was deleted: the rerun stops before any work, naming the stage to ``--force``;
- a torn ``manifest.json``: the same; ``--force`` recomputes the stage and it is whole again.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ktray.config import load_config
from ktray.lifecycle import Output, StageDamaged, StageSpec, ensure


def write_two(cfg: object, sd: object) -> Output:
    for name in ("a.npy", "b.json"):
        Path(sd.path(name)).write_text(name)  # type: ignore[attr-defined]
    return Output(["a.npy", "b.json"], {"x": 1.0})


def test_damaged_stage_is_refused_then_forced(tmp_path: Path) -> None:
    cfg = load_config("tiny", [f"root={tmp_path / 'runs'}"])
    spec = StageSpec("cluster", cfg, {"k": 3}, [], write_two, needs_ray=False)
    sd = ensure(spec)
    assert ensure(spec).uri == sd.uri  # whole: reused
    Path(sd.path("b.json")).unlink()
    with pytest.raises(StageDamaged, match=r"1 of its files are gone \(b\.json\).*--force cluster"):
        ensure(spec)
    ensure(spec, force=True)
    assert Path(sd.path("b.json")).exists() and sd.damage() is None
    manifest = Path(sd.path("manifest.json"))
    manifest.write_text(manifest.read_text()[:40])  # torn
    with pytest.raises(StageDamaged, match=r"manifest\.json cannot be read.*--force cluster"):
        ensure(spec)
    ensure(spec, force=True)
    assert sd.damage() is None
