"""`sfa cluster doctor` against a loopback cluster: a healthy one (every row ✓) and one broken per check.

The fake serves what the real APIs serve, at their paths: Kubernetes objects built with the `kubernetes`
client's models (the API's OpenAPI types) and serialised as the client itself serialises them; 404s as the
API server's Status; KFP's health answer as KFP 2.17.0's API server writes it (tests/data/kfp/healthz.json);
registry manifests as the OCI distribution spec's HEAD /v2/NAME/manifests/REF. The doctor reaches it through
a kubeconfig file and the real `kubernetes` client, as it reaches a real cluster.
"""

from __future__ import annotations

import copy
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from kubernetes import client

from sfa_vivit.cli import main
from sfa_vivit.kubeflow import doctor

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).resolve().parents[1]
SERIALISE = client.ApiClient().sanitize_for_serialization


def node(name: str, pool: str, cpu: str, memory: str, labels: dict[str, str] | None = None,
         gpus: int = 0, tpus: int = 0, taint: str | None = None) -> dict:
    allocatable = {"cpu": cpu, "memory": memory, "pods": "110"}
    if gpus:
        allocatable["nvidia.com/gpu"] = str(gpus)
    if tpus:
        allocatable["google.com/tpu"] = str(tpus)
    taints = [client.V1Taint(key=taint, value="present", effect="NoSchedule")] if taint else None
    return SERIALISE(client.V1Node(
        metadata=client.V1ObjectMeta(name=name, labels={"cloud.google.com/gke-nodepool": pool,
                                                        "kubernetes.io/os": "linux", **(labels or {})}),
        spec=client.V1NodeSpec(taints=taints), status=client.V1NodeStatus(allocatable=allocatable)))


T4 = {"cloud.google.com/gke-accelerator": "nvidia-tesla-t4"}
A100 = {"cloud.google.com/gke-accelerator": "nvidia-tesla-a100"}
# Allocatable as GKE reports it for the machine types of tests/data/gke/machines.yaml (n1-highmem-8: 8 vCPU,
# 52 GB; e2-standard-16: 16 vCPU, 64 GB; a2-highgpu-8g: 96 vCPU, 680 GB).
HEALTHY_NODES = [
    node("cpu-0", "default", "15890m", "60055056Ki"),
    node("t4-0", "t4", "7910m", "47284372Ki", T4, gpus=1, taint="nvidia.com/gpu"),
    *(node(f"a100-{i}", "a100", "95690m", "690000000Ki", A100, gpus=8, taint="nvidia.com/gpu") for i in range(4)),
]
CRDS = set(doctor.JOB_CRDS["trainjob"]) | set(doctor.JOB_CRDS["pytorchjob"])
# MLflow's Deployment as k8s/mlflow.yaml writes it (its --allowed-hosts is what the doctor reads).
MLFLOW_DEPLOYMENT = next(d for d in __import__("yaml").safe_load_all((REPO / "k8s" / "mlflow.yaml").read_text())
                         if d and d.get("kind") == "Deployment")


# Kueue's objects as k8s/kueue.yaml creates them (the API server returns what was applied, plus metadata).
KUEUE_OBJECTS = [d for d in __import__("yaml").safe_load_all((REPO / "k8s" / "kueue.yaml").read_text()) if d]


def _kueue(state: dict, kind: str) -> dict:
    return next(o for o in state["kueue"] if o["kind"] == kind)


def _without_allowed_hosts(state: dict) -> None:
    args = state["deployments"][0]["spec"]["template"]["spec"]["containers"][0]["args"]
    args[:] = [a for a in args if not a.startswith("--allowed-hosts=")]


def healthy() -> dict:
    identity = {"iam.gke.io/gcp-service-account": "sfa@p.iam.gserviceaccount.com"}
    return {"kfp_status": 200, "kfp_tag": "2.17.0", "crds": set(CRDS), "runtime": True,
            "service_accounts": {"sfa-vivit": dict(identity), "sfa-vivit-train": dict(identity)},
            "denied": set(), "nodes": copy.deepcopy(HEALTHY_NODES), "images": None, "mlflow": True, "requests": [],
            "deployments": [copy.deepcopy(MLFLOW_DEPLOYMENT)], "kueue": copy.deepcopy(KUEUE_OBJECTS)}


class Fake(BaseHTTPRequestHandler):
    state: dict = {}

    def log_message(self, *args):
        pass

    def _send(self, code: int, body: object = None, content_type: str = "application/json") -> None:
        data = b"" if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _not_found(self, what: str) -> None:
        # The API server's answer to a missing object (a v1 Status).
        self._send(404, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                         "message": f"{what} not found", "reason": "NotFound", "code": 404})

    def do_HEAD(self):
        s = self.state
        s["requests"].append(("HEAD", self.path))
        found = re.fullmatch(r"/v2/(.+)/manifests/([^/]+)", self.path)
        if found:
            name = f"{found.group(1)}:{found.group(2)}"
            ok = s["images"] is None or name in s["images"]
            # OCI distribution spec: 200 with the digest, or 404 (MANIFEST_UNKNOWN).
            self.send_response(200 if ok else 404)
            if ok:
                self.send_header("Docker-Content-Digest", "sha256:" + "0" * 64)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self._send(404)

    def do_GET(self):
        s = self.state
        s["requests"].append(("GET", self.path))
        path = self.path.split("?")[0]
        if path == "/apis/v2beta1/healthz":
            if s["kfp_status"] != 200:
                return self._send(s["kfp_status"], {"error": "forbidden"})
            answer = json.loads((DATA / "kfp" / "healthz.json").read_text())["api_server"]
            return self._send(200, {**answer, "tag_name": s["kfp_tag"]})
        found = re.fullmatch(r"/apis/apiextensions\.k8s\.io/v1/customresourcedefinitions/(.+)", path)
        if found:
            name = found.group(1)
            if name not in s["crds"]:
                return self._not_found(f'customresourcedefinitions.apiextensions.k8s.io "{name}"')
            return self._send(200, SERIALISE(client.V1CustomResourceDefinition(
                metadata=client.V1ObjectMeta(name=name), spec=client.V1CustomResourceDefinitionSpec(
                    group=name.split(".", 1)[1], scope="Namespaced", versions=[], names=client.
                    V1CustomResourceDefinitionNames(plural=name.split(".")[0], kind="X")))))
        if path == "/apis/trainer.kubeflow.org/v1alpha1/clustertrainingruntimes/torch-distributed":
            if not s["runtime"]:
                return self._not_found('clustertrainingruntimes.trainer.kubeflow.org "torch-distributed"')
            return self._send(200, {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "ClusterTrainingRuntime",
                                    "metadata": {"name": "torch-distributed"}, "spec": {}})
        found = re.fullmatch(r"/api/v1/namespaces/([^/]+)/serviceaccounts/([^/]+)", path)
        if found:
            annotations = s["service_accounts"].get(found.group(2))
            if annotations is None:
                return self._not_found(f'serviceaccounts "{found.group(2)}"')
            return self._send(200, SERIALISE(client.V1ServiceAccount(metadata=client.V1ObjectMeta(
                name=found.group(2), namespace=found.group(1), annotations=annotations or None))))
        if re.fullmatch(r"/apis/apps/v1/namespaces/[^/]+/deployments", path):
            return self._send(200, {"kind": "DeploymentList", "apiVersion": "apps/v1", "metadata": {},
                                    "items": s["deployments"]})
        found = re.fullmatch(r"/apis/kueue\.x-k8s\.io/v1beta2/(?:namespaces/([^/]+)/)?(\w+)(?:/([^/]+))?", path)
        if found:
            namespace, plural, name = found.groups()
            if s["kueue"] is None:      # no CRD: the API server knows no such resource type
                return self._send(404, b"404 page not found", "text/plain")
            kind = {"resourceflavors": "ResourceFlavor", "clusterqueues": "ClusterQueue",
                    "localqueues": "LocalQueue"}[plural]
            items = [{**o, "metadata": {**o["metadata"], **({"namespace": namespace} if namespace else {})}}
                     for o in s["kueue"] if o["kind"] == kind]
            if name is None:
                return self._send(200, {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": f"{kind}List",
                                        "metadata": {}, "items": items})
            item = next((o for o in items if o["metadata"]["name"] == name), None)
            return self._send(200, item) if item else self._not_found(f'{plural}.kueue.x-k8s.io "{name}"')
        if path == "/api/v1/nodes":
            return self._send(200, {"kind": "NodeList", "apiVersion": "v1", "metadata": {}, "items": s["nodes"]})
        if re.fullmatch(r"/api/v1/namespaces/[^/]+/services/[^/]+/proxy/health", path):
            return self._send(200, b"OK", "text/plain") if s["mlflow"] else self._send(503, b"no endpoints",
                                                                                       "text/plain")
        return self._not_found(path)

    def do_POST(self):
        s = self.state
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        s["requests"].append(("POST", self.path))
        if self.path.startswith("/apis/authorization.k8s.io/v1/subjectaccessreviews"):
            attributes = body["spec"]["resourceAttributes"]
            resource = attributes["resource"] + (f"/{attributes['subresource']}" if attributes.get("subresource")
                                                 else "")
            allowed = (attributes["verb"], resource) not in s["denied"]
            return self._send(201, {**body, "status": SERIALISE(client.V1SubjectAccessReviewStatus(allowed=allowed))})
        self._send(404)


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Fake)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture
def cluster(server, tmp_path):
    """(state, kubeconfig, pipeline for a profile): the state starts healthy; a test breaks one thing."""
    Fake.state = healthy()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": f"http://{server}"}}],
        "users": [{"name": "me", "user": {"token": "secret"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "me"}}]}))

    def pipeline(profile: str) -> str:
        """The checked-in pipeline of `profile`; 'NAME+queue': as `sfa pipeline compile --queue sfa-vivit`
        writes it (the multi-node jobs' spec names the queue)."""
        profile, _, queued = profile.partition("+")
        text = (REPO / "pipelines" / f"sfa-{profile}.yaml").read_text()
        if queued:
            assert '"queue": ""' in text
            text = text.replace('"queue": ""', '"queue": "sfa-vivit"')
        out = tmp_path / f"sfa-{profile}{'-queued' if queued else ''}.yaml"
        out.write_text(text.replace("ghcr.io/sfa-vivit/sfa-vivit", f"{server}/team/sfa-vivit"))
        return str(out)

    return Fake.state, str(kubeconfig), pipeline


def run(cluster, server, profile="gpu-t4", **kwargs):
    state, kubeconfig, pipeline = cluster
    kwargs.setdefault("params", {"tracking_uri": "http://mlflow.sfa-vivit.svc.cluster.local:5000"})
    rows = doctor.doctor(pipeline(profile), host=f"http://{server}", kubeconfig=kubeconfig,
                         pipeline_root="gs://bucket/runs", **kwargs)
    return {r.check: r for r in rows}


def failed(rows):
    return {name: r for name, r in rows.items() if r.status == "fail"}


@pytest.mark.parametrize("profile", ["gpu-t4", "gpu-a100-x4", "gpu-a100-x4+queue"])
def test_a_healthy_cluster_passes_every_check(cluster, server, profile, capsys):
    rows = run(cluster, server, profile)
    assert not failed(rows), doctor.table(list(rows.values()))
    assert rows["KFP API"].detail.endswith("KFP 2.17.0")
    assert rows["rights of sfa-vivit"].detail.startswith("may do all")
    if profile == "gpu-a100-x4":
        assert rows["4 nodes for the training job"].status == "ok"
        assert "CRD trainjobs.trainer.kubeflow.org" in rows and "ClusterTrainingRuntime torch-distributed" in rows
        # Compiled without --queue: a warning (two jobs at once can deadlock), not a failure.
        assert rows["Kueue queue"].status == "warn" and "--queue sfa-vivit" in rows["Kueue queue"].fix
    if profile == "gpu-a100-x4+queue":
        assert rows["Kueue queue sfa-vivit"].status == "ok", rows["Kueue queue sfa-vivit"]
        assert "admits each multi-node job whole (4 nodes)" in rows["Kueue queue sfa-vivit"].detail
    state = cluster[0]
    # Read-only: nothing but questions (SubjectAccessReviews are answered, not stored).
    assert {m for m, p in state["requests"] if m == "POST"} <= {"POST"}
    assert all(p.startswith("/apis/authorization.k8s.io/") for m, p in state["requests"] if m == "POST")
    # The command line: the table and exit status 0.
    _, kubeconfig, pipeline = cluster
    code = main(["cluster", "doctor", pipeline(profile), "--host", f"http://{server}", "--kubeconfig", kubeconfig,
                 "--pipeline-root", "gs://bucket/runs", "--param",
                 'tracking_uri="http://mlflow.sfa-vivit.svc.cluster.local:5000"'])
    out = capsys.readouterr().out
    assert code == 0 and "✓ KFP API" in out and "nothing found that would stop a first run" in out


BROKEN = {
    # name: (profile, how the cluster is broken, the row that must fail, words of its detail, words of its fix)
    "kfp refuses": ("gpu-t4", lambda s: s.update(kfp_status=403), "KFP API", "HTTP 403", "--token"),
    "kfp too old": ("gpu-t4", lambda s: s.update(kfp_tag="2.3.0"), "KFP API", "2.3.0", "upgrade"),
    "no trainjob crd": ("gpu-a100-x4", lambda s: s["crds"].discard("trainjobs.trainer.kubeflow.org"),
                        "CRD trainjobs.trainer.kubeflow.org", "not installed", "kubeflow/trainer"),
    "no runtime": ("gpu-a100-x4", lambda s: s.update(runtime=False), "ClusterTrainingRuntime torch-distributed",
                   "not installed", "overlays/runtimes"),
    "no service account": ("gpu-t4", lambda s: s["service_accounts"].pop("sfa-vivit"),
                           "service account kubeflow/sfa-vivit", "does not exist", "k8s/service-account.yaml"),
    "no rights": ("gpu-t4", lambda s: s["denied"].update({("create", "workflowtaskresults"), ("get", "configmaps")}),
                  "rights of sfa-vivit", "create workflowtaskresults", "k8s/rbac.yaml"),
    "no job rights": ("gpu-a100-x4", lambda s: s["denied"].add(("create", "trainjobs")), "rights of sfa-vivit",
                      "create trainjobs", "k8s/rbac.yaml"),
    "no workload identity": ("gpu-t4", lambda s: s["service_accounts"].update({"sfa-vivit": {}}),
                             "Workload Identity of sfa-vivit", "cannot write gs://bucket/runs", "kubectl annotate"),
    "t4 node too small": ("gpu-t4", lambda s: s["nodes"].__setitem__(1, node(
        "t4-0", "t4", "5910m", "47284372Ki", T4, gpus=1, taint="nvidia.com/gpu")),
        "nodes for evaluate, evaluate-2, memory-benchmark …", "5910m CPUs allocatable < 7 requested",
        "--machine-type n1-highmem-8"),
    "no gpu pool": ("gpu-t4", lambda s: s["nodes"].pop(1), "nodes for evaluate, evaluate-2, memory-benchmark …",
                    "no node has those labels", "--accelerator type=nvidia-tesla-t4,count=1"),
    "taint not tolerated": ("gpu-t4", lambda s: s["nodes"].__setitem__(0, node(
        "cpu-0", "default", "15890m", "60055056Ki", taint="dedicated")),
        "nodes for join-sets, join-sets-2, join-sets-3 …", "taint dedicated", "node pool"),
    "three of four a100 nodes": ("gpu-a100-x4", lambda s: s["nodes"].pop(), "4 nodes for the training job",
                                 "3 node(s) can hold a worker", "--node-pool a100 --num-nodes 4"),
    "image missing": ("gpu-t4", lambda s: s.update(images=set()), "image {server}/team/sfa-vivit:0.1.0-cuda",
                      "not in its registry (HTTP 404)", "build and push"),
    "no kueue": ("gpu-a100-x4+queue", lambda s: s.update(kueue=None), "Kueue queue sfa-vivit", "not installed",
                 "kueue/releases/download/v0.19.2/manifests.yaml"),
    "no local queue": ("gpu-a100-x4+queue", lambda s: s["kueue"].remove(_kueue(s, "LocalQueue")),
                       "Kueue queue sfa-vivit", "no LocalQueue sfa-vivit in namespace kubeflow",
                       "kubectl apply -n kubeflow -f k8s/kueue.yaml"),
    "queue quota short of one job": ("gpu-a100-x4+queue", lambda s: _kueue(s, "ClusterQueue")["spec"][
        "resourceGroups"][0]["flavors"][0]["resources"][2].update(nominalQuota="16"), "Kueue queue sfa-vivit",
        "nvidia.com/gpu 32 > 16", "raise a flavor's nominalQuota"),
    "queue flavor taint not tolerated": ("gpu-a100-x4+queue", lambda s: [f["spec"].update(nodeTaints=[
        {"key": "dedicated", "value": "x", "effect": "NoSchedule"}]) for f in s["kueue"]
        if f["kind"] == "ResourceFlavor"], "Kueue queue sfa-vivit", "taint dedicated not tolerated", "k8s/kueue.yaml"),
    "mlflow down": ("gpu-t4", lambda s: s.update(mlflow=False), "MLflow", "HTTP 503", "k8s/mlflow.yaml"),
    "mlflow refuses the service's host": ("gpu-t4", _without_allowed_hosts, "MLflow allows the in-cluster Host",
                                          "would answer 403 to Host mlflow.sfa-vivit.svc.cluster.local:5000",
                                          "--allowed-hosts"),
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_a_broken_cluster_fails_that_check_and_names_the_fix(cluster, server, name, capsys):
    profile, breaks, row, detail, fix = BROKEN[name]
    breaks(cluster[0])
    rows = run(cluster, server, profile)
    row = row.format(server=server)
    assert row in failed(rows), doctor.table(list(rows.values()))
    assert detail in rows[row].detail and fix in rows[row].fix, rows[row]
    others = set(failed(rows)) - {row}
    # One break, one failing row; a tainted general pool fails every CPU step's row, and only those.
    if name == "taint not tolerated":
        others = {o for o in others if not o.startswith("nodes for ")}
    assert not others, others
    _, kubeconfig, pipeline = cluster
    code = main(["cluster", "doctor", pipeline(profile), "--host", f"http://{server}", "--kubeconfig", kubeconfig,
                 "--pipeline-root", "gs://bucket/runs", "--param",
                 'tracking_uri="http://mlflow.sfa-vivit.svc.cluster.local:5000"'])
    out = capsys.readouterr().out
    assert code == 1 and f"✗ {row}" in out and "fix: " in out


def test_untracked_runs_pass_and_an_unset_tracking_uri_fails(cluster, server):
    assert run(cluster, server, params={"tracking_uri": "none"})["MLflow"].status == "ok"
    assert run(cluster, server, params={})["MLflow"].status == "fail"


def test_the_rights_asked_cover_what_kfp_argo_and_our_launcher_call():
    """RUN_RIGHTS + JOB_RIGHTS hold every call of tests/data/kfp/needs.yaml (read from the upstream source)."""
    import yaml
    needs = yaml.safe_load((DATA / "kfp" / "needs.yaml").read_text())["needs"]
    asked = set(doctor.RUN_RIGHTS) | {r for rights in doctor.JOB_RIGHTS.values() for r in rights}
    for need in needs:
        for verb in need["verbs"]:
            if verb in ("list", "watch") and need["resource"] != "pods":
                continue
            assert (need["apiGroup"], need["resource"], verb) in asked, need


def test_quantities_read_as_kubernetes_writes_them():
    assert doctor.quantity("7910m") == pytest.approx(7.91)
    assert doctor.quantity("42G") == 42e9 and doctor.quantity("45Gi") == 45 * 2**30
    assert doctor.quantity("47284372Ki") == 47284372 * 1024 and doctor.quantity(3) == 3.0
    with pytest.raises(Exception, match="quantity"):
        doctor.quantity("7 cores")


def test_an_unreadable_pipeline_is_one_clear_line(tmp_path, capsys):
    bad = tmp_path / "p.yaml"
    bad.write_text("just: text\n")
    assert main(["cluster", "doctor", str(bad), "--host", "http://127.0.0.1:9"]) == 2
    assert "not a compiled KFP pipeline" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Vertex AI: Google's APIs on loopback, shaped by their discovery documents (tests/data/gcp/discovery.json)
# ----------------------------------------------------------------------------------------------

SA = "sfa-vivit@proj.iam.gserviceaccount.com"
ME = "user:me@example.com"


def vertex_healthy() -> dict:
    member = f"serviceAccount:{SA}"
    return {"disabled": set(), "i_may_act_as": True,
            "project_bindings": [{"role": "roles/aiplatform.user", "members": [member]}],
            "account_bindings": [{"role": "roles/iam.serviceAccountUser", "members": [ME, member]}],
            "bucket_bindings": [{"role": "roles/storage.objectAdmin", "members": [member]}],
            "zones_with": {"nvidia-tesla-t4": {"us-central1-b"}, "nvidia-tesla-a100": {"us-central1-a"}},
            "sent": []}


class GoogleFake(BaseHTTPRequestHandler):
    state: dict = {}

    def log_message(self, *args):
        pass

    def _send(self, code: int, body: dict) -> None:
        self.state["sent"].append(body)
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, code: int, status: str) -> None:
        # Google APIs' error body.
        self._send(code, {"error": {"code": code, "message": status.lower(), "status": status}})

    def do_GET(self):
        s, path = self.state, self.path
        found = re.fullmatch(r"/serviceusage/v1/projects/([^/]+)/services/([^/]+)", path)
        if found:
            return self._send(200, {"name": f"projects/123/services/{found.group(2)}", "parent": "projects/123",
                                    "config": {"name": found.group(2)},
                                    "state": "DISABLED" if found.group(2) in s["disabled"] else "ENABLED"})
        found = re.fullmatch(r"/storage/v1/b/([^/]+)/iam", path)
        if found:
            return self._send(200, {"kind": "storage#policy", "resourceId": f"projects/_/buckets/{found.group(1)}",
                                    "version": 1, "etag": "CAE=", "bindings": s["bucket_bindings"]})
        found = re.fullmatch(r"/compute/v1/projects/([^/]+)/regions/([^/]+)", path)
        if found:
            project, region = found.groups()
            return self._send(200, {"kind": "compute#region", "name": region, "status": "UP", "zones": [
                f"https://www.googleapis.com/compute/v1/projects/{project}/zones/{region}-{z}" for z in "abcf"]})
        found = re.fullmatch(r"/compute/v1/projects/[^/]+/zones/([^/]+)/acceleratorTypes/([^/]+)", path)
        if found:
            zone, name = found.groups()
            if zone not in s["zones_with"].get(name, set()):
                return self._error(404, "NOT_FOUND")
            return self._send(200, {"kind": "compute#acceleratorType", "name": name, "zone": zone,
                                    "maximumCardsPerInstance": 8})
        self._error(404, "NOT_FOUND")

    def do_POST(self):
        s, path = self.state, self.path
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if path.endswith(":generateAccessToken"):
            if s.get("token_denied"):
                return self._error(403, "PERMISSION_DENIED")
            return self._send(200, {"accessToken": "ya29.short-lived", "expireTime": "2026-12-04T01:00:00Z"})
        if path.endswith(":testIamPermissions"):
            return self._send(200, {"permissions": ["iam.serviceAccounts.actAs"]} if s["i_may_act_as"] else {})
        if re.fullmatch(r"/iam/v1/projects/-/serviceAccounts/[^/]+:getIamPolicy", path):
            return self._send(200, {"version": 1, "etag": "BwX=", "bindings": s["account_bindings"]})
        if re.fullmatch(r"/resourcemanager/v1/projects/[^/]+:getIamPolicy", path):
            return self._send(200, {"version": 1, "etag": "BwY=", "bindings": s["project_bindings"]})
        self._error(404, "NOT_FOUND")


@pytest.fixture(scope="module")
def google():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), GoogleFake)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield {name: f"{base}/{name}/v1" if name != "storage" else f"{base}/storage/v1"
           for name in ("serviceusage", "iam", "resourcemanager", "storage", "compute", "iamcredentials")}
    httpd.shutdown()


def vertex_rows(google, profile="gpu-t4", account=SA):
    import requests
    package = str(REPO / "pipelines" / f"sfa-{profile}.yaml")
    rows = doctor.doctor_vertex(package, "proj/us-central1", service_account=account, pipeline_root="gs://bkt/sfa",
                                session=requests.Session(), apis=google, image_status=lambda image: 200)
    return {r.check: r for r in rows}


@pytest.mark.parametrize("profile", ["gpu-t4", "gpu-a100-x4"])
def test_vertex_a_healthy_project_passes_every_check(google, profile):
    GoogleFake.state = vertex_healthy()
    rows = vertex_rows(google, profile)
    assert not failed(rows), doctor.table(list(rows.values()))
    assert ("the account may act as itself" in rows) == (profile == "gpu-a100-x4")   # custom jobs only
    name = "nvidia-tesla-t4" if profile == "gpu-t4" else "nvidia-tesla-a100"
    assert rows[f"{name} in us-central1"].detail == ("offered in us-central1-b" if profile == "gpu-t4"
                                                     else "offered in us-central1-a")


VERTEX_BROKEN = {
    "api off": ("gpu-t4", lambda s: s["disabled"].add("aiplatform.googleapis.com"), "API aiplatform.googleapis.com",
                "gcloud services enable aiplatform.googleapis.com"),
    "cannot act as": ("gpu-t4", lambda s: s.update(i_may_act_as=False), "you may act as the run's account",
                      "roles/iam.serviceAccountUser"),
    "no vertex role": ("gpu-t4", lambda s: s.update(project_bindings=[]), "Vertex AI user", "roles/aiplatform.user"),
    "not itself": ("gpu-a100-x4", lambda s: s.update(account_bindings=[{"role": "roles/iam.serviceAccountUser",
                                                                        "members": [ME]}]),
                   "the account may act as itself", f"--member serviceAccount:{SA}"),
    "bucket": ("gpu-t4", lambda s: s.update(bucket_bindings=[{"role": "roles/storage.objectViewer",
                                                              "members": [f"serviceAccount:{SA}"]}]),
               "bucket bkt", "roles/storage.objectAdmin"),
    "no t4 here": ("gpu-t4", lambda s: s["zones_with"].pop("nvidia-tesla-t4"), "nvidia-tesla-t4 in us-central1",
                   "choose a region"),
}


@pytest.mark.parametrize("name", list(VERTEX_BROKEN))
def test_vertex_a_broken_project_fails_that_check_and_names_the_fix(google, name):
    profile, breaks, row, fix = VERTEX_BROKEN[name]
    GoogleFake.state = vertex_healthy()
    breaks(GoogleFake.state)
    rows = vertex_rows(google, profile)
    assert set(failed(rows)) == {row}, doctor.table(list(rows.values()))
    assert fix in rows[row].fix


def test_vertex_without_an_account_says_which_to_give(google):
    GoogleFake.state = vertex_healthy()
    rows = vertex_rows(google, account=None)
    assert "--service-account" in rows["run's service account"].fix


def test_the_google_fakes_answer_only_with_fields_their_discovery_documents_define(google):
    """Every top-level field the fake sent is a property of the response schema of its method."""
    discovery = json.loads((DATA / "gcp" / "discovery.json").read_text())
    allowed = set().union(*(m["properties"] for m in discovery["methods"].values())) | {"error"}
    bindings = set(discovery["binding_properties"])
    GoogleFake.state = vertex_healthy()
    vertex_rows(google, "gpu-a100-x4")
    for body in GoogleFake.state["sent"]:
        assert set(body) <= allowed, body
        for binding in body.get("bindings", []):
            assert set(binding) <= bindings, binding


@pytest.mark.integration
def test_the_write_test_writes_and_deletes_one_object_as_the_run_s_google_account(gcs_emulator, google, cluster,
                                                                                   server):
    """--write-test: a short-lived token for the Workload Identity account (IAM Credentials, fake), then one
    object written and deleted with it on a real GCS JSON-API emulator; nothing is left behind."""
    import requests
    requests.post(f"{gcs_emulator}/storage/v1/b", params={"project": "p"}, json={"name": "bucket"}).raise_for_status()
    apis = {**google, "storage": f"{gcs_emulator}/storage/v1", "storage_upload": f"{gcs_emulator}/upload/storage/v1"}
    GoogleFake.state = vertex_healthy()
    state, kubeconfig, pipeline = cluster
    rows = {r.check: r for r in doctor.doctor(
        pipeline("gpu-t4"), host=f"http://{server}", kubeconfig=kubeconfig, pipeline_root="gs://bucket/runs",
        params={"tracking_uri": "none"}, write_test=True, session=requests.Session(), apis=apis)}
    row = rows["write test as sfa@p.iam.gserviceaccount.com"]
    assert row.status == "ok" and row.detail.startswith("wrote and deleted gs://bucket/runs/.sfa-doctor-"), row
    listed = requests.get(f"{gcs_emulator}/storage/v1/b/bucket/o").json()
    assert not listed.get("items"), listed                       # deleted: nothing left under the root
    # You may not mint the account's token: the row says which role the test needs.
    GoogleFake.state["token_denied"] = True
    rows = {r.check: r for r in doctor.doctor(
        pipeline("gpu-t4"), host=f"http://{server}", kubeconfig=kubeconfig, pipeline_root="gs://bucket/runs",
        params={"tracking_uri": "none"}, write_test=True, session=requests.Session(), apis=apis)}
    row = rows["write test as sfa@p.iam.gserviceaccount.com"]
    assert row.status == "fail" and "serviceAccountTokenCreator" in row.fix
    # A bucket the account cannot write (here: one that does not exist) fails the write, named.
    GoogleFake.state["token_denied"] = False
    rows = {r.check: r for r in doctor.doctor(
        pipeline("gpu-t4"), host=f"http://{server}", kubeconfig=kubeconfig, pipeline_root="gs://nobucket/runs",
        params={"tracking_uri": "none"}, write_test=True, session=requests.Session(), apis=apis)}
    row = rows["write test as sfa@p.iam.gserviceaccount.com"]
    assert row.status == "fail" and "may not write gs://nobucket/runs/.sfa-doctor-" in row.detail, row
