"""Config: presets load, overrides apply, and every bad value names its field before work starts."""

from __future__ import annotations

import subprocess
import sys
import typing
from typing import Any, Literal

import pytest

from ktray.config import PRESETS_DIR, Config, ConfigError, iter_fields, load_config, replace


def _invalid_values(tp: Any, meta: dict[str, Any]) -> list[Any]:
    """Values the field must refuse, derived from its declared type and bounds."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return ["not-a-choice", 12345]
    if origin is tuple:
        (item,) = typing.get_args(tp)[:1]
        return ["scalar-not-a-list", [_invalid_values(item, {})[0]]]
    bad: list[Any] = {int: ["seven", 1.5, True], float: ["fast", None], bool: ["yes", 1], str: [42, ["a"]]}[tp]
    if meta.get("pattern"):
        bad += ["../../outside", "/etc/passwd", "a b"]  # names that would leave the run root or split a word
    for key, delta in (("ge", -1), ("gt", 0), ("le", 1), ("lt", 0)):
        if meta.get(key) is not None:
            bad.append(meta[key] + delta if tp is int or key in ("ge", "le") else meta[key])
    return bad


FIELDS = list(iter_fields())


@pytest.mark.parametrize("name,tp,field", FIELDS, ids=[f[0] for f in FIELDS])
def test_every_field_refuses_invalid_values(name: str, tp: Any, field: Any) -> None:
    for value in _invalid_values(tp, dict(field.metadata)):
        with pytest.raises(ConfigError) as err:
            load_config(None, [f"{name}={value!r}" if isinstance(value, str) else f"{name}={value}"])
        assert str(err.value).startswith(name), (name, value, str(err.value))


def test_every_field_is_documented() -> None:
    assert FIELDS
    for name, _tp, field in FIELDS:
        assert field.metadata.get("doc"), f"{name} has no docstring"


@pytest.mark.parametrize("preset", sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
def test_presets_load(preset: str) -> None:
    cfg = load_config(preset)
    assert isinstance(cfg, Config)
    assert Config.from_dict(cfg.to_dict()) == cfg  # round trip


def test_overrides_apply_and_validate() -> None:
    cfg = load_config("tiny", ["cluster.k=500", "pretext.lr=0.5", "evaluate.taps=[conv3, conv4]"])
    assert cfg.cluster.k == 500 and cfg.pretext.lr == 0.5 and cfg.evaluate.taps == ("conv3", "conv4")
    assert replace(cfg, ["cluster.k=7"]).cluster.k == 7
    with pytest.raises(ConfigError, match=r"^cluster\.kk: unknown key; allowed keys here: .*k"):
        load_config("tiny", ["cluster.kk=3"])
    with pytest.raises(ConfigError, match=r"^clusterr: unknown key"):
        load_config("tiny", ["clusterr.k=3"])
    with pytest.raises(ConfigError, match=r"^cluster\.k: expected an integer, got 'many'"):
        load_config("tiny", ["cluster.k=many"])
    with pytest.raises(ConfigError, match=r"^cluster\.k: must be >= 2, got 1"):
        load_config("tiny", ["cluster.k=1"])
    with pytest.raises(ConfigError, match=r"compute\.device: expected one of 'auto', 'cpu', 'cuda'"):
        load_config("tiny", ["compute.device=gpu"])
    with pytest.raises(ConfigError, match=r"^pretext\.tile: must be <= crop // 3"):
        load_config("tiny", ["pretext.crop=90", "pretext.tile=40"])
    with pytest.raises(ConfigError, match="no such file or preset"):
        load_config("nope")


def test_yaml_errors_name_the_field(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("cluster:\n  k: 10\n  niter: fast\n")
    with pytest.raises(ConfigError, match=r"^cluster\.niter: expected an integer"):
        load_config(bad)
    bad.write_text("cluster: 5\n")
    with pytest.raises(ConfigError, match=r"^cluster: expected a mapping"):
        load_config(bad)


def test_cli_reports_config_errors_before_work(tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ktray", "run", "tiny", f"root={tmp_path}/r", "transfer.epochs=0"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "transfer.epochs: must be >= 1, got 0" in proc.stderr
    assert not (tmp_path / "r").exists()  # nothing was started
