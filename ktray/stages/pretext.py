"""The pretext stage: train the teacher with the method ``pretext.method`` names.

A method is a module in ``ktray.methods`` with ``params(cfg)`` (what its teacher depends on,
hashed) and ``compute(cfg, stage_dir)`` (train, write ``teacher.pt``); a new teacher method is a
new module and one line in :data:`METHODS`. Every method writes the trunk as ``teacher.pt``, so
embed, cluster, transfer and evaluate take any teacher unchanged.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING, Any

from ktray.data.shards import data_identity, data_path
from ktray.lifecycle import StageSpec, ensure
from ktray.methods import isd, jigsaw
from ktray.rundir import StageDir

if TYPE_CHECKING:
    from ktray.config import Config

METHODS: dict[str, ModuleType] = {"jigsaw": jigsaw, "isd": isd}


def spec(cfg: Config) -> StageSpec:
    method = METHODS[cfg.pretext.method]
    return StageSpec("pretext", cfg, method.params(cfg), [data_identity(cfg.data)], method.compute,
                     data=(data_path(cfg.data),))


def output_dir(cfg: Config) -> StageDir:
    return spec(cfg).dir


def run(cfg: Config, **how: Any) -> StageDir:
    """The teacher's stage folder, trained first unless done (``how``: ``force``, ``tracker``)."""
    return ensure(spec(cfg), **how)
