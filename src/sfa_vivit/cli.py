"""The `sfa` command line. Each command parses its arguments and hands over to one library call."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import textwrap
from typing import Any, Sequence

from sfa_vivit.core.options import fields as option_fields


def _load_library() -> None:
    """The library, imported when a command is parsed or runs (torch alone takes seconds): `sfa`, `sfa --help`
    and `sfa --version` never import it."""
    global torch, CheckpointError, DATASETS, load_manifest, verify_shards, PrepError, PrepOptions, prepare
    global SynthOptions, generate, evaluate, LeaseHeld, BenchOptions, VARIANTS, runtime_versions, MODES, RECIPES
    global ImageViTOptions, pretrain_image_vit, NonFiniteLoss, Preempted, train, run_config, recipe_mismatches
    global smoke, model_summary, info_table
    import torch

    from sfa_vivit.core.lease import LeaseHeld
    from sfa_vivit.core.runtime import versions as runtime_versions
    from sfa_vivit.data.manifest import load_manifest, verify_shards
    from sfa_vivit.data.prep import PrepError, PrepOptions, prepare
    from sfa_vivit.data.prep.annotations import DATASETS
    from sfa_vivit.data.prep.synth import SynthOptions, generate
    from sfa_vivit.models import VARIANTS
    from sfa_vivit.models.checkpoints import CheckpointError
    from sfa_vivit.tools.evaluate import evaluate
    from sfa_vivit.tools.membench import BenchOptions
    from sfa_vivit.tools.summary import info_table, model_summary, smoke
    from sfa_vivit.tools.synth_vit import ImageViTOptions
    from sfa_vivit.tools.synth_vit import pretrain as pretrain_image_vit
    from sfa_vivit.train.config import MODES, RECIPES
    from sfa_vivit.train.start import recipe_mismatches, run_config
    from sfa_vivit.train.trainer import NonFiniteLoss, Preempted, train


# The commands and what each is for: `sfa --help` lists them without importing the library.
COMMANDS = {
    "smoke": "one forward/backward step per variant, full and SFA stage 2, on this machine",
    "info": "parameter counts of a variant",
    "data": "datasets: synthesise, prepare shards, verify",
    "train": "train a ViViT-FE: baseline, SFA stage 1 or stage 2 (resumes a run in --out)",
    "evaluate": "multi-view top-1/top-5, per-class accuracy and confusion of a checkpoint",
    "membench": "step time and peak memory of full vs SFA stage 2 per frame count, each setting in a fresh child "
                "process; --budget-gib finds the max frames",
    "scenic": "Scenic (JAX) ViViT factorised-encoder checkpoints in and out",
    "pipeline": "Kubeflow: compile, run locally, submit, schedule",
    "cluster": "check a cluster before a run: sfa cluster doctor",
}


class _Parser(argparse.ArgumentParser):
    """Every command's --help shows its defaults (subcommands are built with the parser's own class)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_args(self, args=None, namespace=None):
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}{_settings_hint(extras)}")
        return parsed


def _settings_hint(extras: list[str]) -> str:
    """'--epochs 2' given to a command: a training setting, which goes through --set. Say how."""
    from sfa_vivit.train.config import TrainConfig
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for i, item in enumerate(extras):
        name, _, value = item.lstrip("-").partition("=")
        key = name.replace("-", "_")
        if item.startswith("--") and key in fields:
            value = value or (extras[i + 1] if i + 1 < len(extras) and not extras[i + 1].startswith("-") else "...")
            return f" (settings go through --set: --set {key}={value})"
    return ""


def _heads(text: str | None) -> dict[str, int] | None:
    """--heads noun=300,verb=97 → {'noun': 300, 'verb': 97}."""
    if not text:
        return None
    heads = {}
    for item in text.split(","):
        name, _, count = item.partition("=")
        if not name.strip() or not count.strip().isdigit() or int(count) < 1:
            raise ValueError(f"--heads {text!r}: each item must be NAME=COUNT with COUNT >= 1, e.g. noun=300,verb=97")
        heads[name.strip()] = int(count)
    return heads


def _top_parser() -> tuple[argparse.ArgumentParser, Any]:
    """`sfa` and its --version, and the subparsers' action to add the commands to."""
    from sfa_vivit import __version__
    parser = _Parser(prog="sfa", description="ViViT factorised encoders, trained the SFA way.")
    parser.add_argument("--version", action="version", version=f"sfa-vivit {__version__}")
    return parser, parser.add_subparsers(dest="command", required=True)


def light_parser() -> argparse.ArgumentParser:
    """What `sfa`, `sfa --help` and `sfa --version` need: the commands and their purpose, not their flags (so
    the library, torch included, is not imported; the full parser's top-level help is the same text)."""
    parser, sub = _top_parser()
    for name, text in COMMANDS.items():
        sub.add_parser(name, help=text)
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The `sfa` command line: every command, flag and default."""
    _load_library()
    parser, sub = _top_parser()

    p = sub.add_parser("smoke", help=COMMANDS["smoke"])
    p.add_argument("--variants", default="Ti,S", help="comma-separated, from " + ",".join(VARIANTS))
    p.add_argument("--frames", type=int, default=8, help="frames of the full (stage-1) step")
    p.add_argument("--stage2-frames", type=int, default=32, help="frames of the stage-2 step")
    p.add_argument("--image-size", type=int, default=224, help="square frame size (px) of the random videos")
    p.add_argument("--batch-size", type=int, default=2, help="clips per step")
    p.add_argument("--out", help="write the rows as JSON to this file")

    p = sub.add_parser("info", help=COMMANDS["info"])
    p.add_argument("--variant", default="B", help="one of " + ",".join(VARIANTS))
    p.add_argument("--frames", type=int, default=32, help="frames per clip (sets the temporal positions)")
    p.add_argument("--image-size", type=int, default=224, help="square frame size (px)")
    p.add_argument("--classes", type=int, default=400, help="classes of the head")
    p.add_argument("--adapter", action="store_true", help="count as SFA stage 2 (adapter on, spatial frozen)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")

    data = sub.add_parser("data", help=COMMANDS["data"]).add_subparsers(
        dest="data_command", required=True)
    p = data.add_parser("prep", help="official annotations + videos -> WebDataset shards + manifest.json")
    p.add_argument("--dataset", required=True, help="one of " + ", ".join(DATASETS))
    p.add_argument("--annotations", action="append", required=True,
                   help="an official annotation file (repeat for several); local path or URL")
    p.add_argument("--videos", required=True, help="folder (local or gs://) holding the videos")
    p.add_argument("--out", required=True, help="output folder (local or gs://)")
    p.add_argument("--split", help="prepare only this split (train, validation, test)")
    _add_options(p, PrepOptions)
    p.add_argument("--recipe", help="the training recipe the shards are checked against (clip length, frame size; "
                                    "default: the one named after --dataset)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="the --set values you will train with (e.g. image_size=32), so the check uses them")

    p = data.add_parser("synth", help="write the synthetic motion-order dataset in the Kinetics layout")
    p.add_argument("--out", required=True, help="local output folder")
    _add_options(p, SynthOptions)

    p = data.add_parser("synth-vit", help="train the synthetic recipe's image ViT (its spatial init, as the "
                        "paper's ImageNet checkpoint); use it with --set image_checkpoint=DIR")
    p.add_argument("--out", required=True, help="local output folder (a Hugging Face ViT folder)")
    _add_options(p, ImageViTOptions)
    p.add_argument("--recipe", default="synthetic", help="the recipe whose spatial encoder sizes it takes")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe overrides (sizes)")

    p = data.add_parser("verify", help="check every shard of a prepared dataset against its sha256")
    p.add_argument("url", help="prep output folder or its manifest.json")

    p = sub.add_parser("train", help=COMMANDS["train"])
    p.add_argument("--mode", choices=MODES, help="required unless --config names it")
    p.add_argument("--config", metavar="YAML",
                   help="a config file (every run writes its resolved one as config.yaml): its values override the "
                        "recipe and mode; --mode, --recipe and --set override it")
    p.add_argument("--data", help="prepared dataset (folder or manifest.json, local or gs://); required to train")
    p.add_argument("--out", help="run folder (local or gs://): checkpoints, metrics.json, model/; required to train")
    p.add_argument("--init", help="stage-1 run folder or checkpoint (stage 2, and temporal_init=stage1); its "
                                  "architecture (variant, model.*, image_size) is this run's unless --set changes it")
    p.add_argument("--recipe", choices=sorted(RECIPES),
                   help="the dataset's training recipe (supplementary Table 1); default: the one named after the "
                        "prepared dataset (its manifest's dataset)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set batch_size=32 --set model.spatial_depth=4")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (recipe < mode < --set) as JSON and exit without training")
    p.add_argument("--force-init", action="store_true",
                   help="accept an --init checkpoint of another mode (stage 2 normally starts from stage 1)")

    p = sub.add_parser("evaluate", help=COMMANDS["evaluate"])
    p.add_argument("--checkpoint", required=True, help="run folder or checkpoint (local or gs://)")
    p.add_argument("--data", required=True, help="prepared dataset")
    p.add_argument("--views", default="4x3", help="CLIPSxCROPS, logits averaged over them")
    p.add_argument("--out", help="folder for metrics.json")
    p.add_argument("--split", default="validation", help="which split of the manifest to evaluate")
    p.add_argument("--batch-size", type=int, default=4, help="clips per batch (each with all its views)")
    p.add_argument("--workers", type=int, default=2, help="data loader processes per rank")
    p.add_argument("--device", default="auto", help="auto (CUDA, else XLA, else CPU), cpu, cuda or xla")
    p.add_argument("--verify-data", action="store_true", help="check the split's shards against their sha256 first")

    p = sub.add_parser("membench", help=COMMANDS["membench"])
    _add_options(p, BenchOptions)
    p.add_argument("--device", default="auto", help="auto (CUDA, else XLA, else CPU), cpu, cuda or xla")
    p.add_argument("--set", action="append", default=[], metavar="model.FIELD=INT",
                   help="a ViViT size override, as in `sfa train`: e.g. --set model.spatial_depth=4")
    p.add_argument("--out", required=True, help="JSON file; the .md table and .png plot are written beside it")

    scenic = sub.add_parser("scenic", help=COMMANDS["scenic"])
    scenic = scenic.add_subparsers(dest="scenic_command", required=True)
    p = scenic.add_parser("import", help="a Scenic ViViT-FE checkpoint (Flax msgpack) -> a checkpoint of ours, "
                                         "which `sfa evaluate` and `sfa train --init` take")
    p.add_argument("source", help="the Scenic checkpoint file (local or gs://): a train state or a parameter tree")
    p.add_argument("out", help="the checkpoint folder to write")
    p.add_argument("--frames", type=int, help="resize the temporal position embedding to this many frames, as Scenic "
                                              "does (default: the checkpoint's)")
    p.add_argument("--heads", help="split the output layer into named heads, in Scenic's class_splits order, e.g. "
                                   "noun=300,verb=97 (397 outputs are read as that, EPIC-KITCHENS, by default)")
    p = scenic.add_parser("export", help="a checkpoint of ours (or a run folder) -> a Scenic ViViT-FE checkpoint")
    p.add_argument("checkpoint", help="checkpoint folder or run folder (its final model)")
    p.add_argument("out", help="the Scenic checkpoint file to write (local or gs://)")
    p.add_argument("--layout", default="train_state", choices=["train_state", "params"],
                   help="train_state: parameters under optimizer/target, as Scenic's ViViT trainer restores them; "
                        "params: a bare parameter tree")

    pipe = sub.add_parser("pipeline", help=COMMANDS["pipeline"]).add_subparsers(
        dest="pipeline_command", required=True)
    p = pipe.add_parser("compile", help="write components/*.yaml, pipelines/*.yaml, k8s/profiles.yaml, k8s/kueue.yaml "
                                        "(or one pipeline with --name/--profile/--out)")
    p.add_argument("--root", default=".", help="repository root for the checked-in files")
    p.add_argument("--name", choices=["sfa", "reproduce"],
                   help="compile only this pipeline (with --out): sfa or reproduce")
    p.add_argument("--profile", default="cpu",
                   help="accelerator profile of the compiled pipeline (sfa_vivit/kubeflow/profiles.py)")
    p.add_argument("--target", default="kubeflow", choices=["kubeflow", "vertex"],
                   help="kubeflow (KFP on a cluster) or vertex (Vertex AI Pipelines)")
    p.add_argument("--out", help="with --name: the YAML file to write")
    p.add_argument("--registry", help="with --name: REGISTRY/NAME of your images; the profile's flavour tag "
                                      "(<version>-cpu|cuda|tpu) is added")
    p.add_argument("--tag", help="with --registry: the tag before -<flavour> (default: the package version; "
                                 "containers/cloudbuild.yaml also pushes <version>-<commit>)")
    p.add_argument("--image", help="with --name: one image for every step (overrides --registry); pin a digest "
                                   "with REGISTRY/NAME@sha256:...")
    p.add_argument("--operator", default="trainjob", choices=["trainjob", "pytorchjob"],
                   help="with --name and a multi-node profile (gpu-a100-x4, ...): Kubeflow Trainer v2 TrainJob, or "
                        "the v1 Training Operator's PyTorchJob")
    p.add_argument("--prep-parallelism", type=int, default=None,
                   help="with --name: data-prep pieces that run at once, 8 CPUs each (default 8)")
    p.add_argument("--queue", default="", help="with --name and a multi-node profile: the Kueue LocalQueue its jobs "
                                               "go to, admitted whole (gang scheduling); default none")
    p = pipe.add_parser("manifests", help="fill k8s/*.yaml for your project (service accounts, RBAC, MLflow) "
                                          "into a folder to kubectl apply; refuses to leave a placeholder")
    p.add_argument("--project", required=True, help="Google Cloud project ID (Workload Identity's service account)")
    p.add_argument("--bucket", required=True, help="bucket for MLflow's artifacts (BUCKET or gs://BUCKET)")
    p.add_argument("--registry", required=True, help="REGISTRY/NAME of the images you built and pushed "
                                                     "(MLflow runs the -cpu one)")
    p.add_argument("--namespace", default="kubeflow",
                   help="namespace the runs' pods run in (standalone KFP: kubeflow; multi-user: your profile's)")
    p.add_argument("--root", default=".", help="repository root holding k8s/")
    p.add_argument("--out", help="folder to write (default: k8s-PROJECT)")
    p = pipe.add_parser("run", help="run the sfa pipeline here (kfp.local) on synthetic data")
    p.add_argument("--runs", default="runs", help="artifacts go to RUNS/<run-id>/")
    p.add_argument("--run-id", help="name of the run folder under --runs (default: sfa-DATE-TIME)")
    p.add_argument("--size", default="default", choices=["default", "tiny"],
                   help="default: the main job (minutes); tiny: a smoke test of the pipeline (figures mean nothing)")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the conventional baseline and its evaluation (SFA only)")
    p = pipe.add_parser("submit", help="send a compiled pipeline to a KFP endpoint or Vertex AI Pipelines")
    p.add_argument("package", help="compiled pipeline YAML, e.g. pipelines/sfa-gpu-a100.yaml")
    p.add_argument("--host", help="KFP endpoint, e.g. https://kubeflow.example.com/pipeline")
    p.add_argument("--vertex", metavar="PROJECT/REGION",
                   help="submit to Vertex AI Pipelines in PROJECT/REGION instead of a KFP endpoint")
    p.add_argument("--pipeline-root", help="gs://BUCKET/PATH for artifacts")
    p.add_argument("--param", action="append", default=[], metavar="NAME=JSON", help="a pipeline parameter")
    p.add_argument("--params-file", action="append", default=[], metavar="FILE",
                   help="pipeline parameters from a YAML or JSON map (name: value); --param items win")
    p.add_argument("--experiment", default="sfa-vivit", help="KFP experiment the run is filed under")
    p.add_argument("--service-account", help="Kubernetes (KFP) or Google (Vertex) service account of the run's pods "
                                              "(on Vertex its custom jobs run as it too)")
    p.add_argument("--network", help="Vertex: the VPC network of the run and its custom jobs "
                                     "(projects/NUMBER/global/networks/NAME), to reach a private MLflow")
    p.add_argument("--namespace", help="KFP profile namespace (multi-user Kubeflow)")
    p.add_argument("--image", help="run every step in this image instead of the one compiled in")
    _add_kfp_auth(p)
    p = pipe.add_parser("schedule", help="recurring reproduction runs, one per dataset")
    p.add_argument("package", help="compiled sfa pipeline YAML")
    p.add_argument("--host", required=True, help="KFP endpoint URL (as for submit)")
    p.add_argument("--datasets", required=True, help="JSON file: {dataset: {annotations, videos, data_uri, ...}}")
    p.add_argument("--cron", default="0 0 3 * * 0", help="KFP cron (with seconds); default Sundays 03:00")
    p.add_argument("--stagger-minutes", type=int, default=60, help="start each dataset's run this much later")
    p.add_argument("--pipeline-root", help="gs://BUCKET/PATH for artifacts")
    p.add_argument("--service-account", help="Kubernetes service account of the runs' pods")
    p.add_argument("--namespace", help="KFP profile namespace (multi-user Kubeflow)")
    _add_kfp_auth(p)

    cluster = sub.add_parser("cluster", help=COMMANDS["cluster"]).add_subparsers(
        dest="cluster_command", required=True)
    p = cluster.add_parser("doctor", help="check, read-only, that a cluster has what a run of a compiled pipeline "
                                          "needs (KFP, CRDs, service account and its rights, nodes, images, MLflow)")
    p.add_argument("package", help="compiled pipeline YAML, e.g. pipelines/sfa-gpu-t4.yaml")
    p.add_argument("--host", help="KFP endpoint, e.g. https://kubeflow.example.com/pipeline")
    p.add_argument("--vertex", metavar="PROJECT/REGION", help="check Vertex AI Pipelines instead of a KFP cluster "
                                                              "(with your Application Default Credentials)")
    p.add_argument("--namespace", default="kubeflow", help="namespace the run's pods run in")
    p.add_argument("--service-account", help="the run's Kubernetes service account (default sfa-vivit), or with "
                                             "--vertex its Google service account (SA@PROJECT.iam.gserviceaccount.com)")
    p.add_argument("--pipeline-root", help="gs://BUCKET/PATH the run will write (checks Workload Identity)")
    p.add_argument("--param", action="append", default=[], metavar="NAME=JSON",
                   help="a pipeline parameter as the run will get it (tracking_uri is checked)")
    p.add_argument("--params-file", action="append", default=[], metavar="FILE",
                   help="pipeline parameters from a YAML or JSON map, as submit takes them")
    p.add_argument("--operator", default="trainjob", choices=["trainjob", "pytorchjob"],
                   help="what a multi-node profile's steps create (as compiled)")
    p.add_argument("--write-test", action="store_true",
                   help="also write and delete one object under --pipeline-root as the run's Google service account "
                        "(needs roles/iam.serviceAccountTokenCreator on it for you)")
    p.add_argument("--kubeconfig", help="kubeconfig file (default: KUBECONFIG or ~/.kube/config, as kubectl)")
    p.add_argument("--context", help="kubeconfig context (default: the current one)")
    _add_kfp_auth(p)

    return parser


def _add_kfp_auth(p: argparse.ArgumentParser) -> None:
    """A KFP API behind authentication: what kfp.Client accepts, used by the health check too."""
    p.add_argument("--token", help="bearer token for the KFP API (default: the file KF_PIPELINES_SA_TOKEN_PATH names)")
    p.add_argument("--cookies", help="session cookies of a signed-in browser ('name=value; ...'; Dex, oauth2-proxy)")
    p.add_argument("--iap-client-id", help="OAuth client ID of an Identity-Aware Proxy in front of KFP (a Google ID "
                                           "token for the service account of GOOGLE_APPLICATION_CREDENTIALS)")


def _kfp_auth(args: argparse.Namespace) -> Any:
    from sfa_vivit.kubeflow.runner import KfpAuth
    return KfpAuth(token=args.token, cookies=args.cookies, iap_client_id=args.iap_client_id)


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    if not words or words[0] in ("-h", "--help", "--version"):
        light_parser().parse_args(words)         # prints the help or the version and exits, or says what is missing
    parser = build_parser()
    args = parser.parse_args(argv)
    log_file = configure_logging()
    try:
        if args.command == "smoke":
            print(f"sfa smoke: torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
            rows = smoke([v.strip() for v in args.variants.split(",") if v.strip()], num_frames=args.frames,
                         stage2_frames=args.stage2_frames, image_size=args.image_size, batch_size=args.batch_size)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(rows, f, indent=2)
            print("sfa smoke: ok", flush=True)
        elif args.command == "info":
            summary = model_summary(args.variant, num_frames=args.frames, image_size=args.image_size,
                                    num_classes=args.classes, adapter=args.adapter)
            summary["runtime"] = runtime_versions()
            print(json.dumps(summary, indent=2) if args.json else info_table(summary))
        elif args.command == "data":
            return _data(args)
        elif args.command == "train":
            if not args.print_config and not (args.data and args.out):
                raise ValueError("--data and --out are required to train (--print-config shows a config without them)")
            config = run_config(args.mode, args.recipe, data=args.data, init=args.init, config_file=args.config,
                                sets=args.set, say=lambda line: print(f"sfa train: {line}", file=sys.stderr))
            if args.print_config:
                print(json.dumps(config.to_dict(), indent=1))
                return 0
            metrics = train(config, args.data, args.out, init=args.init, force_init=args.force_init)
            final = metrics.get("final", {})
            top1 = final.get("top1")
            print(f"sfa train: {config.mode} done in {metrics['train_time_s']:.1f} s of training; final top-1 "
                  f"{f'{top1:.2f}%' if top1 is not None else 'n/a'} ({final.get('views')} views); "
                  f"{args.out}/metrics.json")
        elif args.command == "membench":
            from sfa_vivit.tools.membench import run as run_benchmark
            # The same keys as `sfa train --set model.width=...` (the bare field name is accepted too).
            sizes = {k.strip().removeprefix("model."): int(v) for k, _, v in (s.partition("=") for s in args.set)}
            result = run_benchmark(_options(args, BenchOptions), out=args.out, device=args.device, model=sizes)
            from sfa_vivit.tools.membench import markdown
            print(markdown(result) + f"sfa membench: {args.out} (+ .md, .png)")
        elif args.command == "pipeline":
            return _pipeline(args)
        elif args.command == "cluster":
            from sfa_vivit.kubeflow import doctor
            from sfa_vivit.kubeflow.runner import PipelineError
            try:
                if bool(args.host) == bool(args.vertex):
                    raise PipelineError("give exactly one of --host (a KFP endpoint) and --vertex PROJECT/REGION")
                if args.vertex:
                    rows = doctor.doctor_vertex(args.package, args.vertex, service_account=args.service_account,
                                                pipeline_root=args.pipeline_root, write_test=args.write_test)
                else:
                    rows = doctor.doctor(args.package, host=args.host, namespace=args.namespace,
                                         service_account=args.service_account or "sfa-vivit",
                                         params=_params(args.param, args.params_file), auth=_kfp_auth(args),
                                         kubeconfig=args.kubeconfig,
                                         context=args.context, operator=args.operator,
                                         pipeline_root=args.pipeline_root, write_test=args.write_test)
            except PipelineError as e:
                print(f"sfa cluster doctor: error: {one_line(e)}", file=sys.stderr)
                return 2
            print(doctor.table(rows))
            return 1 if any(r.status == "fail" for r in rows) else 0
        elif args.command == "scenic":
            from sfa_vivit.models.importers import export_scenic, import_scenic
            if args.scenic_command == "import":
                out = import_scenic(args.source, args.out, num_frames=args.frames, heads=_heads(args.heads))
                print(f"sfa scenic import: {args.source} -> {out} (evaluate it with `sfa evaluate --checkpoint {out} "
                      f"--data ...`, or start stage 2 from it with `sfa train --mode stage2 --init {out} ...`)")
            else:
                out = export_scenic(args.checkpoint, args.out, layout=args.layout)
                print(f"sfa scenic export: {args.checkpoint} -> {out}")
        elif args.command == "evaluate":
            metrics = evaluate(args.checkpoint, args.data, views=args.views, out=args.out, split=args.split,
                               batch_size=args.batch_size, workers=args.workers, device=args.device,
                               verify_data=args.verify_data)
            top1, top5 = metrics.get("top1"), metrics.get("top5")
            print("sfa evaluate: " + (f"top1 {top1:.2f}" if top1 is not None else "no labelled clip to score")
                  + (f", top5 {top5:.2f}" if top5 is not None else "")
                  + f" on {metrics['num_examples']} clips ({args.views} views)"
                  + (f"; {metrics['skipped_unlabelled']} unlabelled clips skipped" if metrics.get("skipped_unlabelled")
                     else ""))
    except Preempted as e:
        print(f"sfa train: {e}", file=sys.stderr)
        return e.exit_code
    except NonFiniteLoss as e:
        print(f"sfa train: error: {e}", file=sys.stderr)
        return 1
    except PrepError as e:
        print(f"sfa data prep: error: {one_line(e)}", file=sys.stderr)
        return 1
    except LeaseHeld as e:
        print(f"sfa {_command(args)}: error: {one_line(e)}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        print(f"sfa {_command(args)}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sfa {_command(args)}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:        # a full disk, a permission, a lost mount, an unreachable store: what failed, where
        print(f"sfa {_command(args)}: error: {one_line(e)}{_remote(args, e)}{_details(log_file)}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - the last resort: one line, the traceback on request
        if os.environ.get("SFA_TRACEBACK"):
            raise
        print(f"sfa {_command(args)}: error: {type(e).__name__}: {one_line(e)} (set SFA_TRACEBACK=1 for the "
              f"traceback){_details(log_file)}", file=sys.stderr)
        return 1
    finally:
        from sfa_vivit.core import runtime
        runtime.close()
    return 0


def _command(args: argparse.Namespace) -> str:
    sub = getattr(args, f"{args.command}_command", None)
    return f"{args.command} {sub}" if sub else args.command


class _OursOnTerminal(logging.Filter):
    """The terminal shows this package's lines (INFO and up) and other libraries' errors only as the log file's
    business: their retries, tracebacks and warnings (gcsfs, aiohttp, asyncio, MLflow, urllib3) go to the file."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.startswith("sfa_vivit") or record.name == "__main__"


class _LogFile(logging.FileHandler):
    """The log file never disturbs the run: a record it cannot write (a full disk, a write re-entered from a
    signal handler) is dropped there, silently; the terminal handler still shows ours."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass


def configure_logging() -> str | None:
    """Our log lines on stderr; every line, other libraries' included, in the log file `SFA_LOG_FILE` (default
    ~/.cache/sfa-vivit/sfa.log; `none`: no file, everything on stderr as before). Returns the file's path."""
    root = logging.getLogger()
    if getattr(root, "_sfa_configured", False):
        return getattr(root, "_sfa_log_file", None)
    if root.handlers:           # an embedding program (or pytest) has configured logging: leave it, as basicConfig
        return None
    root.setLevel(logging.INFO)
    terminal = logging.StreamHandler()
    terminal.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    path = os.environ.get("SFA_LOG_FILE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sfa-vivit", "sfa.log")
    handlers: list[logging.Handler] = [terminal]
    if path.lower() != "none":
        try:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            file = _LogFile(path, encoding="utf-8")
            file.setFormatter(logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"))
            handlers.append(file)
            terminal.addFilter(_OursOnTerminal())
            logging.captureWarnings(True)       # other libraries' warnings too: into the file
        except OSError:
            path = None
    else:
        path = None
    for handler in handlers:
        root.addHandler(handler)
    root._sfa_configured, root._sfa_log_file = True, path
    return path


def _remote(args: argparse.Namespace, e: OSError) -> str:
    """For an error of no local file (a refused connection, a DNS failure, a timeout): the remote URLs the
    command was given, and what to check."""
    if e.filename:
        return ""
    urls = [v for v in vars(args).values() if isinstance(v, str) and "://" in v and not v.startswith("file://")]
    urls += [u for v in vars(args).values() if isinstance(v, list) for u in v if isinstance(u, str) and "://" in u]
    if not urls:
        return ""
    return f", reaching {', '.join(dict.fromkeys(urls))}: check the network, the credentials and that the store exists"


def _details(log_file: str | None) -> str:
    return f" (other libraries' messages: {log_file})" if log_file else ""


def one_line(e: BaseException) -> str:
    """An exception as one line: an OSError as 'what: path', and an error re-raised from a DataLoader worker
    (whose message carries the worker's traceback) as the original error's own message."""
    if isinstance(e, OSError) and e.strerror:
        where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f)
        return f"{e.strerror}: {where}" if where else e.strerror
    text = str(e).strip() or type(e).__name__
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(text.split())


def _params(items: list[str], files: Sequence[str] = ()) -> dict[str, object]:
    """--params-file files (YAML or JSON maps, in order), then --param NAME=JSON items (later wins) → {name: value};
    a file or item that does not parse is named with what is wrong."""
    import yaml
    params: dict[str, object] = {}
    for path in files:
        try:
            with open(path) as f:
                loaded = yaml.safe_load(f)
        except OSError as e:
            raise ValueError(f"--params-file {path}: cannot read it ({e.strerror})") from None
        except yaml.YAMLError as e:
            raise ValueError(f"--params-file {path}: not YAML or JSON ({str(e).splitlines()[0]})") from None
        if not isinstance(loaded, dict) or not all(isinstance(k, str) for k in loaded):
            raise ValueError(f"--params-file {path}: expected a map of parameter name to value, e.g. "
                             f"'dataset: kinetics400', not a {type(loaded).__name__}")
        params.update(loaded)
    for item in items:
        name, eq, text = item.partition("=")
        if not eq or not name.strip():
            raise ValueError(f"--param {item!r} must look like NAME=JSON, e.g. epochs=2 or dataset='\"kinetics400\"'")
        try:
            params[name.strip()] = json.loads(text)
        except ValueError:
            raise ValueError(f"--param {name.strip()}={text!r}: the value is not JSON (a string needs quotes: "
                             f"{name.strip()}='\"{text}\"')") from None
    return params


def _pipeline(args: argparse.Namespace) -> int:
    from sfa_vivit.kubeflow import runner
    try:
        if args.pipeline_command == "compile":
            if args.name:
                out = args.out or f"{args.name}-{args.profile}.yaml"
                print(runner.compile_pipeline(args.name, args.profile, out, args.target, image=args.image,
                                              registry=args.registry, operator=args.operator,
                                              prep_parallelism=args.prep_parallelism, queue=args.queue,
                                              tag=args.tag))
            else:
                print("\n".join(runner.compile_all(args.root)))
        elif args.pipeline_command == "manifests":
            from sfa_vivit.kubeflow import manifests
            out = args.out or f"k8s-{args.project}"
            files = manifests.render(args.root, args.project, args.bucket, registry=args.registry,
                                     namespace=args.namespace, db_password=manifests.existing_password(out))
            print("\n".join(manifests.write(files, out)))
            print("then bind the accounts to the Google service account (once):\n  "
                  + "\n  ".join(manifests.bindings(args.project, args.namespace)))
        elif args.pipeline_command == "run":
            s = runner.run_local(args.runs, args.run_id, args.size, run_baseline=not args.no_baseline)
            figures = s.get("figures", {})
            print(f"sfa pipeline run: {s['run_id']} finished in {s['pipeline_seconds']:.0f} s")
            if figures:
                line = (f"  SFA: top-1 {figures.get('sfa_top1', float('nan')):.1f}% in "
                        f"{figures['sfa_train_time_s']:.0f} s")
                if "baseline_top1" in figures:
                    line += (f"; baseline: top-1 {figures['baseline_top1']:.1f}% in "
                             f"{figures['baseline_train_time_s']:.0f} s (SFA/baseline time "
                             f"{figures['time_ratio_sfa_over_baseline']:.2f})")
                print(line)
                from sfa_vivit.kubeflow.report import how_far, main_job_spread
                caveat = how_far(s.get("validation_clips"), figures.get("sfa_top1"))
                if args.size == "default":      # the main job: what it did over seeds and thread counts
                    spread = main_job_spread(figures.get("sfa_top1"), figures.get("baseline_top1"))
                    caveat = f"{caveat} {spread}".strip()
                if caveat:
                    print(textwrap.fill(caveat, width=110, initial_indent="  ", subsequent_indent="  "))
            print(f"  report:  {s['report']}\n  open it: python -m webbrowser file://{s['report']}\n"
                  f"  MLflow:  {sys.executable.rsplit('/', 1)[0]}/mlflow ui --backend-store-uri {s['tracking_uri']}"
                  f"  (then http://127.0.0.1:5000)\n  summary: {s['root']}/summary.json")
        elif args.pipeline_command == "submit":
            params = _params(args.param, args.params_file)
            ref = runner.submit(args.package, host=args.host, vertex=args.vertex, pipeline_root=args.pipeline_root,
                                params=params, experiment=args.experiment, service_account=args.service_account,
                                namespace=args.namespace, image=args.image, network=args.network,
                                auth=_kfp_auth(args))
            print(f"sfa pipeline submit: {ref}")
        elif args.pipeline_command == "schedule":
            try:
                with open(args.datasets) as f:
                    datasets = json.load(f)
            except ValueError as e:
                raise ValueError(f"--datasets {args.datasets} is not valid JSON ({e})") from None
            ids = runner.schedule(args.package, host=args.host, datasets=datasets, cron=args.cron,
                                  pipeline_root=args.pipeline_root, service_account=args.service_account,
                                  namespace=args.namespace, stagger_minutes=args.stagger_minutes,
                                  auth=_kfp_auth(args))
            print(f"sfa pipeline schedule: {len(ids)} recurring runs: {', '.join(ids)}")
    except runner.PipelineError as e:
        print(f"sfa pipeline {args.pipeline_command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except ValueError as e:
        from sfa_vivit.kubeflow.manifests import ManifestError
        if not isinstance(e, ManifestError):
            raise
        print(f"sfa pipeline {args.pipeline_command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0


def _add_options(parser: argparse.ArgumentParser, options: type) -> None:
    """One --flag per field of the options dataclass (sfa_vivit.core.options): its type, default, allowed values
    and help as the field declares them; a true/false option is a switch."""
    for o in option_fields(options):
        if o.type is bool:
            parser.add_argument(o.flag, action="store_true", default=o.default, help=o.help)
        else:
            parser.add_argument(o.flag, type=o.type, default=o.default, choices=o.choices, help=o.help)


def _options(args: argparse.Namespace, options: type) -> Any:
    """The options dataclass from the flags `_add_options` declared."""
    return options(**{o.name: getattr(args, o.name) for o in option_fields(options)})


def _data(args: argparse.Namespace) -> int:
    if args.data_command == "prep":
        options = _options(args, PrepOptions)
        # What the shards are checked against when written: a bad --recipe or --set fails now, before any work.
        fit_recipe = args.recipe or (args.dataset if args.dataset in RECIPES else None)
        if fit_recipe:
            run_config("baseline", fit_recipe, sets=args.set)
        elif args.set:
            raise ValueError(f"--set needs --recipe: dataset {args.dataset!r} has no recipe of its own")
        manifest = prepare(args.dataset, args.annotations, args.videos, args.out, split=args.split, options=options)
        counts = ", ".join(f"{s} {v['num_samples']}" for s, v in manifest["splits"].items())
        print(f"sfa data prep: {args.out}: {counts} samples, {len(manifest['rejected'])} rejected")
        for warning in recipe_mismatches(manifest, args.recipe, args.set):
            print(f"sfa data prep: warning: {warning}", file=sys.stderr)
    elif args.data_command == "synth":
        paths = generate(args.out, _options(args, SynthOptions))
        print(f"sfa data synth: {paths['videos']} + {paths['train']}, {paths['validation']}")
    elif args.data_command == "synth-vit":
        report = pretrain_image_vit(args.out, _options(args, ImageViTOptions),
                                    recipe=args.recipe, sets=args.set)
        print(f"sfa data synth-vit: {args.out}: held-out accuracy {report['val_accuracy']}% "
              f"(chance {report['chance_accuracy']}%), {report['time_s']} s")
    elif args.data_command == "verify":
        manifest = load_manifest(args.url)
        bad = verify_shards(manifest)
        total = sum(len(s["shards"]) for s in manifest.data["splits"].values())
        if bad:
            print(f"sfa data verify: {len(bad)} of {total} shards corrupt: {', '.join(bad)}", file=sys.stderr)
            return 1
        print(f"sfa data verify: all {total} shards match their sha256")
    return 0


if __name__ == "__main__":
    sys.exit(main())
