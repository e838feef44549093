"""Multi-node training from a pipeline step, on Kubeflow Trainer.

A training step whose profile names more than one node does not train in its own pod: on Kubeflow it
submits a job to the cluster's training operator and follows it; on Vertex AI Pipelines the step is a
custom job with worker pools (profiles.vertex_custom_job) and each machine runs its node of the job
(`train_this_node`, rendezvous from CLUSTER_SPEC).

- Kubeflow Trainer v2: a `TrainJob` (trainer.kubeflow.org/v1alpha1) on the `torch-distributed`
  ClusterTrainingRuntime. The runtime starts the command on every node with PET_NNODES,
  PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR and PET_MASTER_PORT; the command is `torchrun`,
  which reads them. Pod settings (node selector, tolerations, /dev/shm, service account) go in a
  runtime patch of the `node` replicated job. The object is built and checked with the published
  Trainer API models (`kubeflow-trainer-api`).
- The v1 Training Operator (`engine: pytorchjob`): a `PyTorchJob` (kubeflow.org/v1) with one Master
  and N-1 Workers; the operator sets MASTER_ADDR, MASTER_PORT and RANK (the replica's node rank),
  which the command hands to torchrun.

The step's pod acts as the launcher: it takes the image of its own pod (so
the job runs exactly what the step runs), creates the job owned by the run's Argo Workflow (or finds
the one a retried step created before), reports each change of the job's state and the chief's log
lines into the step log, fails with the job's reason, deletes the job when the run is cancelled
(SIGTERM with the Workflow terminated or gone; a SIGTERM of the launcher's pod alone, a drain or a
preemption, leaves the job training for the step's retry), and reads the metrics rank 0 committed at
the step's output URI. The job's pods run as `sfa-vivit-train`, which has no Kubernetes rights.

Never run against a real cluster here: the objects are held to the API models and the launcher's state
handling is tested with job objects shaped as the API returns them (README, "Running on a cluster").
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import signal
import threading
import time
from typing import Any, Callable

log = logging.getLogger(__name__)

ENGINES = {
    "trainjob": ("trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob"),
    "pytorchjob": ("kubeflow.org", "v1", "pytorchjobs", "PyTorchJob"),
}
TRAINJOB_RUNTIME = "torch-distributed"
NODE = "node"                 # the torch-distributed runtime's replicated job and container name
MANAGER = "sfa-vivit.kubeflow.org/launcher"
LAUNCHERS = ("torchrun", "python")
# The training pods' own Kubernetes service account (k8s/rbac.yaml): Workload Identity for the buckets and no
# Kubernetes rights, so no training process can create or delete jobs; only the launcher (the step's pod,
# running as the run's account `sfa-vivit`) can.
TRAIN_SERVICE_ACCOUNT = "sfa-vivit-train"
# Seconds a training pod gets between SIGTERM (a drain, an upgrade, a deleted job) and SIGKILL: the
# trainer checkpoints the current step on SIGTERM, and a ViViT-L checkpoint with its optimizer state is 2.84 GB
# (bench/checkpoint_commit.py: 71-98 s to a GCS emulator at 29-40 MB/s); Kubernetes' default of 30 s cuts it off.
# A Spot VM's preemption gives the node about 30 s whatever the pod asks: there checkpoint_every_minutes bounds
# what is lost.
GRACE_S = 300
# Pods of a profile namespace in multi-user Kubeflow get an Istio sidecar by default: a Job's pod with a
# sidecar never completes, and torchrun's rendezvous would go through Envoy.
POD_ANNOTATIONS = {"sidecar.istio.io/inject": "false"}
WORKFLOW = ("argoproj.io", "v1alpha1", "workflows", "Workflow")
# Kueue admits a labelled job whole, when its LocalQueue's ClusterQueue has quota for every node of it, so two
# multi-node jobs never each hold part of the nodes and wait for the rest (https://kueue.sigs.k8s.io).
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# JobSet places each replicated job's pods in one node pool exclusively: a TPU slice job's hosts never straddle
# two slices (https://github.com/kubernetes-sigs/jobset, exclusive placement; GKE's TPU slice docs).
EXCLUSIVE_TOPOLOGY = {"alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"}


class JobFailed(RuntimeError):
    """The training job ended without success; the message carries the job's own reason."""


@dataclasses.dataclass(frozen=True)
class NodeSpec:
    """What every node of a multi-node training job asks for (from a profile)."""
    nodes: int
    procs_per_node: int
    resources: dict[str, dict[str, str]]                       # {"limits": {...}, "requests": {...}}
    node_selector: dict[str, str] = dataclasses.field(default_factory=dict)
    tolerations: list[dict[str, str]] = dataclasses.field(default_factory=list)
    shm_size: str = "16Gi"
    engine: str = "trainjob"
    launcher: str = "torchrun"          # torchrun (procs_per_node ranks), or python (one process per node: XLA)
    service_account: str = TRAIN_SERVICE_ACCOUNT   # the training pods' (not the launcher's) account
    queue: str = ""                     # a Kueue LocalQueue: the job is admitted whole or waits (gang scheduling)

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise ValueError(f"engine={self.engine!r} is not one of {sorted(ENGINES)}")
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"launcher={self.launcher!r} is not one of {LAUNCHERS}")
        if self.launcher == "python" and self.engine == "pytorchjob":
            # GKE gives a TPU slice's hosts their TPU_WORKER_ID and TPU_WORKER_HOSTNAMES in the pods of an
            # Indexed Job or JobSet (a TrainJob), not in a PyTorchJob's.
            raise ValueError("a multi-host TPU slice: it trains as a TrainJob (--operator trainjob), whose pods "
                             "GKE gives the slice's layout; a PyTorchJob's pods do not get it")
        if self.nodes < 2 or self.procs_per_node < 1:
            raise ValueError(f"a multi-node job needs nodes >= 2 and procs_per_node >= 1, got {self.nodes} "
                             f"and {self.procs_per_node}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "NodeSpec":
        return cls(**json.loads(text))


def node_spec(profile: Any, engine: str = "trainjob", queue: str = "") -> NodeSpec:
    """The per-node request of a multi-node profile (`profiles.Profile` with nodes > 1); ValueError for a
    combination no engine can run (NodeSpec)."""
    resources = {"cpu": profile.cpu, "memory": profile.memory}
    if profile.accelerator:
        resources[profile.accelerator] = str(profile.accelerator_count)
    return NodeSpec(nodes=profile.nodes, procs_per_node=profile.nproc,
                    resources={"limits": dict(resources), "requests": dict(resources)},
                    node_selector=dict(profile.node_selector),
                    tolerations=[{"key": k, "operator": op, "effect": effect} for k, op, effect in profile.tolerations],
                    shm_size=profile.shm_size, engine=engine, launcher=profile.launcher, queue=queue)


def _command(spec: NodeSpec, spec_json: str, torchrun_args: list[str] = ()) -> tuple[list[str], list[str]]:
    """A node's command and arguments: torchrun with `torchrun_args`, or one Python process (XLA: the ranks
    are the slice's hosts, from the environment the cluster gives each pod; runtime.hosts_env)."""
    from sfa_vivit.train.launch import rank_args
    if spec.launcher == "python":
        return ["python"], rank_args(spec_json)
    return ["torchrun"], [*torchrun_args, *rank_args(spec_json)]


def job_name(mode: str, out: str) -> str:
    """A DNS-1035 name fixed by the step's output URI: a retried step finds the job it created."""
    return f"sfa-{mode}-{hashlib.sha256(out.encode()).hexdigest()[:10]}"


def _pod_patch(spec: NodeSpec, container: str) -> dict[str, Any]:
    pod: dict[str, Any] = {
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.shm_size}}],
        "containers": [{"name": container, "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}]}],
        "terminationGracePeriodSeconds": GRACE_S,
    }
    if spec.node_selector:
        pod["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod["tolerations"] = [dict(t) for t in spec.tolerations]
    if spec.service_account:
        pod["serviceAccountName"] = spec.service_account
    return pod


def _metadata(name: str, namespace: str, labels: dict[str, str] | None,
              owner: dict[str, str] | None, queue: str = "") -> dict[str, Any]:
    """A job's metadata; `owner` ({'name', 'uid'} of the run's Argo Workflow) makes the job go with its run;
    `queue` puts it in a Kueue LocalQueue."""
    meta: dict[str, Any] = {"name": name, "namespace": namespace,
                            "labels": {"app.kubernetes.io/part-of": "sfa-vivit", **(labels or {}),
                                       **({QUEUE_LABEL: queue} if queue else {})}}
    if owner:
        group, version, _, kind = WORKFLOW
        meta["ownerReferences"] = [{"apiVersion": f"{group}/{version}", "kind": kind, "name": owner["name"],
                                    "uid": owner["uid"]}]
    return meta


def train_job(name: str, namespace: str, spec: NodeSpec, *, image: str, spec_json: str,
              labels: dict[str, str] | None = None, owner: dict[str, str] | None = None) -> dict[str, Any]:
    """The Kubeflow Trainer v2 TrainJob of a multi-node run, checked against the Trainer API models. A TPU
    slice's hosts (one process each) are placed in one node pool exclusively."""
    command, args = _command(spec, spec_json)
    jobset_metadata = {"metadata": {"annotations": dict(EXCLUSIVE_TOPOLOGY)}} if spec.launcher == "python" else {}
    body = {
        "apiVersion": "trainer.kubeflow.org/v1alpha1",
        "kind": "TrainJob",
        "metadata": _metadata(name, namespace, labels, owner, spec.queue),
        "spec": {
            "runtimeRef": {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                           "name": TRAINJOB_RUNTIME},
            "trainer": {
                "image": image,
                "command": command,
                "args": args,
                "numNodes": spec.nodes,
                "numProcPerNode": spec.procs_per_node,
                "resourcesPerNode": spec.resources,
                "env": [{"name": "PYTHONUNBUFFERED", "value": "1"}],
            },
            "runtimePatches": [{
                "manager": MANAGER,
                "trainingRuntimeSpec": {"template": {**jobset_metadata, "spec": {"replicatedJobs": [{
                    "name": NODE,
                    "template": {"spec": {"template": {"metadata": {"annotations": dict(POD_ANNOTATIONS)},
                                                       "spec": _pod_patch(spec, NODE)}}},
                }]}}},
            }],
        },
    }
    check_train_job(body)
    return body


def check_train_job(body: dict[str, Any]) -> None:
    """Raise ValueError unless `body` is a TrainJob the published Trainer API models accept whole (a
    field they do not know would be dropped by the API server: refused here instead)."""
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob
    try:      # the generated client's own (de)serialisers: they know Quantity and IntOrString
        kept = json.loads(TrainerV1alpha1TrainJob.from_dict(body).to_json())
    except ValueError as e:       # pydantic's ValidationError is a ValueError
        raise ValueError(f"not a valid TrainJob: {e}") from None
    lost = _lost_fields(body, kept)
    if lost:
        raise ValueError(f"TrainJob fields the Trainer API does not know: {lost}")


def _lost_fields(sent: Any, kept: Any, path: str = "") -> list[str]:
    if isinstance(sent, dict):
        if not isinstance(kept, dict):
            return [path or "."]
        out = []
        for key, value in sent.items():
            if key not in kept:
                out.append(f"{path}.{key}")
            else:
                out += _lost_fields(value, kept[key], f"{path}.{key}")
        return out
    if isinstance(sent, list) and isinstance(kept, list):
        return [x for i, (a, b) in enumerate(zip(sent, kept)) for x in _lost_fields(a, b, f"{path}[{i}]")]
    return []


def pytorch_job(name: str, namespace: str, spec: NodeSpec, *, image: str, spec_json: str,
                labels: dict[str, str] | None = None, owner: dict[str, str] | None = None) -> dict[str, Any]:
    """The v1 Training Operator's PyTorchJob of the same run: Master + (nodes - 1) Workers. The operator
    sets MASTER_ADDR, MASTER_PORT and RANK (the node's rank) in each pod; Kubernetes expands $(VAR) in
    the arguments."""
    pod = _pod_patch(spec, "pytorch")
    command, args = _command(spec, spec_json, [f"--nnodes={spec.nodes}", f"--nproc_per_node={spec.procs_per_node}",
                                               "--node_rank=$(RANK)", "--master_addr=$(MASTER_ADDR)",
                                               "--master_port=$(MASTER_PORT)"])
    pod["containers"][0].update({
        "image": image,
        "command": command,
        "args": args,
        "resources": spec.resources,
        "env": [{"name": "PYTHONUNBUFFERED", "value": "1"}],
    })
    template = {"metadata": {"annotations": dict(POD_ANNOTATIONS)}, "spec": pod}
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": _metadata(name, namespace, labels, owner, spec.queue),
        "spec": {
            "runPolicy": {"backoffLimit": 3, "cleanPodPolicy": "None"},
            "pytorchReplicaSpecs": {
                "Master": {"replicas": 1, "restartPolicy": "OnFailure", "template": template},
                "Worker": {"replicas": spec.nodes - 1, "restartPolicy": "OnFailure", "template": template},
            },
        },
    }


def build(engine: str, name: str, namespace: str, spec: NodeSpec, **kwargs: Any) -> dict[str, Any]:
    return (train_job if engine == "trainjob" else pytorch_job)(name, namespace, spec, **kwargs)


# ----------------------------------------------------------------------------------------------
# Following a job
# ----------------------------------------------------------------------------------------------

def outcome(job: dict[str, Any]) -> tuple[str, str]:
    """(state, detail) of a TrainJob or PyTorchJob as the API returns it. state: 'succeeded', 'failed',
    'suspended' or 'running'; detail: the condition's reason and message, or the replicas' counts."""
    conditions = {c.get("type"): c for c in (job.get("status") or {}).get("conditions") or []
                  if c.get("status") == "True"}
    for kind, state in (("Complete", "succeeded"), ("Succeeded", "succeeded"), ("Failed", "failed"),
                        ("Suspended", "suspended")):
        if kind in conditions:
            c = conditions[kind]
            return state, ": ".join(x for x in (c.get("reason"), c.get("message")) if x) or kind
    status = job.get("status") or {}
    counts = status.get("jobsStatus") or []
    if counts:
        total = {k: sum(int(j.get(k) or 0) for j in counts) for k in ("ready", "active", "succeeded", "failed")}
        return "running", ", ".join(f"{v} {k}" for k, v in total.items())
    replicas = status.get("replicaStatuses") or {}
    if replicas:
        return "running", ", ".join(f"{kind}: {s.get('active', 0)} active" for kind, s in sorted(replicas.items()))
    return "running", "waiting for pods"


@dataclasses.dataclass
class Launcher:
    """Create a training job and follow it to its end. `objects` is a kubernetes CustomObjectsApi, `core`
    a CoreV1Api (for the chief's log; None: states only)."""
    objects: Any
    namespace: str
    engine: str = "trainjob"
    core: Any = None
    poll_s: float = 15.0
    report: Callable[[str], None] = print
    sleep: Callable[[float], None] | None = None   # default: a wait that SIGTERM ends at once
    workflow: str | None = None         # the run's Argo Workflow: read on SIGTERM to tell a cancel from a drain
    _cancelled: bool = False
    _last_log: str = ""
    _woken: threading.Event = dataclasses.field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        if self.sleep is None:
            self.sleep = self._woken.wait

    def run(self, body: dict[str, Any]) -> dict[str, Any]:
        """Create `body` (or attach to the job of that name a retried step created), wait for its end and
        return the finished job. Raises JobFailed with the job's reason; on SIGTERM deletes the job and
        raises JobFailed."""
        group, version, plural, kind = ENGINES[self.engine]
        name = body["metadata"]["name"]
        from kubernetes.client.exceptions import ApiException
        try:
            self.objects.create_namespaced_custom_object(group, version, self.namespace, plural, body)
            self.report(f"{kind} {self.namespace}/{name}: created")
        except ApiException as e:
            if e.status != 409:
                raise JobFailed(f"cannot create {kind} {self.namespace}/{name}: HTTP {e.status} {e.reason}") from None
            self._attach_or_replace(body, group, version, plural, kind, name)
        previous = signal.signal(signal.SIGTERM, self._on_sigterm) if _main_thread() else None
        try:
            return self._follow(group, version, plural, kind, name)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    def _attach_or_replace(self, body: dict[str, Any], group: str, version: str, plural: str, kind: str,
                           name: str) -> None:
        """A retried step finds the job it created: follow it while it runs (or once it has succeeded); a
        job that failed (a preemption, a used-up backoff) is deleted and created again, so the retry
        resumes from the run's last committed checkpoint instead of repeating the failure."""
        from kubernetes.client.exceptions import ApiException
        state, detail = outcome(self.objects.get_namespaced_custom_object(group, version, self.namespace, plural,
                                                                          name))
        if state != "failed":
            self.report(f"{kind} {self.namespace}/{name}: exists (a retried step); following it")
            return
        self.report(f"{kind} {self.namespace}/{name}: failed before ({detail}); replacing it to resume from the "
                    "last committed checkpoint")
        self.objects.delete_namespaced_custom_object(group, version, self.namespace, plural, name)
        while True:           # deletion is asynchronous: wait until the name is free
            try:
                self.objects.get_namespaced_custom_object(group, version, self.namespace, plural, name)
            except ApiException as e:
                if e.status == 404:
                    break
                raise
            self.sleep(self.poll_s)
        self.objects.create_namespaced_custom_object(group, version, self.namespace, plural, body)
        self.report(f"{kind} {self.namespace}/{name}: created again")

    def _follow(self, group: str, version: str, plural: str, kind: str, name: str) -> dict[str, Any]:
        seen = None
        while True:
            if self._cancelled:
                why = self.run_cancelled()
                if why is None:
                    raise JobFailed(f"this launcher pod was stopped (SIGTERM) while its run goes on (a node drain, "
                                    f"an upgrade or a preemption of the launcher's node): {kind} {self.namespace}/"
                                    f"{name} keeps training, and the step's retry follows it")
                self.objects.delete_namespaced_custom_object(group, version, self.namespace, plural, name)
                raise JobFailed(f"the run was cancelled ({why}): {kind} {self.namespace}/{name} deleted")
            job = self.objects.get_namespaced_custom_object(group, version, self.namespace, plural, name)
            state, detail = outcome(job)
            if (state, detail) != seen:
                self.report(f"{kind} {name}: {state} ({detail})")
                seen = (state, detail)
            self._chief_log(name)
            if state == "succeeded":
                return job
            if state == "failed":
                raise JobFailed(f"{kind} {self.namespace}/{name} failed: {detail}")
            self.sleep(self.poll_s)

    def _chief_log(self, name: str) -> None:
        """New lines of the chief's (node 0's) log since the last poll, into the step log."""
        if self.core is None:
            return
        selector = (f"jobset.sigs.k8s.io/jobset-name={name},jobset.sigs.k8s.io/replicatedjob-name={NODE},"
                    "batch.kubernetes.io/job-completion-index=0"
                    if self.engine == "trainjob" else
                    f"training.kubeflow.org/job-name={name},training.kubeflow.org/replica-type=master")
        try:
            pods = self.core.list_namespaced_pod(self.namespace, label_selector=selector).items
            if not pods:
                return
            text = self.core.read_namespaced_pod_log(pods[0].metadata.name, self.namespace, timestamps=True,
                                                     since_seconds=int(self.poll_s) + 5)
        except Exception as e:  # noqa: BLE001 - logs are a courtesy; the job's state is what counts
            log.debug("no log of %s yet: %s", name, e)
            return
        for line in (text or "").splitlines():
            stamp, _, message = line.partition(" ")
            if stamp > self._last_log:
                self.report(f"  [node 0] {message}")
                self._last_log = stamp

    def _on_sigterm(self, signum, frame) -> None:
        self._cancelled = True
        self._woken.set()              # the poll's wait ends now: the 30 s between SIGTERM and SIGKILL are short

    def run_cancelled(self) -> str | None:
        """Why the run this launcher serves is over (cancelled, deleted), or None while it goes on. KFP
        terminates a run by patching its Workflow's `spec.activeDeadlineSeconds` to 0 (KFP 2.17.0,
        backend/src/common/util/execution_spec.go GetTerminatePatch), `argo stop|terminate` sets
        `spec.shutdown`, and deleting a run deletes its Workflow. No Workflow named counts as cancelled (a job
        with no owner that nobody follows); one that cannot be read (an API error, three tries) does not: the
        job is owned by it and goes when the run is deleted."""
        if not self.workflow:
            return "no Workflow to ask"
        from kubernetes.client.exceptions import ApiException
        group, version, plural, _ = WORKFLOW
        for attempt in range(3):
            try:
                workflow = self.objects.get_namespaced_custom_object(group, version, self.namespace, plural,
                                                                     self.workflow)
                break
            except ApiException as e:
                if e.status == 404:
                    return "its Workflow is gone"
                if attempt == 2:
                    # Unknown: leave the job. It is owned by the Workflow, so it goes when the run is deleted,
                    # and a retry of this step follows it; deleting it could throw away days of training.
                    log.warning("cannot read Workflow %s (HTTP %s) after SIGTERM: leaving the job as it is",
                                self.workflow, e.status)
                    return None
                time.sleep(0.5)
        spec = workflow.get("spec") or {}
        if spec.get("activeDeadlineSeconds") == 0:
            return "terminated: activeDeadlineSeconds 0"
        if spec.get("shutdown"):
            return f"shutdown: {spec['shutdown']}"
        if (workflow.get("metadata") or {}).get("deletionTimestamp"):
            return "its Workflow is being deleted"
        return None


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


# ----------------------------------------------------------------------------------------------
# From a pipeline step's pod
# ----------------------------------------------------------------------------------------------

_SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


# Argo labels every pod of a Workflow with the Workflow's name.
WORKFLOW_LABEL = "workflows.argoproj.io/workflow"


def own_pod() -> tuple[str, str, str | None]:
    """(namespace, image, name of the run's Argo Workflow) of the pod this step runs in (in-cluster API)."""
    import os

    from kubernetes import client, config
    config.load_incluster_config()
    with open(f"{_SERVICE_ACCOUNT_DIR}/namespace") as f:
        namespace = f.read().strip()
    pod = client.CoreV1Api().read_namespaced_pod(os.environ["HOSTNAME"], namespace)
    main = next((c for c in pod.spec.containers if c.name == "main"), pod.spec.containers[0])
    return namespace, main.image, (pod.metadata.labels or {}).get(WORKFLOW_LABEL)


def workflow_owner(objects: Any, namespace: str, workflow: str | None) -> dict[str, str] | None:
    """{'name', 'uid'} of the run's Workflow, to own the job (it is deleted with the run); None when unknown."""
    if not workflow:
        return None
    group, version, plural, _ = WORKFLOW
    try:
        body = objects.get_namespaced_custom_object(group, version, namespace, plural, workflow)
    except Exception as e:  # noqa: BLE001 - the job then has no owner; said, not fatal
        log.warning("cannot read Workflow %s/%s (%s): the training job will not be deleted with its run",
                    namespace, workflow, e)
        return None
    return {"name": workflow, "uid": body["metadata"]["uid"]}


def train_this_node(spec: NodeSpec, spec_json: str, out: str) -> dict[str, Any]:
    """On one machine of a Vertex AI worker-pool job: start this node's ranks (the rendezvous from
    CLUSTER_SPEC) and, once the job has finished, return the metrics rank 0 wrote at `out`."""
    _remote(out)
    from sfa_vivit.core.storage import join, open_url
    from sfa_vivit.train.launch import node
    code = node(spec.procs_per_node, spec_json)
    if code:
        raise JobFailed(f"this node's torchrun exited with code {code}")
    with open_url(join(out, "metrics.json"), "rb") as f:
        return json.load(f)


def _remote(out: str) -> None:
    if "://" not in out:
        raise ValueError(f"multi-node training writes its output from other machines: the output {out} must be "
                         "a gs:// URI (give the pipeline a gs:// pipeline root)")


def train_on_nodes(mode: str, spec: NodeSpec, spec_json: str, out: str) -> dict[str, Any]:
    """Run the training run `spec_json` (see `launch.spec_of`) as a multi-node job from this pod; returns
    the metrics rank 0 wrote at `out`."""
    _remote(out)
    from kubernetes import client

    from sfa_vivit.core.storage import join, open_url
    namespace, image, workflow = own_pod()
    objects = client.CustomObjectsApi()
    body = build(spec.engine, job_name(mode, out), namespace, spec, image=image, spec_json=spec_json,
                 labels={"sfa-vivit/mode": mode}, owner=workflow_owner(objects, namespace, workflow))
    Launcher(objects, namespace, spec.engine, core=client.CoreV1Api(), workflow=workflow).run(body)
    with open_url(join(out, "metrics.json"), "rb") as f:
        return json.load(f)
