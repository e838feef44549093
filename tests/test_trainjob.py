"""Multi-node training steps (sfa_vivit.kubeflow.trainjob): the TrainJob and PyTorchJob objects held to the
published API models and Kubernetes schema, and the launcher's handling of a job that completes, fails,
is suspended, runs past its deadline or is cancelled, with job objects shaped as the Trainer API returns
them. No cluster runs here (docs/cluster.md)."""

import json
from pathlib import Path

import kubernetes_validate
import pytest
from kubernetes.client.exceptions import ApiException

from helpers import yaml_docs
from sfa_vivit.core import runtime
from sfa_vivit.kubeflow import profiles, runner
from sfa_vivit.kubeflow.trainjob import (
    JobFailed,
    Launcher,
    NodeSpec,
    check_train_job,
    job_name,
    node_spec,
    outcome,
    pytorch_job,
    train_job,
)
from sfa_vivit.train import resolve
from sfa_vivit.train.launch import spec_of

SPEC_JSON = spec_of(resolve("stage1", "kinetics400"), "gs://b/data", "gs://b/root/train-stage1/model")


def _job(conditions=(), jobs=None):
    status = {"conditions": [{"type": t, "status": "True", "reason": r, "message": m} for t, r, m in conditions]}
    if jobs is not None:
        status["jobsStatus"] = [{"name": "node", "ready": jobs[0], "active": jobs[1], "succeeded": jobs[2],
                                 "failed": jobs[3], "suspended": 0}]
    return {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob", "metadata": {"name": "j"},
            "status": status}


def test_a_multi_node_profile_gives_a_trainjob_the_trainer_api_accepts():
    spec = node_spec(profiles.get("gpu-a100-x4"))
    assert (spec.nodes, spec.procs_per_node) == (4, 8)
    body = train_job(job_name("stage1", "gs://b/out"), "kubeflow", spec, image="reg/sfa-vivit:1-cuda",
                     spec_json=SPEC_JSON, owner={"name": "sfa-abc12", "uid": "6f1c-..."})
    trainer = body["spec"]["trainer"]
    assert trainer["numNodes"] == 4 and trainer["numProcPerNode"] == 8 and trainer["command"] == ["torchrun"]
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "8"
    assert json.loads(trainer["args"][-1])["out"] == "gs://b/root/train-stage1/model"
    assert body["spec"]["runtimeRef"]["name"] == "torch-distributed"
    (patch,) = body["spec"]["runtimePatches"]
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = node["template"]["spec"]["template"]["spec"]
    assert node["name"] == "node" and pod["containers"][0]["name"] == "node"
    # The training pods run as an account without Kubernetes rights (the launcher's `sfa-vivit` creates jobs),
    # get 300 s between SIGTERM and SIGKILL to commit a checkpoint, and no Istio sidecar (multi-user Kubeflow
    # injects one in profile namespaces; a Job pod with a sidecar never completes). Trainer v2.3.0 takes pod
    # metadata in a runtime patch (pkg/apis/trainer/v1alpha1/trainjob_types.go at 658725b).
    assert pod["serviceAccountName"] == "sfa-vivit-train" and pod["terminationGracePeriodSeconds"] == 300
    assert node["template"]["spec"]["template"]["metadata"]["annotations"] == {"sidecar.istio.io/inject": "false"}
    # Owned by the run's Argo Workflow: deleting the run deletes the job.
    assert body["metadata"]["ownerReferences"] == [{"apiVersion": "argoproj.io/v1alpha1", "kind": "Workflow",
                                                    "name": "sfa-abc12", "uid": "6f1c-..."}]
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-tesla-a100"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["volumes"][0]["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}
    assert job_name("stage1", "gs://b/out") == job_name("stage1", "gs://b/out") != job_name("stage1", "gs://b/x")
    # The models accept it whole; a field they do not know (here a misspelling) is refused.
    check_train_job(body)
    body["spec"]["trainer"]["numNode"] = 4
    with pytest.raises(ValueError, match=r"does not know: \['.spec.trainer.numNode'\]"):
        check_train_job(body)
    with pytest.raises(ValueError, match="nodes >= 2"):
        NodeSpec(nodes=1, procs_per_node=8, resources={})


def test_the_v1_pytorchjob_is_a_setting_away_and_its_pods_pass_the_kubernetes_schema():
    spec = node_spec(profiles.get("gpu-h100-x4"), engine="pytorchjob")
    body = pytorch_job("sfa-stage1-x", "kubeflow", spec, image="reg/sfa-vivit:1-cuda", spec_json=SPEC_JSON)
    replicas = body["spec"]["pytorchReplicaSpecs"]
    assert (replicas["Master"]["replicas"], replicas["Worker"]["replicas"]) == (1, 3)
    container = replicas["Master"]["template"]["spec"]["containers"][0]
    assert container["name"] == "pytorch" and "--node_rank=$(RANK)" in container["args"]
    assert "--nnodes=4" in container["args"] and "--nproc_per_node=8" in container["args"]
    assert replicas["Worker"]["template"]["metadata"]["annotations"] == {"sidecar.istio.io/inject": "false"}
    assert replicas["Worker"]["template"]["spec"]["serviceAccountName"] == "sfa-vivit-train"
    template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                "template": replicas["Worker"]["template"]}
    kubernetes_validate.validate(template, "1.30", strict=True)


def test_a_multi_host_tpu_slice_runs_one_python_process_per_host():
    """tpu-v3-64 (the paper's 64 v3 TensorCores): 8 hosts of 4 chips; each node runs one process (no torchrun)
    that drives its host's chips; the hosts' ranks come from the pod environment (runtime.hosts_env)."""
    spec = node_spec(profiles.get("tpu-v3-64"))
    assert (spec.nodes, spec.procs_per_node, spec.launcher) == (8, 1, "python")
    body = train_job("sfa-stage1-x", "kubeflow", spec, image="reg/sfa-vivit:1-tpu", spec_json=SPEC_JSON)
    trainer = body["spec"]["trainer"]
    assert trainer["command"] == ["python"] and trainer["args"][:2] == ["-m", "sfa_vivit.train.launch"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (8, 1)
    assert trainer["resourcesPerNode"]["limits"]["google.com/tpu"] == "4"
    pod = body["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    assert pod["template"]["spec"]["template"]["spec"]["nodeSelector"] == {
        "cloud.google.com/gke-tpu-accelerator": "tpu-v3-slice", "cloud.google.com/gke-tpu-topology": "4x8"}
    check_train_job(body)
    with pytest.raises(ValueError, match="multi-host TPU slice: it trains as a TrainJob"):
        node_spec(profiles.get("tpu-v3-64"), engine="pytorchjob")
    # A Trainer node's PET_* variables, when GKE's TPU variables are absent, give the hosts' ranks.
    env = {"PET_NNODES": "8", "PET_NODE_RANK": "3", "PET_MASTER_ADDR": "sfa-stage1-x-node-0-0.sfa-stage1-x",
           "PET_MASTER_PORT": "29400"}
    assert runtime.hosts_env(env) == {"RANK": "3", "WORLD_SIZE": "8", "MASTER_ADDR": env["PET_MASTER_ADDR"],
                                      "MASTER_PORT": "29400"}
    with pytest.raises(ValueError, match="tpu-v3-64 has no Vertex AI equivalent"):
        runner.compile_pipeline("sfa", "tpu-v3-64", "/dev/null", target="vertex")
    # In the checked-in pipeline, training steps are launcher pods; evaluation and the benchmark, one pod each,
    # go to a single-host v3-8 (a multi-host slice's hosts only run together).
    spec, platform = yaml_docs((Path(runner.__file__).parents[3] / "pipelines" / "sfa-tpu-v3-64.yaml")
                                        .read_text())
    selectors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for step in ("exec-evaluate", "exec-memory-benchmark"):
        assert selectors[step]["nodeSelector"]["labels"]["cloud.google.com/gke-tpu-accelerator"] == "tpu-v3-device"
    assert "accelerator" not in spec["deploymentSpec"]["executors"]["exec-train-stage1"]["container"]["resources"]


def test_the_multi_node_pipeline_trains_through_a_launcher_pod(tmp_path):
    path = runner.compile_pipeline("sfa", "gpu-a100-x4", str(tmp_path / "p.yaml"))
    spec, platform = yaml_docs(Path(path).read_text())
    executors = spec["deploymentSpec"]["executors"]
    tasks = spec["root"]["dag"]["tasks"]
    stage1 = tasks["train-stage1"]
    cluster = json.loads(stage1["inputs"]["parameters"]["cluster"]["runtimeValue"]["constant"])
    assert cluster["nodes"] == 4 and cluster["procs_per_node"] == 8 and cluster["engine"] == "trainjob"
    launcher = executors[stage1["componentRef"]["name"].replace("comp-", "exec-")]["container"]["resources"]
    assert "accelerator" not in launcher and launcher["cpuRequest"] == 1
    evaluation = executors[tasks["evaluate"]["componentRef"]["name"].replace("comp-", "exec-")]["container"]
    assert evaluation["resources"]["accelerator"]["resourceCount"] == "8"
    v1 = runner.compile_pipeline("sfa", "gpu-a100-x4", str(tmp_path / "v1.yaml"), operator="pytorchjob")
    (v1_spec, _) = yaml_docs(Path(v1).read_text())
    v1_cluster = v1_spec["root"]["dag"]["tasks"]["train-stage1"]["inputs"]["parameters"]["cluster"]
    assert json.loads(v1_cluster["runtimeValue"]["constant"])["engine"] == "pytorchjob"
    kubernetes = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert "nodeSelector" not in kubernetes.get(stage1["componentRef"]["name"].replace("comp-", "exec-"), {})


def test_on_vertex_the_multi_node_step_is_a_custom_job_with_worker_pools(tmp_path):
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2
    path = runner.compile_pipeline("sfa", "gpu-a100-x4", str(tmp_path / "v.yaml"), "vertex", image="reg/sfa:1-cuda")
    (spec,) = yaml_docs(Path(path).read_text())       # Vertex runs no Kubernetes platform spec
    json_format.ParseDict(spec, pipeline_spec_pb2.PipelineSpec(), ignore_unknown_fields=False)
    stage1 = spec["root"]["dag"]["tasks"]["train-stage1"]
    pools = spec["components"][stage1["componentRef"]["name"]]["inputDefinitions"]["parameters"][
        "worker_pool_specs"]["defaultValue"]
    assert [p["replica_count"] for p in pools] == [1, 3]                 # the chief + 3 nodes
    for pool in pools:
        assert pool["machine_spec"] == {"machine_type": "a2-highgpu-8g", "accelerator_type": "NVIDIA_TESLA_A100",
                                        "accelerator_count": 8}
        assert pool["container_spec"]["image_uri"] == "reg/sfa:1-cuda"
        assert "--function_to_execute" in pool["container_spec"]["args"]
    cluster = json.loads(stage1["inputs"]["parameters"]["cluster"]["runtimeValue"]["constant"])
    assert cluster["nodes"] == 4


class _Objects:
    """A CustomObjectsApi that answers with the given job objects in turn (the last one repeats)."""

    def __init__(self, states, exists=False, workflow=None):
        self.states, self.exists, self.calls, self.deleted = list(states), exists, [], False
        self.workflow = workflow        # the run's Argo Workflow as the API returns it (None: 404)

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        self.calls.append(("create", plural, body["metadata"]["name"]))
        if self.exists and not self.deleted:
            raise ApiException(status=409, reason="AlreadyExists")
        self.deleted = False
        return body

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.calls.append(("get", plural, name))
        if plural == "workflows":
            if self.workflow is None:
                raise ApiException(status=404, reason="NotFound")
            if isinstance(self.workflow, int):
                raise ApiException(status=self.workflow, reason="the API server's error")
            return self.workflow
        if self.deleted:
            raise ApiException(status=404, reason="NotFound")
        return self.states.pop(0) if len(self.states) > 1 else self.states[0]

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.calls.append(("delete", plural, name))
        self.deleted = True


def _launch(states, *, exists=False, engine="trainjob", core=None, on_sleep=None, workflow=None):
    objects, lines = _Objects(states, exists, workflow), []
    launcher = Launcher(objects, "kubeflow", engine, core=core, poll_s=0, report=lines.append,
                        sleep=on_sleep or (lambda s: None), workflow="sfa-abc12")
    body = {"metadata": {"name": "sfa-stage1-x"}, "spec": {}}
    return launcher, objects, lines, body


def test_the_launcher_follows_a_job_to_completion():
    launcher, objects, lines, body = _launch([_job(), _job(jobs=(0, 4, 0, 0)), _job(jobs=(4, 4, 0, 0)),
                                              _job([("Complete", "JobsCompleted", "all nodes succeeded")])])
    assert launcher.run(body)["status"]["conditions"][0]["type"] == "Complete"
    assert lines == ["TrainJob kubeflow/sfa-stage1-x: created",
                     "TrainJob sfa-stage1-x: running (waiting for pods)",
                     "TrainJob sfa-stage1-x: running (0 ready, 4 active, 0 succeeded, 0 failed)",
                     "TrainJob sfa-stage1-x: running (4 ready, 4 active, 0 succeeded, 0 failed)",
                     "TrainJob sfa-stage1-x: succeeded (JobsCompleted: all nodes succeeded)"]
    assert [c[0] for c in objects.calls] == ["create", "get", "get", "get", "get"]


def test_the_launcher_fails_with_the_jobs_reason_and_waits_through_a_suspension():
    failed = _job([("Failed", "FailedJobs", "jobset failed: node-0 exited with code 1")])
    launcher, _, lines, body = _launch([_job([("Suspended", "Suspended", "queued by Kueue")]), _job(jobs=(4, 4, 0, 0)),
                                        failed])
    with pytest.raises(JobFailed, match="TrainJob kubeflow/sfa-stage1-x failed: FailedJobs: jobset failed: node-0"):
        launcher.run(body)
    assert "TrainJob sfa-stage1-x: suspended (Suspended: queued by Kueue)" in lines
    deadline = _job([("Failed", "DeadlineExceeded", "TrainJob exceeded its activeDeadlineSeconds")])
    launcher, _, _, body = _launch([deadline])
    with pytest.raises(JobFailed, match="failed: DeadlineExceeded"):
        launcher.run(body)


def test_a_retried_step_attaches_to_its_job_or_replaces_a_failed_one():
    launcher, objects, lines, body = _launch([_job([("Complete", "JobsCompleted", "")])], exists=True)
    launcher.run(body)
    assert "exists (a retried step); following it" in lines[0]
    # A retried step whose job failed (preempted nodes, backoff used up) replaces it: the new job resumes
    # from the run's last committed checkpoint instead of the retry repeating the old failure.
    failed = _job([("Failed", "FailedJobs", "node-1 preempted")])
    states = [failed, _job(jobs=(4, 4, 0, 0)), _job([("Complete", "JobsCompleted", "")])]
    launcher, objects, lines, body = _launch(states, exists=True)
    launcher.run(body)
    assert [c[0] for c in objects.calls[:5]] == ["create", "get", "delete", "get", "create"]
    assert "failed before (FailedJobs: node-1 preempted); replacing it" in lines[0] and "created again" in lines[1]
    assert lines[-1].endswith("succeeded (JobsCompleted)")

def test_a_cancelled_run_deletes_its_job_and_a_drained_launcher_leaves_it_training():
    """SIGTERM reaches the launcher both when the run is cancelled and when only its pod goes (a node drain,
    a GKE upgrade, a spot preemption of the 1-CPU launcher): the run's Workflow, as the API returns it, tells
    which. KFP 2.17.0 terminates a run with a merge patch {"spec": {"activeDeadlineSeconds": 0}} on the
    Workflow (backend/src/common/util/execution_spec.go GetTerminatePatch, commit 4a3592c); deleting a run
    deletes its Workflow; `argo stop|terminate` sets spec.shutdown."""
    running = {"apiVersion": "argoproj.io/v1alpha1", "kind": "Workflow",
               "metadata": {"name": "sfa-abc12", "uid": "6f1c"}, "spec": {"entrypoint": "entrypoint"},
               "status": {"phase": "Running"}}
    terminated = {**running, "spec": {**running["spec"], "activeDeadlineSeconds": 0}}
    stopped = {**running, "spec": {**running["spec"], "shutdown": "Stop"}}
    for workflow, why in ((terminated, "terminated: activeDeadlineSeconds 0"), (None, "its Workflow is gone"),
                          (stopped, "shutdown: Stop")):
        def cancel(_):
            launcher._on_sigterm(15, None)
        launcher, objects, lines, body = _launch([_job(jobs=(4, 4, 0, 0))], on_sleep=cancel, workflow=workflow)
        with pytest.raises(JobFailed, match=f"cancelled \\({why}\\): TrainJob kubeflow/sfa-stage1-x deleted"):
            launcher.run(body)
        assert objects.calls[-1] == ("delete", "trainjobs", "sfa-stage1-x")
    # A drain (the Workflow runs on), or a Workflow the API cannot answer for now (it owns the job, which goes
    # with the run): the job is left training.
    for workflow in (running, 503):
        launcher, objects, lines, body = _launch([_job(jobs=(4, 4, 0, 0))], on_sleep=cancel, workflow=workflow)
        with pytest.raises(JobFailed, match="keeps training, and the step's retry follows it"):
            launcher.run(body)
        assert ("delete", "trainjobs", "sfa-stage1-x") not in objects.calls
    # The retry of that step attaches to the job that kept training.
    launcher, objects, lines, body = _launch([_job(jobs=(4, 4, 0, 0)), _job([("Complete", "JobsCompleted", "")])],
                                             exists=True, workflow=running)
    launcher.run(body)
    assert "exists (a retried step); following it" in lines[0] and lines[-1].endswith("succeeded (JobsCompleted)")


def test_the_launcher_follows_a_v1_pytorchjob():
    launcher, objects, lines, body = _launch([{"status": {"conditions": [
        {"type": "Succeeded", "status": "True", "reason": "PyTorchJobSucceeded", "message": "done"}]}}],
        engine="pytorchjob")
    launcher.run(body)
    assert objects.calls[0] == ("create", "pytorchjobs", "sfa-stage1-x")
    assert lines[-1] == "PyTorchJob sfa-stage1-x: succeeded (PyTorchJobSucceeded: done)"


class _Core:
    """A CoreV1Api with one chief pod whose log grows between polls."""

    def __init__(self, logs):
        self.logs, self.selectors = list(logs), []

    def list_namespaced_pod(self, namespace, label_selector):
        self.selectors.append(label_selector)
        pod = type("Pod", (), {"metadata": type("Meta", (), {"name": "sfa-stage1-x-node-0-0"})()})()
        return type("PodList", (), {"items": [pod]})()

    def read_namespaced_pod_log(self, name, namespace, timestamps, since_seconds):
        return self.logs.pop(0) if self.logs else ""


def test_the_chiefs_log_streams_into_the_step_log_once():
    core = _Core(["2026-01-01T00:00:01Z epoch 1/30 step 20/1875 loss 5.9\n",
                  "2026-01-01T00:00:01Z epoch 1/30 step 20/1875 loss 5.9\n2026-01-01T00:00:09Z epoch 1/30 step 40/1875"
                  " loss 5.7\n"])
    launcher, _, lines, body = _launch([_job(jobs=(4, 4, 0, 0)), _job(jobs=(4, 4, 0, 0)),
                                        _job([("Complete", "JobsCompleted", "")])], core=core)
    launcher.run(body)
    assert [line for line in lines if line.startswith("  [node 0]")] == [
        "  [node 0] epoch 1/30 step 20/1875 loss 5.9", "  [node 0] epoch 1/30 step 40/1875 loss 5.7"]
    assert core.selectors[0] == ("jobset.sigs.k8s.io/jobset-name=sfa-stage1-x,"
                                 "jobset.sigs.k8s.io/replicatedjob-name=node,"
                                 "batch.kubernetes.io/job-completion-index=0")
    assert outcome({}) == ("running", "waiting for pods")


def test_multi_node_jobs_can_be_admitted_whole_and_a_tpu_slices_hosts_share_one_pool():
    """Gang scheduling: with `--queue`, the job carries Kueue's queue label, so Kueue admits all its nodes or
    none (two jobs never each hold part of the nodes). A TPU slice's JobSet asks for exclusive placement per
    node pool (Trainer v2.3.0 takes JobSet metadata in a runtime patch: trainjob_types.go at 658725b)."""
    spec = node_spec(profiles.get("tpu-v3-64"), queue="tpu-slices")
    body = train_job("sfa-stage1-x", "kubeflow", spec, image="reg/sfa-vivit:1-tpu", spec_json=SPEC_JSON)
    assert body["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "tpu-slices"
    template = body["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]
    assert template["metadata"]["annotations"] == {"alpha.jobset.sigs.k8s.io/exclusive-topology":
                                                   "cloud.google.com/gke-nodepool"}
    check_train_job(body)                                  # the API models keep both
    gpu = train_job("sfa-stage1-x", "kubeflow", node_spec(profiles.get("gpu-a100-x4")), image="r/s:1-cuda",
                    spec_json=SPEC_JSON)
    assert "kueue.x-k8s.io/queue-name" not in gpu["metadata"]["labels"]           # opt-in
    assert "metadata" not in gpu["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]
    pt = pytorch_job("sfa-stage1-x", "kubeflow", node_spec(profiles.get("gpu-a100-x4"), "pytorchjob", queue="q"),
                     image="r/s:1-cuda", spec_json=SPEC_JSON)
    assert pt["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "q"


def _strict(schema):
    """A CRD's structural schema as the API server's strict field validation applies it (kubectl's default
    since Kubernetes 1.27): an object with declared properties takes no other field."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema and not schema.get(
                "x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        return schema
    return [_strict(v) for v in schema] if isinstance(schema, list) else schema


def test_the_kueue_manifests_are_valid_kueue_objects_that_admit_each_multi_node_job_whole():
    """k8s/kueue.yaml against Kueue v0.19.2's v1beta2 CRD schemas (tests/data/kueue, strict) and the CEL rule
    of its resource groups; then Kueue's flavor assignment (doctor.kueue_refusal) admits one job of every
    multi-node profile, exactly as our launcher creates it, and not two at once (the gang: the second waits)."""
    import jsonschema

    from sfa_vivit.kubeflow import doctor
    docs = [d for d in yaml_docs((Path(__file__).resolve().parents[1] / "k8s" / "kueue.yaml").read_text()) if d]
    assert docs == profiles.kueue_manifests()            # the checked-in file is the generator's
    schemas = json.loads((Path(__file__).parent / "data" / "kueue" / "v1beta2-schemas.json").read_text())["schemas"]
    for doc in docs:
        assert doc["apiVersion"] == "kueue.x-k8s.io/v1beta2"
        jsonschema.validate(doc, _strict(schemas[doc["kind"]]["openAPIV3Schema"]))
        assert "namespace" not in doc["metadata"]      # the LocalQueue goes where `kubectl apply -n` puts it
    by_kind = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    (cluster_queue,), (local_queue,) = by_kind["ClusterQueue"], by_kind["LocalQueue"]
    assert local_queue["metadata"]["name"] == profiles.QUEUE and local_queue["spec"]["clusterQueue"] == \
        cluster_queue["metadata"]["name"]
    assert cluster_queue["spec"]["namespaceSelector"] == {}          # nil would admit from no namespace
    for group in cluster_queue["spec"]["resourceGroups"]:            # CEL rule, and the webhook's order
        for flavor in group["flavors"]:
            assert [r["name"] for r in flavor["resources"]] == group["coveredResources"]
    flavors = {f["metadata"]["name"]: f for f in by_kind["ResourceFlavor"]}
    multi_node = [p for p in profiles.PROFILES.values() if p.nodes > 1]
    assert multi_node
    for profile in multi_node:
        spec = node_spec(profile, queue=profiles.QUEUE)
        body = train_job("sfa-stage1-x", "kubeflow", spec, image="r/s:1", spec_json=SPEC_JSON)
        pod = body["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0][
            "template"]["spec"]["template"]["spec"]
        assert body["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == local_queue["metadata"]["name"]
        assert pod["nodeSelector"] == spec.node_selector and pod["tolerations"] == spec.tolerations
        assert body["spec"]["trainer"]["resourcesPerNode"]["requests"] == spec.resources["requests"]
        assert doctor.kueue_refusal(spec, cluster_queue, flavors) is None, profile.name
        two = NodeSpec.from_json(spec.to_json().replace(f'"nodes": {spec.nodes}', f'"nodes": {2 * spec.nodes}'))
        assert "quota short of one job" in doctor.kueue_refusal(two, cluster_queue, flavors), profile.name


def test_sigterm_ends_the_launchers_wait_at_once():
    """The launcher polls every 15 s; Kubernetes gives a pod 30 s between SIGTERM and SIGKILL. The wait ends
    when SIGTERM arrives, not at the next poll."""
    import threading
    import time
    launcher = Launcher(_Objects([_job(jobs=(4, 4, 0, 0))]), "kubeflow", poll_s=15, report=lambda line: None)
    threading.Timer(0.2, launcher._on_sigterm, (15, None)).start()
    start = time.monotonic()
    launcher.sleep(15)
    assert time.monotonic() - start < 5
