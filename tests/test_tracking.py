"""MLflow tracking (sfa_vivit.train.tracking) against a real `mlflow server`: what a run logs, the
stage-1 link of a stage-2 run, and a server outage mid-run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import config, yaml_docs
from helpers import free_port as _free_port
from sfa_vivit.train import Trainer

pytestmark = pytest.mark.integration


def _manifest_allowed_hosts() -> str:
    root = Path(__file__).resolve().parents[1]
    for doc in yaml_docs((root / "k8s" / "mlflow.yaml").read_text()):
        if doc and doc.get("kind") == "Deployment":
            args = doc["spec"]["template"]["spec"]["containers"][0]["args"]
            return next(a.split("=", 1)[1] for a in args if a.startswith("--allowed-hosts="))
    raise AssertionError("no mlflow Deployment in k8s/mlflow.yaml")


@pytest.fixture(scope="module")
def mlflow_servers(tmp_path_factory):
    """`live()` -> (uri, process, port) of a real `mlflow server` started as k8s/mlflow.yaml starts it (its
    --allowed-hosts), shared by this module's tests (a start costs 8-10 s); a test that kills it gets a
    fresh one on the next `live()`."""
    servers = []

    def start():
        folder, port = tmp_path_factory.mktemp("mlflow"), _free_port()
        exe = Path(sys.executable).with_name("mlflow")
        proc = subprocess.Popen([str(exe), "server", "--backend-store-uri", f"sqlite:///{folder}/server.db",
                                 "--default-artifact-root", str(folder / "artifacts"), "--host", "127.0.0.1",
                                 "--port", str(port), "--workers", "1", f"--allowed-hosts={_manifest_allowed_hosts()}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        servers.append((f"http://127.0.0.1:{port}", proc, port))
        deadline = time.time() + 90
        import urllib.request
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                return servers[-1]
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    pytest.fail("mlflow server did not start")
                time.sleep(0.25)

    def live():
        return servers[-1] if servers and servers[-1][1].poll() is None else start()
    yield live
    for _, proc, _ in servers:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_in_cluster_clients_reach_the_server_as_the_manifest_starts_it(mlflow_servers, monkeypatch):
    """A real `mlflow server` with the manifest's --allowed-hosts, reached at the in-cluster Service name
    (resolved to loopback here, as cluster DNS would resolve it to the Service), records a pipeline step's
    parent and child runs; a Host outside the list is refused, so the check is live."""
    import http.client
    import socket as socket_module

    from mlflow.tracking import MlflowClient

    from sfa_vivit.kubeflow import steps
    _, _, port = mlflow_servers()

    def status(host: str) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/api/2.0/mlflow/experiments/search?max_results=1", headers={"Host": host})
        return conn.getresponse().status
    assert status("evil.example.com") == 403
    assert status(f"mlflow.sfa-vivit.svc.cluster.local:{port}") == 200

    service = "mlflow.sfa-vivit.svc.cluster.local"
    real = socket_module.getaddrinfo
    monkeypatch.setattr(socket_module, "getaddrinfo",
                        lambda host, *a, **k: real("127.0.0.1" if host == service else host, *a, **k))
    uri = f"http://{service}:{port}"
    parent = steps.start_tracking("run-1", "sfa", uri, dataset="ssv2", require=True)
    assert parent
    steps._child_run("evaluate", uri, parent, {"top1": 12.5}, {"sfa.step": "evaluate"})
    client = MlflowClient(f"http://127.0.0.1:{port}")
    exp = client.get_experiment_by_name(steps.EXPERIMENT)
    (child,) = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert child.data.metrics["top1"] == 12.5 and child.data.tags["sfa.step"] == "evaluate"


def test_mlflow_logs_and_survives_a_server_outage(tiny_data, tmp_path, mlflow_servers, monkeypatch):
    uri, proc, _ = mlflow_servers()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    from mlflow.tracking import MlflowClient
    metrics = Trainer(config("stage1", epochs=2), tiny_data, str(tmp_path / "ok")).fit()
    client = MlflowClient(uri)
    run = client.get_run(metrics["mlflow"]["run_id"])
    assert run.data.params["mode"] == "stage1" and run.data.params["num_frames"] == "4"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]
    assert "top1" in run.data.metrics and "train_time_s" in run.data.metrics
    assert run.info.status == "FINISHED" and not metrics["mlflow"]["unlogged"]
    # Stage 2 is linked to its stage-1 run, and nested under it (one store, no pipeline parent).
    m2 = Trainer(config("stage2", frames=8), tiny_data, str(tmp_path / "s2"), init=str(tmp_path / "ok")).fit()
    tags = client.get_run(m2["mlflow"]["run_id"]).data.tags
    assert tags["sfa.stage1_run_id"] == run.info.run_id and tags["mlflow.parentRunId"] == run.info.run_id

    # The server dies mid-run: training completes and reports what it could not log.
    trainer = Trainer(config("stage1", epochs=3), tiny_data, str(tmp_path / "outage"))
    trainer.fit(stop_after_steps=7)          # into epoch 2; epoch 1 was logged
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    start = time.time()
    metrics = Trainer(config("stage1", epochs=3), tiny_data, str(tmp_path / "outage")).fit()
    assert time.time() - start < 120
    assert metrics["epochs"] == 3 and len(metrics["history"]) == 3
    report = metrics["mlflow"]
    assert report["num_errors"] >= 1 and report["unlogged"]
    assert any(item["kind"] == "metrics" and item["step"] == 3 for item in report["unlogged"])
    spool = (tmp_path / "outage" / "mlflow_unlogged.jsonl").read_text().splitlines()
    assert any(json.loads(line).get("step") == 3 for line in spool)


def test_an_unreachable_server_is_loud_or_fatal(tmp_path, caplog):
    from sfa_vivit.kubeflow import steps
    from sfa_vivit.kubeflow.report import UNTRACKED
    uri = f"http://127.0.0.1:{_free_port()}"        # nothing listens there
    with caplog.at_level("WARNING"):
        assert steps.start_tracking("run-1", "sfa", uri) == ""
    assert "NOT tracked" in caplog.text
    with pytest.raises(steps.TrackingUnavailable, match="require_tracking"):
        steps.start_tracking("run-1", "sfa", uri, require=True)
    assert "NOT tracked" in UNTRACKED


def test_a_run_with_tracking_none_writes_no_store(tiny_data, tmp_path, monkeypatch):
    """`tracking_uri=none` (a pipeline's explicit choice) turns tracking off: no SQLite store appears beside
    the run, as it would where the URI is only left empty."""
    from sfa_vivit.train.tracking import TrackingTarget
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    metrics = Trainer(config("stage1", epochs=1), tiny_data, str(tmp_path / "run"),
                      tracking=TrackingTarget("none")).fit()
    assert metrics["epochs"] == 1 and not (tmp_path / "mlflow.db").exists()
    assert not (metrics.get("mlflow") or {}).get("run_id")
