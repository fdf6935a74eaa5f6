"""Secrets stay home: what ``ktray submit`` uploads, what MLflow receives, what is printed.

Faults and what must happen:
- a tree holding ``.env``, ``.netrc``, SSH keys, ``*.pem``, cloud credentials, a project-local
  ``.ray/auth_token``, a run root and a data folder under any name: none of them is uploaded; what is
  sent is printed (count, size, largest files) before sending; an oversized upload is refused;
- a stage manifest naming a symlink to a file outside the stage folder: never uploaded to MLflow;
- ``tracking.uri`` with ``user:password@``: the password is never logged as a param, printed in an
  error, put on the job's command line or handed to Ray Tune (which records and prints every trial's
  config), nor does a sweep's id derive from it; a live basic-auth server counts as reachable;
- hosts that only look like loopback (``127.0.0.1.attacker.example``): not loopback.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from ktray.config import load_config
from ktray.rundir import stage_dir, write_manifest
from ktray.submit import (
    EXCLUDES,
    MAX_UPLOAD_BYTES,
    SECRET_EXCLUDES,
    SubmitError,
    _is_loopback,
    config_excludes,
    credential_env,
    repo_root,
    submit,
    upload_plan,
)
from ktray.sweep import sweep_key, trial_config, trial_space
from ktray.tracking import (
    TrackingUnavailable,
    artifact_files,
    check_reachable,
    public_params,
    redact,
    tracking_credentials,
    without_credentials,
)

SECRETS = [
    ".env", "deploy/.env.production", ".netrc", "id_rsa", "keys/id_ed25519", "keys/id_ed25519.pub", "tls/server.pem",
    "tls/server.key", "application_default_credentials.json", "gcp/my-service-account.json", ".ray/auth_token",
    ".aws/credentials", ".ssh/config", "myruns/mlflow.db", "myruns/embed-abc/features/part-0.parquet",
    "shards/train-00000.parquet", "mlflow.db", ".git-credentials", ".pypirc", "packed/.pack_plan.json",
    "packed/train-00000.parquet", "oldruns/events.jsonl", "oldruns/pretext-1/teacher.bin",
]
CODE = ["jobs/pipeline.py", "ktray/__init__.py", "configs/mine.yaml", "README.md", "ktray/sample/train-00000.parquet"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    wd = tmp_path / "repo"
    for rel in SECRETS + CODE:
        (wd / rel).parent.mkdir(parents=True, exist_ok=True)
        (wd / rel).write_text(f"secret {rel}" if rel in SECRETS else f"# {rel}\n")
    (wd / "configs/mine.yaml").write_text("name: mine\n")
    (wd / "link.py").symlink_to(tmp_path / "outside.txt")
    (tmp_path / "outside.txt").write_text("not mine")
    return wd


def test_submit_uploads_no_secret_and_no_data(tree: Path) -> None:
    cfg = load_config("tiny", [f"root={tree / 'myruns'}", f"data.path={tree / 'shards'}"])
    excludes = [*EXCLUDES, *SECRET_EXCLUDES, *config_excludes(cfg, tree)]
    assert {"/myruns/", "/shards/"} <= set(excludes)
    files, links = upload_plan(tree, excludes)
    sent = {rel for rel, _ in files}
    assert sent == set(CODE), sent ^ set(CODE)
    assert links == ["link.py"]


def test_submit_prints_the_upload_then_fails_on_a_dead_address(tree: Path, capsys: pytest.CaptureFixture) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(SubmitError, match="cannot reach"):
        submit(["tiny", f"root={tree / 'myruns'}", f"data.path={tree / 'shards'}", "tracking.uri=http://alice:hunter2@mlflow.example"],
               address=url, working_dir=tree)
    out = capsys.readouterr()
    assert f"uploading {len(CODE)} files" in out.out
    assert "hunter2" not in out.out + out.err


def test_submit_refuses_an_oversized_upload(tree: Path) -> None:
    with open(tree / "features.bin", "wb") as f:
        f.truncate(MAX_UPLOAD_BYTES + 1)  # sparse: no disk used
    with pytest.raises(SubmitError, match=r"(?s)limit.*features\.bin"):
        submit(["tiny"], address=f"http://127.0.0.1:{free_port()}", working_dir=tree)


def test_this_repository_uploads_only_code() -> None:
    files, _ = upload_plan(repo_root(), [*EXCLUDES, *SECRET_EXCLUDES])
    sent = [rel for rel, _ in files]
    assert "jobs/pipeline.py" in sent and "ktray/submit.py" in sent
    assert not [r for r in sent if r.startswith((".venv/", "runs/", "data/", ".git/"))]
    assert sum(n for _, n in files) < MAX_UPLOAD_BYTES


def test_mlflow_artifacts_never_follow_links_out_of_the_stage(tmp_path: Path) -> None:
    secret = tmp_path / "credentials.json"
    secret.write_text('{"private_key": "x"}')
    sd = stage_dir(str(tmp_path / "runs"), "cluster", {"k": 2})
    sd.make()
    folder = Path(sd.uri)
    (folder / "gallery.png").write_bytes(b"png")
    (folder / "stolen.json").symlink_to(secret)
    (folder / "plots").mkdir()
    (folder / "plots" / "inner.png").symlink_to(folder / "gallery.png")  # inside: fine
    (folder / "escape").symlink_to(tmp_path)
    write_manifest(sd, config={"k": 2},
                   files=["gallery.png", "stolen.json", "plots/inner.png", "escape/credentials.json", "../x.json"])
    manifest = json.loads((folder / "manifest.json").read_text())
    assert artifact_files(sd, ["manifest.json", *manifest["files"]]) == ["manifest.json", "gallery.png",
                                                                        "plots/inner.png"]


class BasicAuth(BaseHTTPRequestHandler):
    expected = "Basic " + base64.b64encode(b"alice:s3cr3t").decode()

    def do_GET(self) -> None:
        ok = self.headers.get("Authorization") == self.expected
        self.send_response(200 if ok else 401)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def auth_server() -> Iterator[int]:
    server = HTTPServer(("127.0.0.1", 0), BasicAuth)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()


def test_tracking_credentials_work_and_never_leak(auth_server: int, monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(k, raising=False)
    check_reachable(f"http://alice:s3cr3t@127.0.0.1:{auth_server}")  # live with credentials: reachable
    with pytest.raises(TrackingUnavailable, match="refused the credentials") as wrong:
        check_reachable(f"http://alice:wrong-pass@127.0.0.1:{auth_server}")
    assert "wrong-pass" not in str(wrong.value)
    with pytest.raises(TrackingUnavailable, match="unreachable") as dead:
        check_reachable(f"http://alice:s3cr3t@127.0.0.1:{free_port()}")
    assert "s3cr3t" not in str(dead.value) and "alice" not in str(dead.value)

    cfg = load_config("tiny", ["tracking.uri=http://alice:s3cr3t@mlflow.example:5000"])
    params = public_params(cfg)
    assert params["tracking.uri"] == "http://***@mlflow.example:5000"
    assert "s3cr3t" not in json.dumps(params)
    items, env = credential_env(["cluster.k=7", "tracking.uri=https://alice:p%40ss@mlflow.example"])
    assert items == ["cluster.k=7", "tracking.uri=https://mlflow.example"]
    assert env == {"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": "p@ss"}
    assert redact("sqlite:///runs/mlflow.db") == "sqlite:///runs/mlflow.db"


def test_sweep_hands_tune_no_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tune records every trial's config (experiment state, params.json, result.json) and prints it:
    what the sweep hands it holds the tracking URI without userinfo; the trials get the credentials apart."""
    for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(k, raising=False)
    secret = load_config("tiny", ["tracking.uri=http://alice:s3cr3t-pw@mlflow.example:5000", "sweep.k=[4, 8]"])
    clean = load_config("tiny", ["tracking.uri=http://mlflow.example:5000", "sweep.k=[4, 8]"])
    sweep_id = sweep_key(secret)
    assert sweep_id == sweep_key(clean)  # no name derives from the password; a new password keeps the sweep
    space = trial_space(secret, sweep_id)
    shown = json.dumps(space) + repr(space) + repr(trial_config(without_credentials(secret), 4, 1))
    assert "s3cr3t-pw" not in shown and "alice" not in shown
    assert space["base"] == clean.to_dict() and space["k"] == {"grid_search": [4, 8]}
    assert tracking_credentials(secret) == {"MLFLOW_TRACKING_USERNAME": "alice",
                                            "MLFLOW_TRACKING_PASSWORD": "s3cr3t-pw"}
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "from-env")  # the driver's own credentials reach the trials too
    assert tracking_credentials(clean) == {"MLFLOW_TRACKING_PASSWORD": "from-env"}
    assert without_credentials(clean) is clean


@pytest.mark.parametrize(
    ("url", "loopback"),
    [
        ("http://127.0.0.1:8265", True),
        ("http://127.8.9.10:8265", True),
        ("http://localhost:8265", True),
        ("http://[::1]:8265", True),
        ("http://127.0.0.1.attacker.example:8265", False),
        ("http://127.evil.example", False),
        ("http://localhost.evil.example", False),
        ("http://10.0.0.5:8265", False),
        ("http://[::ffff:8.8.8.8]:8265", False),
    ],
)
def test_loopback_is_parsed_not_prefix_matched(url: str, loopback: bool) -> None:
    assert _is_loopback(url) is loopback
