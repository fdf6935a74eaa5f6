"""Untrusted files and names: nothing from outside the run executes code or escapes the run root.

Faults and what must happen:
- a weights file, a training checkpoint, a permutation set or a PCA file that carries a
  pickled object (code that would run on load): refused, and the code never runs;
- a weights file that is not ktray's: refused with a message;
- a config name that would become a path (``../..``, ``/etc``): refused naming the field, before any work;
- a file name below a stage folder that climbs out: refused.
(Archives with ``..`` entries are refused by the packer: test_bad_data.py.)
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from ktray import training
from ktray.artifacts import PERMUTATIONS
from ktray.config import ConfigError, iter_fields, load_config
from ktray.methods.jigsaw import load_permutations
from ktray.models.trunks import load_trunk
from ktray.rundir import join, stage_dir
from ktray.stages.embed import load_pca


class Payload:
    """Unpickling this creates ``marker``: proof that loading the file ran code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.marker, "w"))


def _torch_file(path: Path, payload: Payload) -> None:
    torch.save({"arch": "alexnet", "width": 0.25, "state_dict": {}, "model": {}, "evil": payload}, path)


def _npy_file(path: Path, payload: Payload) -> None:
    np.save(path, np.array([payload], dtype=object), allow_pickle=True)


def _npz_file(path: Path, payload: Payload) -> None:
    np.savez(path, proj=np.array([payload], dtype=object))


def _load_checkpoint(path: Path) -> object:
    import ray.train

    (path.parent / training.META_FILE).write_text('{"history": [], "starts": [0], "epoch": 1}')
    return training.read_checkpoint(ray.train.Checkpoint.from_directory(str(path.parent)))


def _load_permutations(path: Path) -> object:
    sd = stage_dir(str(path.parent), "pretext", {})
    Path(sd.uri).mkdir()
    path.rename(sd.path(PERMUTATIONS))
    return load_permutations(sd)


LOADERS = {
    "weights file": (_torch_file, "teacher.pt", lambda p: load_trunk(str(p))),
    "training checkpoint": (_torch_file, training.STATE_FILE, _load_checkpoint),
    "permutation set": (_npy_file, "permutations.npy", _load_permutations),
    "PCA file": (_npz_file, "pca.npz", lambda p: load_pca(str(p))),
}


@pytest.mark.parametrize("kind", list(LOADERS))
def test_pickled_code_is_refused_and_never_runs(kind: str, tmp_path: Path) -> None:
    write, name, load = LOADERS[kind]
    marker = tmp_path / "pwned"
    path = tmp_path / name
    write(path, Payload(marker))
    with pytest.raises(Exception, match=r"[Ww]eights only load failed|Unsupported global|allow_pickle|[Pp]ickle"):
        load(path)
    assert not marker.exists(), f"loading a {kind} ran code from the file"


def test_foreign_weights_file_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    torch.save({"state_dict": {}}, bad)
    with pytest.raises(ValueError, match="not a ktray weights file"):
        load_trunk(str(bad))
    buf = io.BytesIO()
    torch.save({"arch": "alexnet", "width": 1.0, "state_dict": {}, "obj": Path("/")}, buf)
    (tmp_path / "obj.pt").write_bytes(buf.getvalue())
    with pytest.raises(Exception, match=r"[Ww]eights only load failed|Unsupported global"):
        load_trunk(str(tmp_path / "obj.pt"))


# Config strings that name something inside the run (splits, run and experiment names) carry a
# pattern; the others are locations the user chooses on purpose (root, data.path, tracking.uri)
# or free text, and never become a path below the run root.
USER_LOCATIONS = {"root", "data.path", "tracking.uri", "evaluate.data"}
NAMED = [name for name, tp, f in iter_fields() if tp is str and name not in USER_LOCATIONS]


def test_every_name_field_has_a_pattern() -> None:
    assert NAMED
    for name, _tp, f in iter_fields():
        if name in NAMED:
            assert f.metadata.get("pattern"), f"{name} reaches file or run names but has no pattern"


@pytest.mark.parametrize("name", NAMED)
@pytest.mark.parametrize("value", ["../../outside", "/etc/cron.d/x", "a/../../b", "..", "x y"])
def test_names_cannot_leave_the_run_root(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [f"{name}={value}"])
    assert str(err.value).startswith(name)


@pytest.mark.parametrize("part", ["../x", "a/../../b", "/abs", "..", "a\\..\\b"])
def test_stage_files_cannot_climb_out(part: str, tmp_path: Path) -> None:
    sd = stage_dir(str(tmp_path), "cluster", {})
    with pytest.raises(ValueError, match="would leave the folder"):
        sd.path(part)
    with pytest.raises(ValueError, match="would leave the folder"):
        join(str(tmp_path), part)
