"""Transfer: train the student from scratch on what the teacher knows (paper Sec. 4).

The method ``transfer.method`` names decides what the student learns from: ``cluster``
(cluster classification, the paper's: ``upstream`` is a cluster stage) or ``distill``
(similarity distillation: ``upstream`` is an embed stage, the teacher's embeddings). A method
is a module in ``ktray.methods`` with ``transfer_params``, ``check`` and ``compute``; a new one
is a new module and one line in :data:`METHODS`. Every method writes ``student.pt``, and a run
resumes from the last epoch checkpoint of an interrupted run of the same folder.
"""

from __future__ import annotations

from functools import partial
from types import ModuleType
from typing import TYPE_CHECKING, Any

from ktray.data.shards import data_identity, data_path
from ktray.lifecycle import StageSpec, ensure
from ktray.methods import cluster_classification, distill
from ktray.rundir import StageDir

if TYPE_CHECKING:
    from ktray.config import Config

METHODS: dict[str, ModuleType] = {"cluster": cluster_classification, "distill": distill}


def params(cfg: Config) -> dict[str, Any]:
    """What the student depends on (its folder hash); compute settings are left out, so a run
    interrupted on 2 workers resumes on 4."""
    return {
        "transfer": METHODS[cfg.transfer.method].transfer_params(cfg),
        "seed": cfg.seed,
        "data": {"train_split": cfg.data.train_split, "limit": cfg.data.limit},
    }


def spec(cfg: Config, upstream: StageDir) -> StageSpec:
    method = METHODS[cfg.transfer.method]
    return StageSpec("transfer", cfg, params(cfg), [upstream, data_identity(cfg.data)], method.compute,
                     args=(upstream,), check=partial(method.check, cfg, upstream), data=(data_path(cfg.data),))


def output_dir(cfg: Config, upstream: StageDir) -> StageDir:
    return spec(cfg, upstream).dir


def run(cfg: Config, upstream: StageDir, **how: Any) -> StageDir:
    """The student's stage folder, trained first unless done (``how``: ``force``, ``tracker``)."""
    return ensure(spec(cfg, upstream), **how)
