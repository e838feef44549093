"""Accelerator profiles: what a training step asks of the cluster, applied through kfp-kubernetes.

    profile      accelerator (K8s resource x count)   node pool selector                          Vertex AI type
    cpu          -                                   -                                           -
    gpu-t4       nvidia.com/gpu x 1                  gke-accelerator=nvidia-tesla-t4              NVIDIA_TESLA_T4
    gpu-a100     nvidia.com/gpu x 8                  gke-accelerator=nvidia-tesla-a100            NVIDIA_TESLA_A100
    gpu-a100-80gb nvidia.com/gpu x 8                 gke-accelerator=nvidia-a100-80gb             NVIDIA_A100_80GB
    gpu-h100     nvidia.com/gpu x 8                  gke-accelerator=nvidia-h100-80gb             NVIDIA_H100_80GB
    gpu-a100-x4  4 nodes x nvidia.com/gpu x 8        gke-accelerator=nvidia-tesla-a100            (GKE only)
    gpu-h100-x4  4 nodes x nvidia.com/gpu x 8        gke-accelerator=nvidia-h100-80gb             (GKE only)
    tpu-v3-8     google.com/tpu x 4 (8 cores)        gke-tpu-accelerator=tpu-v3-device, 2x2       TPU_V3 x 8 cores
    tpu-v4-8     google.com/tpu x 4                  gke-tpu-accelerator=tpu-v4-podslice, 2x2x1   (GKE only)
    tpu-v5e-8    google.com/tpu x 8                  gke-tpu-accelerator=tpu-v5-lite-podslice 2x4 ct5lp-hightpu-8t, 2x4
    tpu-v3-64    8 hosts x google.com/tpu x 4        gke-tpu-accelerator=tpu-v3-slice, 4x8        (GKE only)

GPU profiles run training under torchrun with one process per GPU; TPU profiles select
`device=xla`, one process per host driving every chip of the host (SPMD). tpu-v3-64 is the paper's setup
("64 v3 TPUs", i.e. 64 TensorCores: 32 chips), a multi-host slice of 8 hosts.
A profile with `nodes` > 1 trains on that many nodes: on Kubeflow its training steps
run in a small launcher pod that submits a Kubeflow Trainer TrainJob (kubeflow/trainjob.py) with the
profile's per-node resources; on Vertex AI they are custom jobs with worker pools; its evaluation and
benchmark steps use one node. Every profile mounts a memory-backed emptyDir at /dev/shm (DataLoader
workers pass batches through shared memory; the container default of 64 MiB is too small).
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Profile:
    name: str
    cpu: str
    memory: str
    accelerator: str | None = None          # the Kubernetes resource name
    accelerator_count: int = 0
    vertex_accelerator: str | None = None   # the Vertex AI accelerator type
    vertex_accelerator_count: int | None = None   # when Vertex counts otherwise (TPU v3: cores, not chips)
    node_selector: tuple[tuple[str, str], ...] = ()
    tolerations: tuple[tuple[str, str, str], ...] = ()   # key, operator, effect
    device: str = "cpu"                     # the trainer's device setting
    shm_size: str = "16Gi"
    nodes: int = 1                          # > 1: training steps submit a multi-node TrainJob
    vertex_machine_type: str | None = None  # Vertex AI custom jobs (multi-node, TPU v5e): every worker's machine
    vertex_tpu_topology: str | None = None  # Vertex AI TPU v5e: the slice's topology (MachineSpec.tpuTopology)
    vertex: bool = True                     # Vertex AI can run it (its training offers TPU v2, v3 and v5e)
    single_host: str | None = None          # multi-host TPU: the profile evaluation and the benchmark run on
    machine_type: str | None = None         # the GKE node machine type its requests are sized for (docs/cluster.md)
    checkpoint_minutes: int = 30            # training commits a checkpoint at least this often (0: epoch ends only)

    @property
    def vertex_custom_job(self) -> bool:
        """On Vertex AI its accelerated steps run as custom jobs (worker pools name the machine and topology)."""
        return self.nodes > 1 or self.vertex_tpu_topology is not None

    @property
    def image_flavour(self) -> str:
        """The image its steps run: tpu (torch-xla) for TPU profiles, cuda for GPUs, cpu otherwise."""
        return {"xla": "tpu", "cuda": "cuda"}.get(self.device, "cpu")

    @property
    def vertex_count(self) -> int:
        """Vertex AI's accelerator count (TPU v3: cores, not chips)."""
        return self.vertex_accelerator_count or self.accelerator_count

    @property
    def launcher(self) -> str:
        """How a node starts its training processes: torchrun (one per GPU), or python (one per host: on
        XLA that process drives every chip of the host, and a slice's hosts find each other by themselves)."""
        return "python" if self.device == "xla" else "torchrun"

    @property
    def nproc(self) -> int:
        """Training processes per pod: one per GPU; TPU and CPU run one (PJRT spreads over TPU cores)."""
        return self.accelerator_count if self.accelerator == "nvidia.com/gpu" else 1


_GPU_TAINT = (("nvidia.com/gpu", "Exists", "NoSchedule"),)
_TPU_TAINT = (("google.com/tpu", "Exists", "NoSchedule"),)

PROFILES: dict[str, Profile] = {p.name: p for p in (
    Profile("cpu", cpu="8", memory="32G", shm_size="4Gi", machine_type="e2-standard-16"),
    # An 8-vCPU T4 node (n1-highmem-8) leaves about 7.2 CPUs and 45 GiB once GKE's reservation and system
    # pods are taken: a request of 8 CPUs would never be scheduled.
    Profile("gpu-t4", cpu="7", memory="42G", accelerator="nvidia.com/gpu", accelerator_count=1,
            vertex_accelerator="NVIDIA_TESLA_T4", device="cuda", tolerations=_GPU_TAINT, machine_type="n1-highmem-8",
            node_selector=(("cloud.google.com/gke-accelerator", "nvidia-tesla-t4"),)),
    Profile("gpu-a100", cpu="88", memory="640G", accelerator="nvidia.com/gpu", accelerator_count=8,
            vertex_accelerator="NVIDIA_TESLA_A100", device="cuda", tolerations=_GPU_TAINT, shm_size="64Gi",
            machine_type="a2-highgpu-8g", node_selector=(("cloud.google.com/gke-accelerator", "nvidia-tesla-a100"),)),
    Profile("gpu-a100-80gb", cpu="88", memory="1200G", accelerator="nvidia.com/gpu", accelerator_count=8,
            vertex_accelerator="NVIDIA_A100_80GB", device="cuda", tolerations=_GPU_TAINT, shm_size="128Gi",
            machine_type="a2-ultragpu-8g", node_selector=(("cloud.google.com/gke-accelerator", "nvidia-a100-80gb"),)),
    Profile("gpu-h100", cpu="200", memory="1600G", accelerator="nvidia.com/gpu", accelerator_count=8,
            vertex_accelerator="NVIDIA_H100_80GB", device="cuda", tolerations=_GPU_TAINT, shm_size="128Gi",
            machine_type="a3-highgpu-8g", node_selector=(("cloud.google.com/gke-accelerator", "nvidia-h100-80gb"),)),
    # Four whole nodes (a2-highgpu-8g, a3-highgpu-8g): the training steps' TrainJob asks each for the node's
    # GPUs and most of its CPU and memory (what GKE leaves allocatable).
    Profile("gpu-a100-x4", cpu="88", memory="640G", accelerator="nvidia.com/gpu", accelerator_count=8,
            vertex_accelerator="NVIDIA_TESLA_A100", device="cuda", tolerations=_GPU_TAINT, shm_size="64Gi",
            node_selector=(("cloud.google.com/gke-accelerator", "nvidia-tesla-a100"),), nodes=4,
            vertex_machine_type="a2-highgpu-8g", machine_type="a2-highgpu-8g"),
    Profile("gpu-h100-x4", cpu="200", memory="1600G", accelerator="nvidia.com/gpu", accelerator_count=8,
            vertex_accelerator="NVIDIA_H100_80GB", device="cuda", tolerations=_GPU_TAINT, shm_size="128Gi",
            node_selector=(("cloud.google.com/gke-accelerator", "nvidia-h100-80gb"),), nodes=4,
            vertex_machine_type="a3-highgpu-8g", machine_type="a3-highgpu-8g"),
    # GKE TPU VMs (the two-VM "TPU Node" resource cloud-tpus.google.com/v3 is retired): a v3-8 is one
    # ct3-hightpu-4t host, 4 chips (8 TensorCores), accelerator tpu-v3-device, topology 2x2
    # (https://cloud.google.com/kubernetes-engine/docs/concepts/plan-tpus). Vertex counts v3 in cores.
    Profile("tpu-v3-8", cpu="16", memory="96G", accelerator="google.com/tpu", accelerator_count=4,
            vertex_accelerator="TPU_V3", vertex_accelerator_count=8, device="xla", tolerations=_TPU_TAINT,
            machine_type="ct3-hightpu-4t", node_selector=(("cloud.google.com/gke-tpu-accelerator", "tpu-v3-device"),
                           ("cloud.google.com/gke-tpu-topology", "2x2"))),
    # Vertex AI training offers TPU v2, v3 and v5e VMs, not v4
    # (https://cloud.google.com/vertex-ai/docs/training/training-with-tpu-vm): v4 runs on GKE only.
    Profile("tpu-v4-8", cpu="200", memory="400G", accelerator="google.com/tpu", accelerator_count=4,
            vertex_accelerator="TPU_V4_POD", device="xla", tolerations=_TPU_TAINT, vertex=False,
            machine_type="ct4p-hightpu-4t", node_selector=(("cloud.google.com/gke-tpu-accelerator", "tpu-v4-podslice"),
                           ("cloud.google.com/gke-tpu-topology", "2x2x1"))),
    # A multi-host slice (https://cloud.google.com/kubernetes-engine/docs/concepts/plan-tpus): TPU v3 pod slices
    # are tpu-v3-slice with 4 chips per host; 4x8 is 32 chips (64 TensorCores) on 8 hosts. Each host is one node
    # of a TrainJob; GKE gives each TPU_WORKER_ID and TPU_WORKER_HOSTNAMES (runtime.hosts_env).
    Profile("tpu-v3-64", cpu="16", memory="96G", accelerator="google.com/tpu", accelerator_count=4,
            vertex_accelerator="TPU_V3", device="xla", tolerations=_TPU_TAINT, nodes=8, vertex=False,
            single_host="tpu-v3-8", machine_type="ct3p-hightpu-4t",
            node_selector=(("cloud.google.com/gke-tpu-accelerator", "tpu-v3-slice"),
                           ("cloud.google.com/gke-tpu-topology", "4x8"))),
    # On Vertex AI a v5e host is the machine ct5lp-hightpu-8t with MachineSpec.tpuTopology, which the SDK calls
    # "required for TPU v5" (https://cloud.google.com/vertex-ai/docs/reference/rest/v1/MachineSpec); 8 chips
    # on one host are the topology 2x4 (https://cloud.google.com/tpu/docs/supported-tpu-configurations).
    Profile("tpu-v5e-8", cpu="200", memory="180G", accelerator="google.com/tpu", accelerator_count=8,
            vertex_accelerator="TPU_V5_LITEPOD", device="xla", tolerations=_TPU_TAINT,
            vertex_machine_type="ct5lp-hightpu-8t", vertex_tpu_topology="2x4", machine_type="ct5lp-hightpu-8t",
            node_selector=(("cloud.google.com/gke-tpu-accelerator", "tpu-v5-lite-podslice"),
                           ("cloud.google.com/gke-tpu-topology", "2x4"))),
)}


def one_accelerator(profile: Profile) -> Profile:
    """`profile` asking for one of its node's GPUs (and that share of its CPU, memory and /dev/shm): what a
    step that uses one device (the memory benchmark) asks for, leaving the node's other GPUs to other pods.
    A TPU host's chips are one pod's (GKE gives a TPU VM's chips to one container): TPU profiles stay whole."""
    if profile.accelerator != "nvidia.com/gpu" or profile.accelerator_count <= 1:
        return profile
    count = profile.accelerator_count
    shm = int(profile.shm_size.removesuffix("Gi"))
    return dataclasses.replace(profile, name=f"{profile.name}-1", cpu=str(max(1, int(profile.cpu) // count)),
                               memory=f"{max(1, int(profile.memory.rstrip('G')) // count)}G", accelerator_count=1,
                               vertex_accelerator_count=None, shm_size=f"{max(1, shm // count)}Gi", nodes=1)


def loader_workers(profile: Profile) -> int:
    """DataLoader workers per process for evaluation: the pod's CPUs, less one per process, shared (at most 8);
    none without an accelerator, where decoding in the process leaves the model every core."""
    if not profile.accelerator:
        return 0
    return max(1, min(8, int(profile.cpu) // max(1, profile.nproc) - 1))


def get(name: str) -> Profile:
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose one of {sorted(PROFILES)}")
    return PROFILES[name]


# Vertex AI Pipelines picks a machine type from a step's CPU and memory limits, up to 96 vCPUs and 624 GB
# (https://cloud.google.com/vertex-ai/docs/pipelines/machine-types); larger requests are refused.
VERTEX_MAX_CPU = 96
VERTEX_MAX_MEMORY_GB = 624


def apply(task: Any, profile: Profile, *, target: str = "kubeflow") -> Any:
    """Set the profile's resources on a pipeline task. target 'kubeflow': the Kubernetes accelerator
    resource, node selector, tolerations and a memory-backed /dev/shm (kfp-kubernetes). target 'vertex':
    the Vertex AI accelerator type and count, CPU and memory within Vertex's caps, and no Kubernetes-only
    settings (Vertex runs no kfp-kubernetes platform spec)."""
    vertex = target == "vertex"
    cpu, memory = profile.cpu, profile.memory
    if vertex:
        cpu = str(min(int(cpu), VERTEX_MAX_CPU))
        memory = f"{min(int(memory.rstrip('G')), VERTEX_MAX_MEMORY_GB)}G"
    task.set_cpu_request(cpu).set_cpu_limit(cpu)
    task.set_memory_request(memory).set_memory_limit(memory)
    if profile.accelerator:
        accelerator = profile.vertex_accelerator if vertex else profile.accelerator
        count = profile.vertex_count if vertex else profile.accelerator_count
        task.set_accelerator_type(accelerator).set_accelerator_limit(count)
    if vertex:
        return task
    from kfp import kubernetes
    for key, value in profile.node_selector:
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    for key, operator, effect in profile.tolerations:
        kubernetes.add_toleration(task, key=key, operator=operator, effect=effect)
    kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                               size_limit=profile.shm_size)
    return task


def vertex_custom_job(component: Any, profile: Profile) -> Any:
    """`component` as a Vertex AI custom job of `profile.nodes` machines (Google Cloud Pipeline Components):
    the chief in worker pool 0, the other nodes in worker pool 1, each machine with the profile's GPUs or TPU slice
    (https://cloud.google.com/vertex-ai/docs/training/distributed-training). Every machine runs the step;
    the step sees CLUSTER_SPEC and starts its node of one torchrun job (train/launch.py)."""
    from google_cloud_pipeline_components.v1.custom_job import create_custom_training_job_from_component
    job = create_custom_training_job_from_component(
        component, replica_count=profile.nodes, machine_type=profile.vertex_machine_type,
        accelerator_type=profile.vertex_accelerator,
        accelerator_count=profile.vertex_count,
        restart_job_on_worker_restart=True)
    if profile.vertex_tpu_topology:      # Google Cloud Pipeline Components has no argument for it
        for pool in job.component_spec.inputs["worker_pool_specs"].default:
            pool["machine_spec"]["tpu_topology"] = profile.vertex_tpu_topology
    return job


def as_config_map(namespace: str = "sfa-vivit") -> dict[str, Any]:
    """The profiles as a ConfigMap (k8s/profiles.yaml), so a cluster's operators can read them."""
    import json
    data = {name: json.dumps({**dataclasses.asdict(p), "nproc": p.nproc}, sort_keys=True)
            for name, p in PROFILES.items()}
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "sfa-vivit-accelerator-profiles", "namespace": namespace,
                         "labels": {"app.kubernetes.io/part-of": "sfa-vivit"}},
            "data": data}


# Kueue (https://kueue.sigs.k8s.io, API kueue.x-k8s.io/v1beta2: Kueue v0.15 or newer): a multi-node job compiled
# with `--queue` is admitted whole, when its ClusterQueue has quota for every node of it, or waits.
KUEUE_API = "kueue.x-k8s.io/v1beta2"
KUEUE_RESOURCES = ("cpu", "memory", "nvidia.com/gpu", "google.com/tpu")
QUEUE = "sfa-vivit"


_UNITS = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
          "m": 1e-3}


def amount(value: Any) -> float:
    """A Kubernetes quantity ('7', '7500m', '42G', '45Gi', 3.5) as a number (bytes for memory); ValueError if
    it is not one."""
    import re
    if isinstance(value, (int, float)):
        return float(value)
    found = re.fullmatch(r"\s*([0-9.]+)([a-zA-Z]*)\s*", str(value))
    if not found or found.group(2) not in _UNITS:
        raise ValueError(f"cannot read the quantity {value!r}")
    return float(found.group(1)) * _UNITS[found.group(2)]


def _times(value: str, count: int) -> str:
    """A Kubernetes quantity multiplied by a whole number ('640G' x 4 -> '2560G')."""
    import re
    number, unit = re.fullmatch(r"([0-9]+)([A-Za-z]*)", str(value)).groups()
    return f"{int(number) * count}{unit}"


def flavor_name(profile: Profile) -> str:
    """The Kueue ResourceFlavor of a profile's nodes: named by its node pool labels."""
    return "-".join(value for _, value in profile.node_selector) or "default"


def kueue_manifests(queue: str = QUEUE) -> list[dict[str, Any]]:
    """k8s/kueue.yaml: a ResourceFlavor per node kind of the multi-node profiles (its labels and GKE's taint),
    one ClusterQueue whose quota per flavor holds one job of the largest profile on it (so each such job is
    admitted whole and a second one waits instead of holding part of the nodes), and the LocalQueue `queue`
    that `sfa pipeline compile --queue` names (namespaced: apply it where the runs' pods run)."""
    flavors: dict[str, tuple[Profile, dict[str, str]]] = {}     # name -> (its first profile, quota)
    for profile in PROFILES.values():
        if profile.nodes < 2:
            continue
        job = {"cpu": _times(profile.cpu, profile.nodes), "memory": _times(profile.memory, profile.nodes),
               profile.accelerator: str(profile.accelerator_count * profile.nodes)}
        _, quota = flavors.setdefault(flavor_name(profile), (profile, {r: "0" for r in KUEUE_RESOURCES}))
        for resource, quantity in job.items():     # the largest job of the flavor, resource by resource
            if amount(quantity) > amount(quota[resource]):
                quota[resource] = quantity
    docs: list[dict[str, Any]] = []
    for name, (profile, _) in flavors.items():
        docs.append({"apiVersion": KUEUE_API, "kind": "ResourceFlavor", "metadata": {"name": name},
                     "spec": {"nodeLabels": dict(profile.node_selector),
                              # GKE taints accelerator nodes `<resource>=present:NoSchedule`; our pods tolerate it
                              "nodeTaints": [{"key": key, "value": "present", "effect": effect}
                                             for key, _, effect in profile.tolerations]}})
    docs.append({"apiVersion": KUEUE_API, "kind": "ClusterQueue", "metadata": {"name": queue},
                 "spec": {"namespaceSelector": {}, "queueingStrategy": "BestEffortFIFO",
                          "resourceGroups": [{
                              "coveredResources": list(KUEUE_RESOURCES),
                              "flavors": [{"name": name, "resources": [{"name": r, "nominalQuota": quota[r]}
                                                                       for r in KUEUE_RESOURCES]}
                                          for name, (_, quota) in flavors.items()]}]}})
    docs.append({"apiVersion": KUEUE_API, "kind": "LocalQueue", "metadata": {"name": queue},
                 "spec": {"clusterQueue": queue}})
    return docs
