"""Stage folders keep their names: a run root made before a change is reused after it.

``fixtures/stage_names.json`` holds the folder names that ktray at commit 484f39d (before the
stage lifecycle was rewritten) gave every stage for a set of configs; the names are hashes of
each stage's params and inputs. The configs are the tiny preset as it was then
(``fixtures/tiny-484f39d.yaml``): the preset may change, the code must keep naming the same
config the same way. If a change to a stage's params, its inputs or the hash renames a folder,
every existing run root silently recomputes that stage and everything after it. Changing a
name on purpose means regenerating the fixture and saying so in the commit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ktray import compare
from ktray.config import load_config
from ktray.data.shards import data_path
from ktray.stages import cluster, embed, evaluate, hog, pretext, real_labels, transfer

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE = json.loads((FIXTURES / "stage_names.json").read_text())
# The weights file the fixture's evaluate folders were hashed with (a trunk is named by its bytes).
WEIGHTS = b"ktray stage-name fixture weights\n"


def names_of(overrides: list[str], weights: str) -> dict[str, str]:
    cfg = load_config(FIXTURES / "tiny-484f39d.yaml", ["root=/runs", *overrides])
    teacher = pretext.output_dir(cfg)
    features = embed.output_dir(cfg, teacher)
    labels = cluster.output_dir(cfg, features, images=data_path(cfg.data))
    student = transfer.output_dir(cfg, features if cfg.transfer.method == "distill" else labels)
    rand = evaluate.output_dir(cfg, "random:alexnet:0.25", name="Random")
    cc = evaluate.output_dir(cfg, weights, labels, name="CC+Jigsaw++")
    table = compare.table_spec(cfg, {"random": rand, "cc_jigsaw": cc}).dir
    dirs = {
        "pretext": teacher, "embed": features, "cluster": labels,
        "cluster_no_images": cluster.output_dir(cfg, features), "transfer": student,
        "evaluate_student": evaluate.output_dir(cfg, weights, labels, name="student"),
        "evaluate_random": rand, "hog": hog.output_dir(cfg), "reallabels": real_labels.output_dir(cfg),
        "compare": table,
    }
    return {k: d.name for k, d in dirs.items()}


@pytest.mark.parametrize("case", sorted(FIXTURE))
def test_stage_folders_keep_their_names(case: str, tmp_path: Path) -> None:
    weights = tmp_path / "weights.pt"
    weights.write_bytes(WEIGHTS)
    assert names_of(FIXTURE[case]["overrides"], str(weights)) == FIXTURE[case]["names"]
