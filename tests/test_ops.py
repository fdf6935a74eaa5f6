"""Operations: cluster configs, token-authenticated job submission, metrics and dashboards.

Everything runs against the real thing: the cluster launcher's own config validator, real
``ray start --head`` clusters with token authentication, Ray's Jobs API, a real Prometheus
(Debian's package) scraping a real Ray metrics agent, and Ray's fake multi-node autoscaler.

Each Ray cluster here is started in its own session (``start_new_session``), temp dir and
free loopback ports, and stopped by signalling exactly the processes of that session:
never ``ray stop``, which stops every Ray on the machine (other people's tests included).
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` makes Ray take 127.0.0.1 as the node address, so
every connection stays on loopback.

Run as a script (``python tests/test_ops.py workload ...``) this file is also the Ray job
that the metrics test submits: it records every ktray metric from the kind of process that
records it in a real run (Ray Data tasks, a training actor, the driver).
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from local_cluster import RAY_CLI, LocalCluster, free_ports, http_status

from ktray.data.decode import decode_batch
from ktray.data.shards import read_images, sample_path

REPO = Path(__file__).resolve().parents[1]
CLUSTER_CONFIGS = ["cluster.yaml", "cluster-gcp.yaml"]
# Metrics that exist only where NVML sees a physical GPU (Ray's node metrics).
PHYSICAL_GPU_METRICS = ("ray_node_gpus_utilization", "ray_node_gram_used", "ray_node_gram_available")


# --------------------------------------------------------------------------- helpers


def run_python(code: str, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


# --------------------------------------------------------------------------- cluster.yaml


def prepared(name: str) -> dict[str, Any]:
    """The config as ``ray up`` sees it: defaults merged, then the launcher's schema validation."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((REPO / name).read_text()))
    validate_config(config)
    return config


def setup_of(config: dict[str, Any], node_type: str) -> list[str]:
    """The setup commands the launcher runs on a node of ``node_type`` (head: merged setup + head setup)."""
    if node_type == config["head_node_type"]:
        return config["head_setup_commands"]
    nt = config["available_node_types"][node_type]
    return nt.get("worker_setup_commands", config["setup_commands"] + config["worker_setup_commands"])


@pytest.mark.parametrize("name", CLUSTER_CONFIGS)
def test_cluster_config_passes_ray_validation(name: str) -> None:
    config = prepared(name)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    gpu = [t for t, nt in types.items() if nt["resources"].get("GPU", 0) > 0]
    assert gpu, "a GPU worker type"
    for t in gpu:
        assert types[t]["min_workers"] == 0, f"{t}: GPU workers must scale to zero"
        setup = " ; ".join(setup_of(config, t))
        assert '.[gpu]"' in setup and ".[cpu]" not in setup, f"{t}: GPU faiss, and only it: {setup}"
    for t in set(types) - set(gpu):
        setup = " ; ".join(setup_of(config, t))
        assert '.[cpu]"' in setup and ".[gpu]" not in setup, f"{t}: CPU faiss, and only it"
    # Drivers only on the head: it takes no tasks (CPU 0), and only it advertises ktray_driver.
    assert head["resources"].get("CPU") == 0 and head["resources"].get("ktray_driver", 0) >= 1
    assert [t for t, nt in types.items() if nt["resources"].get("ktray_driver")] == [config["head_node_type"]]
    assert config["idle_timeout_minutes"] > 0
    # The autoscaler on the head needs the provider's SDK: replacing head_setup_commands drops Ray's default.
    sdk = {"aws": "boto3", "gcp": "google-api-python-client"}[config["provider"]["type"]]
    assert any(sdk in c for c in config["head_setup_commands"]), f"head must install {sdk}"
    # Every node starts Ray with token auth and the metrics port; the dashboard stays on loopback.
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    ray_starts = [c for c in starts if "ray start" in c]
    assert len(ray_starts) == 2
    for c in ray_starts:
        assert "RAY_AUTH_MODE=token" in c and "--metrics-export-port=" in c, c
    assert "--dashboard-host=127.0.0.1" in ray_starts[0]
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    # One Ray everywhere, pinned, and new enough for token auth (2.52).
    pins = set(re.findall(r"ray\[[a-z,]+\]==([0-9.]+)", " ".join(config["setup_commands"])))
    assert len(pins) == 1 and tuple(int(x) for x in pins.pop().split(".")[:2]) >= (2, 52)
    # Comments with '#' in a plain YAML scalar silently truncate a command: every printf must be whole.
    for c in config["setup_commands"]:
        assert c.count("'") % 2 == 0, f"unbalanced quotes (YAML comment cut?): {c}"


def test_cluster_configs_share_commands() -> None:
    """cluster-gcp.yaml differs from cluster.yaml in provider and machines, not in how ktray is set up."""
    aws, gcp = prepared("cluster.yaml"), prepared("cluster-gcp.yaml")
    for key in ("setup_commands", "head_start_ray_commands", "worker_start_ray_commands", "file_mounts"):
        assert aws[key] == gcp[key], key
    for t in aws["available_node_types"]:
        a, g = aws["available_node_types"][t], gcp["available_node_types"][t]
        assert a["resources"] == g["resources"] and a.get("worker_setup_commands") == g.get("worker_setup_commands")


# --------------------------------------------------------------------------- submit (no cluster)


def test_entrypoint_and_config_checks(tmp_path: Path) -> None:
    from ktray.config import ConfigError
    from ktray.submit import EXCLUDES, build_entrypoint, config_argument, runtime_env

    config, overrides, cfg = config_argument(["tiny", "cluster.k=7", "evaluate.taps=[conv3, conv5]"], REPO)
    assert (config, overrides, cfg.cluster.k) == ("tiny", ["cluster.k=7", "evaluate.taps=[conv3, conv5]"], 7)
    entry = build_entrypoint("pipeline", config, overrides)
    assert entry == "python jobs/pipeline.py --config tiny cluster.k=7 'evaluate.taps=[conv3, conv5]'"
    config, _, _ = config_argument([str(REPO / "configs" / "tiny.yaml")], REPO)
    assert config == "configs/tiny.yaml"  # resolved inside the uploaded working dir
    outside = tmp_path / "mine.yaml"
    outside.write_text("name: mine\n")
    with pytest.raises(ConfigError, match="outside the uploaded working directory"):
        config_argument([str(outside)], REPO)
    with pytest.raises(ConfigError, match=r"cluster\.k"):
        config_argument(["tiny", "cluster.k=0"], REPO)
    env = runtime_env(REPO, {"KTRAY_RUN": "x"})
    assert env["working_dir"] == str(REPO) and env["env_vars"] == {"KTRAY_RUN": "x"}
    assert {"/runs/", ".venv/", "/data/"} <= set(EXCLUDES)


def test_token_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ktray.submit import resolve_address, resolve_token

    for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_token() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert resolve_token() == "from-home"
    (tmp_path / "t").write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "t"))
    assert resolve_token() == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert resolve_token() == "from-env" and resolve_token("explicit") == "explicit"
    assert resolve_address() == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:8265")
    assert resolve_address() == "http://10.0.0.1:8265" and resolve_address("http://h:1") == "http://h:1"


# --------------------------------------------------------------------------- metrics (no cluster)


def test_metrics_are_noops_without_ray() -> None:
    """Helpers cost nothing where Ray is not running (no import of ray, no error)."""
    code = (
        "import sys\n"
        "from ktray import metrics\n"
        "metrics.record_decode(3, 1, stage='embed'); metrics.record_training('pretext', 0, 1.0, 0.5, 10.0)\n"
        "metrics.record_kmeans(0, 1.0, 2, sizes=[1, 2]); metrics.record_rows('cluster', 5)\n"
        "with metrics.stage_timer('cluster'): pass\n"
        "print('ray' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_metric_names_and_dashboards_are_in_sync() -> None:
    """Every ktray metric a dashboard queries is declared, and the JSON files are what build.py writes."""
    sys.path.insert(0, str(REPO / "dashboards"))
    try:
        import build
    finally:
        sys.path.pop(0)
    from ktray.metrics import METRICS

    for name, text in build.build().items():
        assert (REPO / "dashboards" / name).read_text() == text, f"{name} is stale: run python dashboards/build.py"
    exported = {s.exported for s in METRICS.values()}
    used = {m for _, expr in dashboard_queries() for m in re.findall(r"\bray_ktray_\w+", expr)}
    assert used <= exported, used - exported
    assert exported - used == set(), f"declared but never shown: {exported - used}"


def test_metrics_api_with_ray(ray_session: None) -> None:
    """Tags are checked, gauges are kept for re-publishing until forgotten, unknown names fail."""
    from ktray import metrics

    assert metrics.enabled()
    metrics.gauge("train_loss").set(1.5, stage="unit", split="train", run="r")
    metrics.record_kmeans(3, 2.0, splits=0, sizes=[1, 2, 3], stage="unit", run="r")
    metrics.counter("rows_written").inc(0, stage="unit")  # <= 0: ignored, not an error
    reg = metrics._registry()
    names = {name for name, tags in reg._gauges if dict(tags).get("stage") == "unit"}
    assert names == {"ktray_train_loss", "ktray_kmeans_iteration", "ktray_kmeans_objective",
                     "ktray_kmeans_empty_clusters", "ktray_kmeans_cluster_size"}
    assert reg._thread is not None and reg._thread.is_alive()
    metrics.forget("unit")
    assert not [k for k in reg._gauges if dict(k[1]).get("stage") == "unit"]
    with pytest.raises(ValueError, match="missing"):
        metrics.gauge("train_loss").set(1.0, stage="unit")  # no split
    with pytest.raises(ValueError, match="unknown"):
        metrics.counter("rows_written").inc(1, stage="unit", epoch=3)
    with pytest.raises(KeyError, match="no counter named"):
        metrics.counter("train_loss")


def test_size_stats() -> None:
    from ktray.metrics import size_stats

    # sorted 1 1 2 4 7; p90 interpolates between the 4th and 5th values: 4 + 0.6 * (7 - 4)
    assert size_stats([4, 1, 1, 2, 7]) == pytest.approx({"min": 1, "p10": 1, "median": 2, "p90": 5.8, "max": 7})


def dashboard_variables() -> list[tuple[str, str]]:
    """(name, label_values query) of every query variable of every dashboard."""
    return [(v["name"], v["query"]["query"]) for f in sorted((REPO / "dashboards").glob("*.json"))
            for v in json.loads(f.read_text())["templating"]["list"] if v["type"] == "query"]


def dashboard_queries() -> list[tuple[str, str]]:
    """(dashboard/panel title, PromQL) of every target of every dashboard panel."""
    out = []
    for f in sorted((REPO / "dashboards").glob("*.json")):
        d = json.loads(f.read_text())
        for p in d["panels"]:
            for t in p.get("targets", []):
                out.append((f"{d['title']} / {p['title']} [{t['refId']}]", t["expr"]))
    return out


# --------------------------------------------------------------------------- a token-authenticated cluster


@pytest.fixture(scope="module")
def auth_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A real head node with ``RAY_AUTH_MODE=token``, a generated token and a metrics port."""
    cluster = LocalCluster(tmp_path_factory.mktemp("auth-cluster"), token=secrets.token_hex(32))
    try:
        cluster.wait_ready()
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.slow
def test_token_auth_rejects_jobs_without_the_token(auth_cluster: LocalCluster) -> None:
    from ktray.submit import SubmitError, client, submit, wait

    c = auth_cluster
    # The Jobs API itself: no token -> 401, a wrong one -> 403, the cluster's -> 200.
    assert http_status(f"{c.dashboard}/api/jobs/") == 401
    assert http_status(f"{c.dashboard}/api/jobs/", token="0" * 64) == 403
    assert http_status(f"{c.dashboard}/api/jobs/", token=c.token) == 200

    # Ray's own CLI without a token (no RAY_AUTH_TOKEN, a HOME without ~/.ray/auth_token): refused.
    out = subprocess.run([RAY_CLI, "job", "submit", "--address", c.dashboard, "--no-wait", "--", "echo", "pwned"],
                         env=c.client_env(token=None), capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode != 0 and "Authentication" in out.stdout + out.stderr, out.stdout + out.stderr
    # `ktray submit` without a token, in a clean process: refused, with a message saying what to do.
    out = subprocess.run([sys.executable, "-m", "ktray", "submit", "tiny", "--address", c.dashboard],
                         env=c.client_env(token=None), capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 1 and "requires a Ray auth token" in out.stderr, out.stderr[-2000:]
    with pytest.raises(SubmitError, match="refused the Ray auth token"):
        submit(["tiny"], c.dashboard, token="0" * 64, quiet=True)
    # Nothing ran: the cluster has no job at all.
    assert client(c.dashboard, c.token).list_jobs() == []

    # With the token: accepted, and the job runs the uploaded working tree with KTRAY_RUN set.
    probe = "import ktray, os; print('KTRAY_FROM', ktray.__file__); print('KTRAY_RUN', os.environ['KTRAY_RUN'])"
    job_id = submit(["tiny"], c.dashboard, token=c.token, entrypoint=f'python -c "{probe}"', quiet=True)
    cl = client(c.dashboard, c.token)
    assert wait(cl, job_id, timeout_s=120) == "SUCCEEDED", cl.get_job_logs(job_id)
    logs = cl.get_job_logs(job_id)
    assert f"KTRAY_RUN {job_id}" in logs
    ktray_from = re.search(r"KTRAY_FROM (\S+)", logs).group(1)
    assert "runtime_resources" in ktray_from and str(REPO) not in ktray_from, ktray_from


# --------------------------------------------------------------------------- metrics, Prometheus, dashboards


def workload(max_s: float = 150.0) -> None:
    """A small run that records every ktray metric from where the pipeline records it.

    Real work on the bundled sample: Ray Data decodes JPEGs (plus two corrupt images), a
    training actor fits a softmax regression on pooled pixels, faiss k-means clusters the
    features (k well above the number of distinct rows, so faiss really splits empty
    clusters). Then it idles until stopped, so the keep-alive of gauges can be observed.
    """
    import faiss
    import numpy as np
    import ray

    from ktray import metrics

    ray.init()

    def decode(batch: dict[str, np.ndarray], stage: str) -> dict[str, np.ndarray]:
        out = decode_batch(batch, size=32)
        ok = len(out["image_id"])
        metrics.record_decode(ok=ok, failed=len(batch["image_id"]) - ok, stage=stage)
        if stage == "pretext":
            metrics.record_puzzles(ok)
        pixels = out["pixels"].reshape(ok, 4, 8, 4, 8, 3).mean(axis=(2, 4)) / 255.0  # (N, 4, 4, 3)
        return {"feature": pixels.reshape(ok, 48).astype(np.float32), "label": out["label"]}

    @ray.remote(num_cpus=0.5)
    class Trainer:
        """Softmax regression by gradient descent: a real loss and accuracy per epoch."""

        def fit(self, stage: str, x: np.ndarray, y: np.ndarray, epochs: int) -> float:
            rng = np.random.default_rng(0)
            w = rng.normal(0, 0.01, (x.shape[1], int(y.max()) + 1))
            for epoch in range(epochs):
                t0 = time.perf_counter()
                logits = x @ w
                p = np.exp(logits - logits.max(1, keepdims=True))
                p /= p.sum(1, keepdims=True)
                loss = float(-np.log(p[np.arange(len(y)), y] + 1e-9).mean())
                acc = float((p.argmax(1) == y).mean())
                w -= 0.5 * x.T @ (p - np.eye(w.shape[1])[y]) / len(y)
                rate = len(y) / max(time.perf_counter() - t0, 1e-6)
                metrics.record_training(stage, epoch, loss, acc, samples_per_s=rate, samples=len(y))
                metrics.record_training(stage, epoch, loss * 1.1, acc * 0.9, split="val")
                time.sleep(0.5)
            return time.time()

    t_start = time.time()
    trainer = Trainer.remote()
    with metrics.stage_timer("pretext"):
        rows = read_images(sample_path(), split="train", limit=300).map_batches(
            decode, fn_kwargs={"stage": "pretext"}, batch_size=100, batch_format="numpy").take_all()
        x = np.stack([r["feature"] for r in rows])
        y = np.array([r["label"] for r in rows])
        last_pretext = ray.get(trainer.fit.remote("pretext", x, y, 6))
        metrics.record_rows("pretext", 1)
    with metrics.stage_timer("embed"):
        # Two undecodable images plus real ones: failures are counted, the batch goes on.
        corrupt = [{"image_id": f"corrupt-{i}", "image": b"not a jpeg", "label": 0} for i in range(2)]
        real = read_images(sample_path(), split="val", limit=30).take_all()
        ray.data.from_items(corrupt + real).map_batches(
            decode, fn_kwargs={"stage": "embed"}, batch_format="numpy").take_all()
        features = x  # the pretext stage's pooled pixels stand in for conv4 features
        metrics.record_embed(len(features))
        metrics.record_rows("embed", len(features))
    with metrics.stage_timer("cluster"):
        data = np.repeat(features[:20], 10, axis=0)  # 200 rows, 20 distinct: k=60 leaves clusters empty
        km = faiss.Kmeans(data.shape[1], 60, niter=6, seed=1234)
        km.train(data)
        sizes = np.bincount(km.index.search(data, 1)[1].ravel(), minlength=60)
        for i, st in enumerate(km.iteration_stats):
            metrics.record_kmeans(i, st["obj"], int(st["nsplit"]), sizes=sizes)
            time.sleep(0.5)
        metrics.record_rows("cluster", len(data))
    with metrics.stage_timer("transfer"):
        ray.get(trainer.fit.remote("transfer", x, y, 4))
        metrics.record_rows("transfer", 1)
    print(f"WORKLOAD READY pretext_gauges_last_set={last_pretext:.3f} "
          f"splits={sum(int(s['nsplit']) for s in km.iteration_stats)}", flush=True)
    while time.time() - t_start < max_s:  # stay alive (the actor too) until the test stops the job
        time.sleep(1)


class Prometheus:
    """Debian's ``prometheus`` on a loopback port, scraping what Ray's service discovery lists."""

    def __init__(self, tmp: Path, session_dir: Path) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.skip("prometheus is not installed (Debian: apt-get install -y prometheus; .ci/run does it)")
        (self.port,) = free_ports(1)
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{
                "job_name": "ray",
                "file_sd_configs": [{"files": [str(session_dir / "prom_metrics_service_discovery.json")],
                                     "refresh_interval": "5s"}],
            }],
        }
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = tmp / "prometheus.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [binary, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:
            raise AssertionError(f"{expr}: {e.read().decode()}") from None
        assert body["status"] == "success", body
        return body["data"]["result"]

    def label_values(self, label: str, selector: str) -> list[str]:
        url = (f"http://127.0.0.1:{self.port}/api/v1/label/{label}/values?"
               + urllib.parse.urlencode({"match[]": selector}))
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.load(r)["data"]

    def wait_ready(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited:\n{self.log.read_text()[-2000:]}")
            if http_status_quiet(f"http://127.0.0.1:{self.port}/-/ready") == 200:
                return
            time.sleep(0.5)
        raise TimeoutError(self.log.read_text()[-2000:])

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


def http_status_quiet(url: str) -> int:
    try:
        return http_status(url)
    except OSError:
        return 0


def until(predicate: Any, timeout_s: float, what: str, poll_s: float = 1.0, on_timeout: Any = None) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    detail = f": {on_timeout()}" if on_timeout else ""
    raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}{detail}")


def promql(expr: str, run: str) -> str:
    """A dashboard expression with Grafana's variables bound as Grafana would for one run."""
    assert re.fullmatch(r"[\w.-]+", run), run  # no regex metacharacters to escape (PromQL strings reject \-)
    return (expr.replace("$run", run).replace("$SessionName", ".+")
            .replace("$__rate_interval", "30s"))


@pytest.mark.slow
def test_prometheus_sees_every_dashboard_query(auth_cluster: LocalCluster, tmp_path: Path) -> None:
    from ktray.metrics import METRICS
    from ktray.submit import client, submit

    c = auth_cluster
    prom = Prometheus(tmp_path, c.session_dir())
    cl = client(c.dashboard, c.token)
    job_id = None
    try:
        job_id = submit(["tiny"], c.dashboard, token=c.token, entrypoint="python tests/test_ops.py workload",
                        quiet=True)
        prom.wait_ready()

        def ready() -> str | None:
            status = str(cl.get_job_status(job_id).value)
            assert status not in ("FAILED", "STOPPED", "SUCCEEDED"), cl.get_job_logs(job_id)[-4000:]
            m = re.search(r"WORKLOAD READY pretext_gauges_last_set=(\S+) splits=(\d+)", cl.get_job_logs(job_id))
            return m and (float(m.group(1)), int(m.group(2)))

        t0 = time.monotonic()
        last_pretext_set, splits = until(ready, 150, "the workload to record every metric", poll_s=2)
        print(f"\nworkload ready after {time.monotonic() - t0:.0f} s", flush=True)
        assert splits > 0, "faiss split no empty cluster: the clustering panels would show only zeros"
        run_sel = f'run="{job_id}"'
        # Every declared metric reached Prometheus with this run's tag.
        def missing() -> list[str]:
            return [s.exported for s in METRICS.values()
                    if not prom.query(f'count({{__name__="{s.exported}", {run_sel}}})')]

        until(lambda: not missing(), 60, "every ktray metric in Prometheus", on_timeout=missing)
        # Gauges outlive Ray's 2-interval eviction: the pretext gauges were last set by the training
        # actor >= 12 s ago, and with a 1 s scrape the last 10 s must hold ~10 samples of them.
        until(lambda: time.time() - last_pretext_set > 12, 60, "the pretext gauges to age")
        kept = prom.query(f'count_over_time(ray_ktray_train_loss{{{run_sel}, stage="pretext", split="train"}}[10s])')
        assert kept and float(kept[0]["value"][1]) >= 5, kept

        print(f"metrics seen and aged after {time.monotonic() - t0:.0f} s", flush=True)
        has_gpu = bool(prom.query('count({__name__="ray_node_gpus_available"})'))
        empty, skipped = [], []
        for title, expr in dashboard_queries():
            if not has_gpu and any(m in expr for m in PHYSICAL_GPU_METRICS):
                assert not prom.query(promql(expr, job_id))
                skipped.append(title)
                continue
            if not prom.query(promql(expr, job_id)):
                empty.append(f"{title}: {promql(expr, job_id)}")
        assert not empty, "panels without data:\n" + "\n".join(empty)
        # The dashboards' variables (Grafana's label_values) offer this run and its Ray session.
        for name, query in dashboard_variables():
            metric, label = re.fullmatch(r"label_values\((.+), (\w+)\)", query).groups()
            values = prom.label_values(label, promql(metric, job_id))
            assert (job_id in values) if name == "run" else values, (name, query, values)
        if skipped:
            print(f"no physical GPU here: {len(skipped)} GPU panel queries checked for no data only: {skipped}")
    finally:
        if job_id is not None:
            cl.stop_job(job_id)
        prom.stop()


# --------------------------------------------------------------------------- the autoscaler


def fake_cloud(cluster: LocalCluster) -> dict[str, Any]:
    """cluster.yaml's node types on Ray's fake multi-node provider (nodes are local raylets)."""
    config = prepared("cluster.yaml")
    types = config["available_node_types"]
    head = types.pop(config["head_node_type"])
    types["ray.head.default"] = {**head, "node_config": {}}  # the fake provider's head type
    for t in types.values():
        t["node_config"] = {}
        t.pop("worker_setup_commands", None)
        t["max_workers"] = min(t.get("max_workers", 0), 1)
    config.update(
        head_node_type="ray.head.default", max_workers=2, idle_timeout_minutes=5, auth={}, file_mounts={},
        provider={"type": "fake_multinode", "gcs_address": cluster.address, "use_node_id_as_ip": True,
                  "disable_node_updaters": True, "disable_launch_config_check": True},
        **{k: [] for k in ("initialization_commands", "setup_commands", "head_setup_commands",
                           "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")},
    )
    return config


AUTOSCALE_DRIVER = """
import json, os, sys, time
import ray

ray.init(address=sys.argv[1])
head = ray.get_runtime_context().get_node_id()

def where():
    return ray.get_runtime_context().get_node_id(), os.environ.get("RAY_NODE_TYPE_NAME")

driver_like = ray.remote(num_cpus=0, resources={"ktray_driver": 1})(where)
cpu_work = ray.remote(num_cpus=1)(where)
gpu_work = ray.remote(num_cpus=1, num_gpus=1)(where)
t0 = time.time()
out = {"head": head, "driver": ray.get(driver_like.remote(), timeout=60)}
out["cpu"] = ray.get(cpu_work.remote(), timeout=240)     # head has CPU 0: a CPU node must come
out["cpu_s"] = time.time() - t0
out["gpu"] = ray.get(gpu_work.remote(), timeout=240)     # no GPU anywhere: a GPU node must come
out["gpu_s"] = time.time() - t0 - out["cpu_s"]
out["nodes"] = sorted(json.dumps(n["Resources"], sort_keys=True) for n in ray.nodes() if n["Alive"])
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_autoscaler_adds_the_right_node_type(tmp_path: Path) -> None:
    """cluster.yaml's policy on Ray's fake multi-node autoscaler.

    Driver-like work (``ktray_driver``) runs on the head without scaling; CPU-only work
    starts a `cpu` node, not a GPU one (the head takes no tasks); GPU work starts a `gpu` node.
    """
    cfg = prepared("cluster.yaml")
    head = cfg["available_node_types"][cfg["head_node_type"]]["resources"]
    cluster = LocalCluster(
        tmp_path, token=secrets.token_hex(32), num_cpus=head["CPU"],
        resources={k: v for k, v in head.items() if k not in ("CPU", "GPU")},
        extra_env={"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}, autoscaling_config=fake_cloud,
    )
    try:
        cluster.wait_ready()
        out = run_python(AUTOSCALE_DRIVER.replace("sys.argv[1]", repr(cluster.address)),
                         cluster.client_env(), timeout=560)
        monitor_log = _tail(cluster.session_dir() / "logs" / "monitor.log")
        assert out.returncode == 0, (out.stdout + out.stderr)[-4000:] + monitor_log
        result = json.loads(out.stdout.split("RESULT ", 1)[1].splitlines()[0])
        print(f"\nCPU node up after {result['cpu_s']:.0f} s, GPU node after {result['gpu_s']:.0f} s more")
        assert result["driver"][0] == result["head"]
        assert result["cpu"][0] != result["head"] and result["cpu"][1] == "cpu", result
        assert result["gpu"][0] not in (result["head"], result["cpu"][0]) and result["gpu"][1] == "gpu", result
        assert len(result["nodes"]) == 3, result["nodes"]
    finally:
        cluster.stop()


def _tail(path: Path, n: int = 3000) -> str:
    return "\n--- " + str(path) + "\n" + (path.read_text()[-n:] if path.exists() else "(missing)")


if __name__ == "__main__":
    if sys.argv[1:2] == ["workload"]:
        workload()
