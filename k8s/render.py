"""Render the KubeRay manifests from one values file.

    python k8s/render.py scft | kubectl create -f -
    python k8s/render.py refresh | kubectl apply -f -
    python k8s/render.py [--values k8s/values.yaml] {prepare|scft|rat|refresh|refresh-raycronjob|serve|all}

The Ray clusters (import, SCFT, RAT, the scheduled refresh and its RayCronJob twin, the
top-k RayService) share one pod shape, so they are built here from one function instead
of copies of the same YAML that would drift apart.
"""
from __future__ import annotations

import argparse
import dataclasses
import posixpath
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import yaml

from llmemb_dist.config import ConfigError, bounded, load_typed, name

HERE = Path(__file__).resolve().parent
GPU = "nvidia.com/gpu"
RAY_UID, RAY_GID = 1000, 100  # user `ray` and group `users` of the rayproject/ray images
IMAGE_REPO = "/home/ray/llmemb-dist"  # where the Dockerfile puts the repo (launch scripts, configs)
# The Ray Serve application of the RayService: llmemb_dist/stages/index/serving.py's name, builder and
# deployment (the class's name), on the port KubeRay's serve Service forwards by default.
SERVE_APP, SERVE_BUILDER = "llmemb-topk", "llmemb_dist.stages.index.serving:app"
SERVE_DEPLOYMENT, SERVE_PORT = "TopK", 8000
# Placeholders of the refresh RayJob template that the CronJob pod fills at run time: the new version,
# the embeddings version it re-embeds from, and the adapted version it adapts from (empty: every item).
VERSION_SLOT, PREVIOUS_SLOT, ADAPT_FROM_SLOT = "@VERSION@", "@INCREMENTAL_FROM@", "@ADAPT_FROM@"
STAGE_LABEL, VERSION_LABEL = "llmemb-stage", "llmemb-refresh-version"
LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")

# The CronJob pod: skip while a refresh RayJob is still running (concurrencyPolicy only
# covers the CronJob's own short Job, not the RayJob it created), then refresh incrementally
# from the newest refresh that succeeded: it published both an embeddings and an adapted
# version of that name. Before the first success, re-embed from the baseline embeddings
# version and adapt every item.
SUBMIT_SCRIPT = f"""\
set -eu
active=$(kubectl get rayjobs -l {STAGE_LABEL}=refresh \\
  -o jsonpath='{{range .items[*]}}{{.metadata.name}}={{.status.jobDeploymentStatus}}{{"\\n"}}{{end}}' \\
  | grep -v -e '=Complete$' -e '=Failed$' -e '=ValidationFailed$' | grep -c . || true)
if [ "$active" -gt 0 ]; then
  echo "a refresh RayJob is still running; skipping this run"
  exit 0
fi
previous=$(kubectl get rayjobs -l {STAGE_LABEL}=refresh --sort-by=.metadata.creationTimestamp \\
  -o jsonpath='{{range .items[?(@.status.jobStatus=="SUCCEEDED")]}}{{.metadata.labels.{VERSION_LABEL}}}{{"\\n"}}{{end}}' \\
  | tail -n 1)
adapt_from=$previous
previous=${{previous:-$BASELINE_VERSION}}
version=$(date -u +%Y%m%d-%H%M)
echo "refresh $version: embeddings incrementally from '$previous', adapted from '$adapt_from'"
sed -e "s/{VERSION_SLOT}/$version/g" -e "s/{PREVIOUS_SLOT}/$previous/g" -e "s/{ADAPT_FROM_SLOT}/$adapt_from/g" \\
  /template/rayjob.yaml | kubectl create -f -
"""


@dataclass
class Pods:
    """Ray worker pods of a stage: `workers` pods of `gpus_per_worker` GPUs, `cpu` and `memory` each."""

    workers: int = bounded(1, low=0)
    gpus_per_worker: int = bounded(0, low=0)
    cpu: Union[int, str] = 8
    memory: str = "32Gi"


@dataclass
class Head:
    cpu: Union[int, str] = 8
    memory: str = "64Gi"


@dataclass
class RatPods(Pods):
    embeddings: str = ""  # the embeddings version RAT reads; empty: the config's rat.embeddings


@dataclass
class RefreshPods(Pods):
    source: str = ""  # where the day's catalog lands, in the config's dataset.format
    dataset_prefix: str = "catalog"  # each run imports it as dataset.name=<dataset_prefix>-<version>
    schedule: str = "0 3 * * *"
    time_zone: str = "Etc/UTC"
    baseline_version: str = ""  # the embeddings version the first run re-embeds from; empty: all items


@dataclass
class ServePods(Pods):
    index_version: str = name("live")  # the index version every refresh republishes and the endpoint serves
    replicas: int = bounded(2, low=1)  # Ray Serve replicas of the top-k deployment, each with the whole index
    cpus_per_replica: float = bounded(2.0, low=0.0, low_open=True)


@dataclass
class Values:
    namespace: str
    image: str
    ray_version: str
    kubectl_image: str
    bucket: str
    prefix: str
    config: str
    s3_secret: str
    aws_region: str
    mlflow_uri: str
    shm_size: str
    head: Head
    prepare: Pods
    scft: Pods
    rat: RatPods
    refresh: RefreshPods
    serve: ServePods


def load_values(path: Path = HERE / "values.yaml", overrides: list[str] = ()) -> dict[str, Any]:
    """The values file with `key=value` overrides, checked like the run config: an unknown key, a wrong
    type or a value out of range is refused by name."""
    values = dataclasses.asdict(load_typed(Values, path, overrides))
    if not LABEL_VALUE.match(values["refresh"]["baseline_version"]):
        raise ConfigError(f"{path}: refresh.baseline_version must be a valid label value (letters, digits, - _ .)")
    return values


def entrypoint(v: dict[str, Any], stage: str, *overrides: str) -> str:
    root = f"s3://{v['bucket']}/{v['prefix']}"
    return " ".join([f"python launch/{stage}.py", v["config"], f"root={root}", *overrides])


def _env(v: dict[str, Any]) -> list[dict[str, Any]]:
    def secret(name: str, optional: bool = False) -> dict[str, Any]:
        ref = {"name": v["s3_secret"], "key": name} | ({"optional": True} if optional else {})
        return {"name": name, "valueFrom": {"secretKeyRef": ref}}

    return [
        secret("AWS_ACCESS_KEY_ID"),
        secret("AWS_SECRET_ACCESS_KEY"),
        secret("AWS_ENDPOINT_URL_S3", optional=True),  # set it in the Secret for MinIO and other S3-compatible stores
        secret("LLMEMB_CHECKPOINT_KEY", optional=True),  # signs SCFT checkpoint digests (docs/operations.md, Security)
        {"name": "AWS_REGION", "value": v["aws_region"]},
    ] + ([{"name": "MLFLOW_TRACKING_URI", "value": v["mlflow_uri"]}] if v["mlflow_uri"] else [])


def _non_root(uid: int, gid: int) -> dict[str, Any]:
    return {"runAsNonRoot": True, "runAsUser": uid, "runAsGroup": gid, "fsGroup": gid,
            "seccompProfile": {"type": "RuntimeDefault"}}


CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def _pod(v: dict[str, Any], container: str, cpu: Any, memory: str, gpus: int) -> dict[str, Any]:
    amounts = {"cpu": str(cpu), "memory": memory} | ({GPU: str(gpus)} if gpus else {})
    spec: dict[str, Any] = {
        "securityContext": _non_root(RAY_UID, RAY_GID),
        "containers": [{
            "name": container,
            "image": v["image"],
            "env": _env(v),
            # Requests equal limits: GPUs cannot be overcommitted, and a training pod evicted for memory loses the run.
            "resources": {"requests": amounts, "limits": dict(amounts)},
            "securityContext": CONTAINER_SECURITY,
            # The container runtime's default /dev/shm is 64 MiB; NCCL and Ray's object store need far more.
            "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
        }],
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": v["shm_size"]}}],
    }
    if gpus:
        spec["tolerations"] = [{"key": GPU, "operator": "Exists", "effect": "NoSchedule"}]
    return {"spec": spec}


def cluster_spec(v: dict[str, Any], stage: dict[str, Any]) -> dict[str, Any]:
    return {
        "rayVersion": v["ray_version"],
        # Ray 2.60 requires a token by default; KubeRay then creates it and hands it to the submitter.
        "authOptions": {"mode": "token"},
        "headGroupSpec": {
            # No tasks on the head: the worker pods do the work, the head only runs the driver.
            "rayStartParams": {"num-cpus": "0"},
            "template": _pod(v, "ray-head", v["head"]["cpu"], v["head"]["memory"], 0),
        },
        "workerGroupSpecs": [{
            "groupName": "workers",
            "replicas": stage["workers"],
            "minReplicas": stage["workers"],
            "maxReplicas": stage["workers"],
            "rayStartParams": {},
            "template": _pod(v, "ray-worker", stage["cpu"], stage["memory"], stage["gpus_per_worker"]),
        }],
    }


def rayjob_spec(v: dict[str, Any], stage: dict[str, Any], command: str, deadline_hours: int,
                retries: int) -> dict[str, Any]:
    return {
        "entrypoint": command,
        # The image holds the repo; its path as working_dir makes `launch/...` resolve on the head and workers.
        "runtimeEnvYAML": f"working_dir: {IMAGE_REPO}\n",
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": 600,  # keep the finished cluster 10 minutes for logs, then free the GPUs
        "activeDeadlineSeconds": deadline_hours * 3600,
        "backoffLimit": retries,  # each retry gets a fresh RayCluster
        "submissionMode": "K8sJobMode",  # a submitter Job whose logs outlive the cluster
        "submitterConfig": {"backoffLimit": 2},
        # Stated rather than defaulted so that the submitter, too, runs non-root; KubeRay supplies its command.
        "submitterPodTemplate": {"spec": {
            "restartPolicy": "Never",
            "securityContext": _non_root(RAY_UID, RAY_GID),
            "containers": [{
                "name": "ray-job-submitter",
                "image": v["image"],
                "resources": {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}},
                "securityContext": CONTAINER_SECURITY,
            }],
        }},
        "rayClusterSpec": cluster_spec(v, stage),
    }


def _total_gpus(stage: dict[str, Any]) -> int:
    return stage["workers"] * stage["gpus_per_worker"]


def _meta(v: dict[str, Any], name: str, stage: str, generate: bool = False) -> dict[str, Any]:
    return {
        ("generateName" if generate else "name"): name,
        "namespace": v["namespace"],
        "labels": {"app.kubernetes.io/name": "llmemb-dist", STAGE_LABEL: stage},
    }


def scft(v: dict[str, Any]) -> list[dict[str, Any]]:
    command = entrypoint(v, "scft", "scft.use_gpu=true", f"scft.num_workers={_total_gpus(v['scft'])}")
    # Retries resume: the run name in the config is fixed, so Ray Train finds its checkpoints on S3.
    spec = rayjob_spec(v, v["scft"], command, deadline_hours=48, retries=2)
    return [{"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": _meta(v, "llmemb-scft", "scft"), "spec": spec}]


def rat(v: dict[str, Any]) -> list[dict[str, Any]]:
    r = v["rat"]
    chosen = [f"rat.embeddings={r['embeddings']}"] if r["embeddings"] else []
    command = entrypoint(v, "rat", f"rat.num_workers={r['workers'] * max(r['gpus_per_worker'], 1)}", *chosen)
    spec = rayjob_spec(v, r, command, deadline_hours=24, retries=1)
    return [{"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": _meta(v, "llmemb-rat", "rat"), "spec": spec}]


def prepare(v: dict[str, Any]) -> list[dict[str, Any]]:
    """The import of the dataset the config names (dataset.source), the one SCFT and RAT train on."""
    spec = rayjob_spec(v, v["prepare"], entrypoint(v, "prepare"), deadline_hours=6, retries=1)
    return [{"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": _meta(v, "llmemb-prepare", "prepare"), "spec": spec}]


def refresh_command(v: dict[str, Any], version: str, previous: str, adapt_from: str) -> str:
    """The daily chain as one entrypoint: import the day's catalog, re-embed it incrementally from
    `previous`, adapt it incrementally from `adapt_from`, index the adapted version as the one version
    the RayService serves (replaced, so that its replicas reload it; an IVF index updated from the one
    served). Each step publishes or skips what is already published, so a retried RayJob picks up where
    the failed one stopped."""
    r = v["refresh"]
    dataset = f"dataset.name={r['dataset_prefix']}-{version}"
    # One embedding actor per GPU; a cluster without GPUs (a small catalog) keeps the config's CPU actors.
    actors = [f"embed.num_actors={_total_gpus(r)}", "embed.gpus_per_actor=1"] if _total_gpus(r) else []
    return " && ".join([
        entrypoint(v, "prepare", dataset, f"dataset.source={r['source']}"),
        entrypoint(v, "embed", dataset, f"embed.version={version}", f"embed.incremental_from={previous}", *actors),
        entrypoint(v, "adapt", f"adapt.embeddings={version}", f"adapt.version={version}",
                   f"adapt.incremental_from={adapt_from}"),
        entrypoint(v, "index", f"index.adapted={version}", f"index.version={v['serve']['index_version']}",
                   "index.replace=true", f"index.incremental_from={v['serve']['index_version']}"),
    ])


def refresh_rayjob_template(v: dict[str, Any]) -> dict[str, Any]:
    """The RayJob each scheduled run creates; the CronJob pod fills the three version slots."""
    meta = _meta(v, "llmemb-refresh-", "refresh", generate=True)
    meta["labels"][VERSION_LABEL] = VERSION_SLOT
    command = refresh_command(v, VERSION_SLOT, PREVIOUS_SLOT, ADAPT_FROM_SLOT)
    return {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": meta,
            "spec": rayjob_spec(v, v["refresh"], command, deadline_hours=6, retries=1)}


def refresh(v: dict[str, Any]) -> list[dict[str, Any]]:
    name, ns = "llmemb-refresh-scheduler", v["namespace"]
    account = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(v, name, "refresh-scheduler")}
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": _meta(v, name, "refresh-scheduler"),
        "rules": [{"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get", "list", "watch"]}],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": _meta(v, name, "refresh-scheduler"),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ns}],
    }
    template = {
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(v, "llmemb-refresh-rayjob", "refresh-scheduler"),
        "data": {"rayjob.yaml": dump([refresh_rayjob_template(v)]), "submit.sh": SUBMIT_SCRIPT},
    }
    pod = {
        "serviceAccountName": name,
        "restartPolicy": "Never",
        "securityContext": _non_root(65532, 65532),
        "containers": [{
            "name": "submit",
            "image": v["kubectl_image"],
            "command": ["/bin/sh", "/template/submit.sh"],
            "env": [{"name": "BASELINE_VERSION", "value": v["refresh"]["baseline_version"]},
                    {"name": "HOME", "value": "/tmp"}],  # kubectl writes its discovery cache under $HOME
            "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"cpu": "500m", "memory": "256Mi"}},
            "securityContext": CONTAINER_SECURITY,
            "volumeMounts": [{"name": "template", "mountPath": "/template", "readOnly": True}],
        }],
        "volumes": [{"name": "template", "configMap": {"name": "llmemb-refresh-rayjob"}}],
    }
    cron = {
        "apiVersion": "batch/v1", "kind": "CronJob", "metadata": _meta(v, "llmemb-refresh", "refresh-scheduler"),
        "spec": {
            "schedule": v["refresh"]["schedule"],
            "timeZone": v["refresh"]["time_zone"],
            "concurrencyPolicy": "Forbid",
            "startingDeadlineSeconds": 3600,
            "successfulJobsHistoryLimit": 3,
            "failedJobsHistoryLimit": 3,
            "jobTemplate": {"spec": {"backoffLimit": 2, "template": {"spec": pod}}},
        },
    }
    return [account, role, binding, template, cron]


def refresh_raycronjob(v: dict[str, Any]) -> list[dict[str, Any]]:
    """The same schedule for clusters that enable KubeRay's alpha `RayCronJob` feature gate.

    Its template is static, so it cannot look up the previous run: every run re-embeds
    incrementally from the baseline version (the whole catalog when that is empty) and adapts
    every item, and takes its version name from the date in the shell that runs the entrypoint.
    """
    r = v["refresh"]
    command = "version=cron-$(date -u +%Y%m%d-%H%M) && " + refresh_command(v, "$version", r["baseline_version"], "")
    return [{
        "apiVersion": "ray.io/v1", "kind": "RayCronJob", "metadata": _meta(v, "llmemb-refresh", "refresh-scheduler"),
        "spec": {
            "schedule": r["schedule"],
            "timeZone": r["time_zone"],
            "jobTemplate": rayjob_spec(v, r, command, deadline_hours=6, retries=1),
        },
    }]


def serve(v: dict[str, Any]) -> list[dict[str, Any]]:
    """The top-k endpoint: a RayService running the Ray Serve app over the index version each refresh
    republishes. A new index version is picked up by the replicas themselves (they watch its manifest);
    KubeRay's own blue-green upgrade (a new cluster, traffic moved once it is ready) is for a new image
    or pod spec."""
    s = v["serve"]
    serve_config = {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": SERVE_PORT},
        "applications": [{
            "name": SERVE_APP,
            "route_prefix": "/",
            "import_path": SERVE_BUILDER,
            # The config by its path in the image: Serve takes no local working_dir to resolve a relative one.
            "args": {"config": posixpath.join(IMAGE_REPO, v["config"]),
                     "overrides": [f"root=s3://{v['bucket']}/{v['prefix']}", f"index.version={s['index_version']}"]},
            "deployments": [{"name": SERVE_DEPLOYMENT, "num_replicas": s["replicas"],
                             "ray_actor_options": {"num_cpus": s["cpus_per_replica"]}}],
        }],
    }
    spec = {"serveConfigV2": yaml.safe_dump(serve_config, sort_keys=False, width=4096),
            "rayClusterConfig": cluster_spec(v, s)}
    return [{"apiVersion": "ray.io/v1", "kind": "RayService", "metadata": _meta(v, "llmemb-serve", "serve"),
             "spec": spec}]


TARGETS = {"prepare": prepare, "scft": scft, "rat": rat, "refresh": refresh, "refresh-raycronjob": refresh_raycronjob,
           "serve": serve}


def render(target: str, values: dict[str, Any]) -> list[dict[str, Any]]:
    if target == "all":
        return [doc for build in TARGETS.values() for doc in build(values)]
    return TARGETS[target](values)


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:  # shared sub-dicts must print in full, not as &id001 anchors
        return True


def _text(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    style = "|" if "\n" in text else None  # scripts and templates print as the blocks they are
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_Dumper.add_representer(str, _text)


def dump(docs: list[dict[str, Any]]) -> str:
    # Wide lines: an entrypoint stays on one line, as `kubectl get -o yaml` would print it.
    return yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, width=4096)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Render the llmemb-dist KubeRay manifests to stdout.")
    parser.add_argument("target", choices=[*TARGETS, "all"])
    parser.add_argument("--values", type=Path, default=HERE / "values.yaml")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override values, e.g. scft.workers=4")
    args = parser.parse_args(argv)
    try:
        values = load_values(args.values, args.set)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(dump(render(args.target, values)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
