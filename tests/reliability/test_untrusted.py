"""Untrusted files and names: nothing from outside the run executes code or escapes the run root.

Faults and what must happen:
- a weights file, a training checkpoint, a permutation set or a PCA file that carries a
  pickled object (code that would run on load): refused, and the code never runs;
- a weights file that is not ktray's: refused with a message;
- a config name that would become a path (``../..``, ``/etc``): refused naming the field, before any work;
- a file name below a stage folder that climbs out: refused;
- a weights file or a labels table that claims more than it holds (a width above the config's, tensors
  of other shapes or on no storage, compressed or lying zip records, a k that is not an integer or above
  the rows or the config's largest): refused in one line naming the file and the field, before anything
  is allocated from the claim (the process's peak memory stays put).
(Archives with ``..`` entries are refused by the packer: test_bad_data.py.)
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import resource
import time
import tracemalloc
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ktray import schema, training
from ktray.artifacts import LABELS, PERMUTATIONS, read_labels
from ktray.config import MAX_K, ConfigError, iter_fields, load_config
from ktray.methods.jigsaw import load_permutations
from ktray.models.trunks import (
    _torchvision_key,
    _torchvision_prefixes,
    build_trunk,
    check_weights,
    load_trunk,
    read_trunk,
    read_weights,
    save_weights,
)
from ktray.rundir import StageDir, join, stage_dir
from ktray.schema import SchemaError
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


# ----------------------------------------------------------------------------- files that claim more than they hold
# A weights file or a labels table is a few KB that names sizes: a width, tensor shapes, record
# lengths, a k. Each claim below is refused before anything is allocated from it, with one line
# naming the file and the field; the process's peak memory does not move (the old reader allocated
# GiBs for most of them, and the transfer helper was killed at 23 GB for k=10**9).

PEAK_LIMIT = 200 * 2**20


@contextlib.contextmanager
def peak_growth() -> Iterator[list[int]]:
    """Bytes the block added to the process's peak: the larger of the peak resident size's growth
    (torch's allocations) and tracemalloc's peak (numpy's and Python's)."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    tracemalloc.start()
    out: list[int] = []
    try:
        yield out
    finally:
        _, traced = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        out.append(max(traced, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024))


def _meta_state(arch: str, width: float, fc: bool = False) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return build_trunk(arch, width, fc=fc).state_dict()


def _expanded(shapes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors of the given shapes on one element each (stride 0): GiBs claimed, bytes held."""
    return {k: torch.zeros(1, dtype=v.dtype).expand(v.shape) if v.dim() else torch.zeros((), dtype=v.dtype)
            for k, v in shapes.items()}


def _saved(obj: object, **kw: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, **kw)
    return buf.getvalue()


def _recompressed(data: bytes) -> bytes:
    """The same torch.save zip with every record deflated (torch.load inflates them: a zip bomb)."""
    src = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for i in src.infolist():
            z.writestr(i.filename, src.read(i.filename), compress_type=zipfile.ZIP_DEFLATED)
    return out.getvalue()


def _claims_longer_records(data: bytes) -> bytes:
    """The same zip with each central-directory entry claiming a 1 GiB uncompressed record."""
    blob = bytearray(data)
    at = blob.find(b"PK\x01\x02")
    while at >= 0:
        blob[at + 24 : at + 28] = (2**30).to_bytes(4, "little")
        at = blob.find(b"PK\x01\x02", at + 4)
    return bytes(blob)


def _safetensors(state: dict[str, torch.Tensor], **meta: str) -> bytes:
    from safetensors.torch import save

    return save(state, metadata=meta)


def _weights_claims() -> dict[str, tuple[bytes, str]]:
    """name -> (file bytes, what the refusal names)."""
    good = _saved({"arch": "alexnet", "width": 0.25, "state_dict": build_trunk("alexnet", 0.25).state_dict()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's note on sparse invariants
        sparse = torch.sparse_coo_tensor([[0], [0]], [1.0], (10**6, 10**6))
    wrong_shape = build_trunk("alexnet", 0.25).state_dict()
    wrong_shape["stages.conv1.0.weight"] = torch.zeros(2, 3, 11, 11)
    with torch.device("meta"):
        prefixes = _torchvision_prefixes(build_trunk("resnet18", 4.0))
    tv_keys = {_torchvision_key(prefixes, k): v for k, v in _expanded(_meta_state("resnet18", 4.0)).items()}
    claims = {
        "width 8 (3.5 GiB)": ({"arch": "vgg16", "width": 8, "state_dict": {}}, "width 8 is not a width"),
        "a 4x AlexNet, no tensors (212 MB)": ({"arch": "alexnet", "width": 4.0, "state_dict": {}},
                                              "does not match the alexnet of width 4"),
        "width 4 with fc, no tensors": ({"arch": "vgg16", "width": 4.0, "state_dict": {"fc.fc6.0.weight":
                                         torch.zeros(1)}}, "does not match the vgg16 of width 4"),
        "width true": ({"arch": "alexnet", "width": True, "state_dict": {}}, "width True"),
        "width '7'": ({"arch": "alexnet", "width": "7", "state_dict": {}}, "width '7'"),
        "width nan": ({"arch": "alexnet", "width": math.nan, "state_dict": {}}, "width nan"),
        "width inf": ({"arch": "alexnet", "width": math.inf, "state_dict": {}}, "width inf"),
        "width 1e9": ({"arch": "alexnet", "width": 1e9, "state_dict": {}}, "width 1000000000.0"),
        "width 0": ({"arch": "alexnet", "width": 0, "state_dict": {}}, "width 0"),
        "arch vgg19": ({"arch": "vgg19", "width": 1.0, "state_dict": {}}, "arch 'vgg19'"),
        "arch 5": ({"arch": 5, "width": 1.0, "state_dict": {}}, "arch 5"),
        "state_dict a list": ({"arch": "alexnet", "width": 1.0, "state_dict": [1]}, "state_dict is not a mapping"),
        "stride-0 tensors of a 4x AlexNet with fc (3.5 GB)": (
            {"arch": "alexnet", "width": 4.0, "state_dict": _expanded(_meta_state("alexnet", 4.0, fc=True))},
            "tensors claim"),
        "a meta tensor": ({"arch": "alexnet", "width": 0.25, "state_dict": {"x": torch.empty(10**9, device="meta")}},
                          "not a dense CPU one"),
        "a sparse tensor": ({"arch": "alexnet", "width": 0.25, "state_dict": {"x": sparse}}, "not a dense CPU one"),
        "one wrong shape": ({"arch": "alexnet", "width": 0.25, "state_dict": wrong_shape},
                            "state_dict['stages.conv1.0.weight'] has shape (2, 3, 11, 11)"),
        "torchvision layout, stride-0 (GiBs)": (tv_keys, "tensors claim"),
    }
    out = {name: (_saved(obj), match) for name, (obj, match) in claims.items()}
    out["deflated records (a zip bomb)"] = (_recompressed(_saved({"w": torch.zeros(2**22)})), "compressed record")
    out["records claiming 1 GiB each"] = (_claims_longer_records(good), "claim more bytes")
    out["the pre-1.6 format"] = (_saved({"w": torch.zeros(3)}, _use_new_zipfile_serialization=False),
                                 "not a weights file in torch.save's zip format")
    out["not a weights file"] = (b"PK\x03\x04" + b"\x00" * 64, "not a weights file")
    out["safetensors width '8'"] = (_safetensors({"w": torch.zeros(1)}, arch="vgg16", width="8"), "width 8.0")
    out["safetensors width 'nan'"] = (_safetensors({"w": torch.zeros(1)}, arch="vgg16", width="nan"), "width nan")
    out["safetensors without a width"] = (_safetensors({"w": torch.zeros(1)}, arch="vgg16"), "width None")
    out["safetensors 4x VGG16, one tensor"] = (_safetensors({"w": torch.zeros(1)}, arch="vgg16", width="4"),
                                               "does not match the vgg16 of width 4")
    return out


CLAIMS = _weights_claims()


@pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants")
@pytest.mark.parametrize("name", list(CLAIMS))
def test_weights_that_claim_more_than_they_hold_are_refused(name: str, tmp_path: Path) -> None:
    data, match = CLAIMS[name]
    path = tmp_path / "teacher.pt"
    path.write_bytes(data)
    loaders = [read_trunk, check_weights] + ([load_trunk, read_weights] if b"safetensors" not in name.encode()
                                            and not name.startswith("torchvision") else [])
    with peak_growth() as peak:
        t0 = time.perf_counter()
        for load in loaders:
            with pytest.raises(SchemaError) as err:
                load(str(path))
            message = str(err.value)
            assert message.startswith(f"{path}: ") and "\n" not in message and match in message, message
        seconds = time.perf_counter() - t0
    assert peak[0] < PEAK_LIMIT, f"{name}: {peak[0] / 2**20:.0f} MB allocated from a {len(data):,}-byte file"
    assert seconds < 2, f"{name}: {seconds:.1f} s"


def test_a_refused_weights_file_leaves_no_evaluate_folder(tmp_path: Path) -> None:
    from ktray.stages import evaluate

    path = tmp_path / "claims.pt"
    path.write_bytes(CLAIMS["width 8 (3.5 GiB)"][0])
    cfg = load_config("tiny", [f"root={tmp_path / 'runs'}"])
    with pytest.raises(SchemaError, match="width 8 is not a width"):
        evaluate.run(cfg, str(path), name="claims")  # refused by the stage's check, before its folder and Ray
    assert not Path(evaluate.output_dir(cfg, str(path), name="claims").uri).exists()


def test_honest_weights_still_load(tmp_path: Path) -> None:
    trunk = build_trunk("alexnet", 0.25, fc=True)
    save_weights(trunk, str(tmp_path / "t.pt"))
    for load in (load_trunk, read_trunk):
        got = load(str(tmp_path / "t.pt")).state_dict()
        assert all(torch.equal(got[k], v) for k, v in trunk.state_dict().items())
    check_weights(str(tmp_path / "t.pt"))


def _labels_file(root: Path, k: object, rows: int = 5) -> StageDir:
    sd = stage_dir(str(root), "cluster", {"k": repr(k), "rows": rows})
    sd.make()
    table = pa.table({"image_id": [f"i{n}" for n in range(rows)], "cluster": pa.array([0] * rows, pa.int32()),
                      "distance": pa.array([0.0] * rows, pa.float32())}, schema=schema.LABELS)
    table = table.replace_schema_metadata({b"k": json.dumps(k).encode()})
    pq.write_table(table, sd.path(LABELS))
    return sd


@pytest.mark.parametrize(("k", "rows", "match"), [
    (10**12, 5, "k=1000000000000 is above 100,000"),
    (10**9, 5, "k=1000000000 is above 100,000"),
    (True, 5, "k=True is not an integer"),
    ("7", 5, "k='7' is not an integer"),
    (3.9, 5, "k=3.9 is not an integer"),
    (3.0, 5, "k=3.0 is not an integer"),
    (math.inf, 5, "k=inf is not an integer"),
    (None, 5, "k=None is not an integer"),
    ([3], 5, "k=[3] is not an integer"),
    (6, 5, "k=6 is above its 5 rows"),
    (MAX_K + 1, MAX_K + 1, f"k={MAX_K + 1} is above 100,000"),
])
def test_a_labels_table_claiming_any_k_is_refused(k: object, rows: int, match: str, tmp_path: Path) -> None:
    sd = _labels_file(tmp_path, k, rows)
    with peak_growth() as peak, pytest.raises(SchemaError) as err:
        read_labels(sd)
    message = str(err.value)
    assert message.startswith(f"{sd.path(LABELS)}: labels table: metadata ") and match in message, message
    assert "\n" not in message and peak[0] < PEAK_LIMIT
    assert read_labels(_labels_file(tmp_path, 5, 5))[1] == 5  # an honest k as large as the rows
