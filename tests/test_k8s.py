"""Offline checks of the KubeRay manifests that k8s/render.py makes from k8s/values.yaml.

KubeRay objects validate against the CRD schemas vendored in k8s/schemas in strict mode
(unknown fields rejected, see that folder's README); native kinds with kubernetes-validate; the
RayService's Serve config with Ray Serve's own schema.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import re
import shlex
import subprocess
import sys
from functools import cache
from typing import Any, Iterator

import jsonschema
import kubernetes_validate
import pytest
import yaml

from conftest import REPO
from llmemb_dist import layout
from llmemb_dist.config import ConfigError, load_config
from llmemb_dist.stages.index import serving

SCHEMAS = REPO / "k8s" / "schemas"
KUBERAY_SCHEMAS = {"RayJob": "rayjob.ray.io_v1.json", "RayCronJob": "raycronjob.ray.io_v1.json",
                   "RayService": "rayservice.ray.io_v1.json"}
KUBERNETES_VERSION = "1.30"  # the oldest release these manifests support (CronJob timeZone is GA since 1.27)

_spec = importlib.util.spec_from_file_location("k8s_render", REPO / "k8s" / "render.py")
render = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = render  # its dataclasses resolve their annotations through sys.modules
_spec.loader.exec_module(render)

VALUES = render.load_values()
DOCS = render.render("all", VALUES)


def strict(schema: Any) -> Any:
    """The schema with `additionalProperties: false` on every object schema that lists its properties."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "properties":  # a map of field name -> schema, not a schema itself
            out[key] = {name: strict(sub) for name, sub in value.items()}
        else:
            out[key] = strict(value)
    if "properties" in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("additionalProperties", False)
    return out


@cache
def kuberay_validator(kind: str) -> jsonschema.Validator:
    schema = strict(json.loads((SCHEMAS / KUBERAY_SCHEMAS[kind]).read_text()))
    return jsonschema.Draft202012Validator(schema)


def refresh_template(docs: list[dict[str, Any]], version: str, previous: str, adapt_from: str) -> dict[str, Any]:
    """The RayJob the CronJob pod creates, filled as its script fills it (sed on the three slots)."""
    (configmap,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "llmemb-refresh-rayjob"]
    text = configmap["data"]["rayjob.yaml"]
    for slot, value in ((render.VERSION_SLOT, version), (render.PREVIOUS_SLOT, previous), (render.ADAPT_FROM_SLOT, adapt_from)):
        text = text.replace(slot, value)
    return yaml.safe_load(text)


def commands(entrypoint: str) -> list[list[str]]:
    """The argv of each command of an entrypoint, as its shell would run them: `a && b`, a `version=...`
    assignment and `$(date ...)` stand in values of the same shape."""
    variables = {}
    out = []
    for part in re.sub(r"\$\([^)]*\)", "20260101-0300", entrypoint).split(" && "):
        assignment = re.fullmatch(r"(\w+)=(\S*)", part)
        if assignment:
            variables[assignment[1]] = assignment[2]
            continue
        out.append(shlex.split(re.sub(r"\$(\w+)", lambda m: variables[m[1]], part)))
    return out


def rayjob_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every RayJob spec the manifests start: the RayJobs, the CronJob's template, the RayCronJob's."""
    for doc in docs:
        if doc["kind"] == "RayJob":
            yield doc["metadata"]["name"], doc["spec"]
        elif doc["kind"] == "RayCronJob":
            yield "raycronjob", doc["spec"]["jobTemplate"]
    yield "cronjob-template", refresh_template(docs, "20260101-0300", "20251231-0300", "20251231-0300")["spec"]


def ray_clusters(docs: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every Ray cluster spec the manifests start: each RayJob's, and the RayService's."""
    yield from (spec["rayClusterSpec"] for _, spec in rayjob_specs(docs))
    yield from (doc["spec"]["rayClusterConfig"] for doc in docs if doc["kind"] == "RayService")


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for cluster in ray_clusters(docs):
        yield cluster["headGroupSpec"]["template"]["spec"]
        yield from (group["template"]["spec"] for group in cluster["workerGroupSpecs"])
    for _, spec in rayjob_specs(docs):
        yield spec["submitterPodTemplate"]["spec"]
    for doc in docs:
        if doc["kind"] == "CronJob":
            yield doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def test_strict_schema_rejects_a_misspelt_field():
    (scft,) = render.scft(VALUES)
    broken = copy.deepcopy(scft)
    broken["spec"]["shutdownAfterJobFinish"] = True
    assert list(kuberay_validator("RayJob").iter_errors(broken))


@pytest.mark.parametrize("doc", [d for d in DOCS if d["kind"] in KUBERAY_SCHEMAS], ids=lambda d: d["kind"])
def test_kuberay_objects_validate_strictly(doc):
    kuberay_validator(doc["kind"]).validate(doc)


def test_cronjob_rayjob_template_renders_to_a_valid_rayjob_that_imports_embeds_adapts_and_indexes():
    job = refresh_template(DOCS, "20260101-0300", "v1", "")
    kuberay_validator("RayJob").validate(job)
    assert job["metadata"]["generateName"] == "llmemb-refresh-"
    assert job["metadata"]["labels"][render.VERSION_LABEL] == "20260101-0300"
    steps = commands(job["spec"]["entrypoint"])
    assert [argv[1] for argv in steps] == ["launch/prepare.py", "launch/embed.py", "launch/adapt.py", "launch/index.py"]
    prepared, embedded, adapted, indexed = (load_config(REPO / argv[2], argv[3:]) for argv in steps)
    day = f"{VALUES['refresh']['dataset_prefix']}-20260101-0300"
    assert prepared.dataset.name == embedded.dataset.name == day  # embed reads what the import published
    assert prepared.dataset.source == VALUES["refresh"]["source"]
    assert (embedded.embed.version, embedded.embed.incremental_from) == ("20260101-0300", "v1")
    assert (adapted.adapt.embeddings, adapted.adapt.version, adapted.adapt.incremental_from) == ("20260101-0300",) * 2 + ("",)
    # The day's adapted version, indexed over the one version the RayService serves, which it replaces
    # (updating it in place where it is an IVF index).
    assert layout.index_input_adapted_uri(indexed) == layout.adapted_uri(adapted)
    assert indexed.index.version == indexed.index.incremental_from == VALUES["serve"]["index_version"]
    assert indexed.index.replace


@pytest.mark.parametrize("doc", [d for d in DOCS if d["kind"] not in KUBERAY_SCHEMAS],
                         ids=lambda d: d["kind"])
def test_native_objects_validate_strictly(doc):
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_scheduler_runs_one_at_a_time_with_just_the_rights_it_needs():
    by_kind = {d["kind"]: d for d in DOCS if d["metadata"]["labels"]["llmemb-stage"] == "refresh-scheduler"}
    assert by_kind["CronJob"]["spec"]["concurrencyPolicy"] == "Forbid"
    assert by_kind["CronJob"]["spec"]["schedule"] == by_kind["RayCronJob"]["spec"]["schedule"]
    (rule,) = by_kind["Role"]["rules"]
    assert rule == {"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get", "list", "watch"]}
    pod = by_kind["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == by_kind["ServiceAccount"]["metadata"]["name"]
    assert by_kind["RoleBinding"]["subjects"][0]["name"] == by_kind["ServiceAccount"]["metadata"]["name"]


@pytest.mark.parametrize("name,spec", list(rayjob_specs(DOCS)), ids=[n for n, _ in rayjob_specs(DOCS)])
def test_entrypoints_name_a_launch_script_and_a_config_that_loads(name, spec):
    for argv in commands(spec["entrypoint"]):
        assert argv[0] == "python"
        script, config, overrides = argv[1], argv[2], argv[3:]
        assert re.fullmatch(r"launch/\w+\.py", script) and (REPO / script).is_file(), f"{name}: no {script}"
        assert (REPO / config).is_file(), f"{name}: no {config}"
        cfg = load_config(REPO / config, overrides)
        assert cfg.root == f"s3://{VALUES['bucket']}/{VALUES['prefix']}"
        stage = script.removeprefix("launch/").removesuffix(".py")
        if stage == "rat":
            assert cfg.rat.num_workers == VALUES["rat"]["workers"] * max(VALUES["rat"]["gpus_per_worker"], 1)
        if stage == "scft":
            assert cfg.scft.zero_stage == 3 and cfg.scft.use_gpu
            assert cfg.scft.num_workers == VALUES["scft"]["workers"] * VALUES["scft"]["gpus_per_worker"]
        if stage == "embed":
            previous = "20251231-0300" if name == "cronjob-template" else VALUES["refresh"]["baseline_version"]
            assert cfg.embed.incremental_from == previous
            assert cfg.embed.num_actors == VALUES["refresh"]["workers"] * VALUES["refresh"]["gpus_per_worker"]
        if stage == "adapt":
            assert cfg.adapt.incremental_from == ("20251231-0300" if name == "cronjob-template" else "")
        if stage == "index":
            assert cfg.index.version == VALUES["serve"]["index_version"] and cfg.index.replace


def test_gpu_pods_request_what_they_limit_run_non_root_and_have_shared_memory():
    for pod in pod_specs(DOCS):
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
        for container in pod["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            resources = container["resources"]
            if render.GPU in resources["limits"]:
                assert resources["requests"] == resources["limits"]
                shm = {m["name"] for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"}
                assert [v for v in pod["volumes"] if v["name"] in shm][0]["emptyDir"]["medium"] == "Memory"
    (scft,) = render.scft(VALUES)
    scft_workers = scft["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert scft_workers["replicas"] == VALUES["scft"]["workers"]
    assert scft_workers["template"]["spec"]["containers"][0]["resources"]["limits"][render.GPU] == str(
        VALUES["scft"]["gpus_per_worker"])


CREDENTIAL_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", re.I)
AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
AWS_SECRET = re.compile(r"(?<![A-Za-z0-9/+])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])")


def test_no_manifest_holds_a_literal_credential():
    texts = {path.name: path.read_text() for path in [*(REPO / "k8s").iterdir(), REPO / "Dockerfile"] if path.is_file()}
    texts["rendered"] = render.dump(DOCS)
    for name, text in texts.items():
        assert not AWS_KEY_ID.search(text), f"{name} holds an AWS access key id"
        assert not AWS_SECRET.search(text), f"{name} holds what looks like an AWS secret key"
    assert not any(d["kind"] == "Secret" for d in DOCS), "credentials come from a Secret made outside the manifests"
    env = [e for pod in pod_specs(DOCS) for c in pod["containers"] for e in c.get("env", [])]
    for var in env:
        if CREDENTIAL_NAME.search(var["name"]):
            assert "value" not in var and "secretKeyRef" in var["valueFrom"], var["name"]


def test_values_flow_into_every_manifest():
    values = copy.deepcopy(VALUES) | {"bucket": "other-bucket", "image": "example.org/llmemb:2"}
    values["scft"] = values["scft"] | {"workers": 3, "gpus_per_worker": 4}
    (job,) = render.scft(values)
    assert "root=s3://other-bucket/" in job["spec"]["entrypoint"] and "scft.num_workers=12" in job["spec"]["entrypoint"]
    assert job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] == 3
    images = {c["image"] for pod in pod_specs(render.render("all", values)) for c in pod["containers"]}
    assert images == {"example.org/llmemb:2", VALUES["kubectl_image"]}


def test_an_mlflow_server_reaches_every_ray_pod_and_none_is_named_by_default():
    def tracking_uris(values):
        """Per Ray pod (head and workers: the driver and Ray Train's controller log there), the URIs it is given."""
        out = []
        for cluster in ray_clusters(render.render("all", values)):
            pods = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
            out += [{e["value"] for e in c.get("env", []) if e["name"] == "MLFLOW_TRACKING_URI"}
                    for pod in pods for c in pod["template"]["spec"]["containers"]]
        return out

    assert all(found == set() for found in tracking_uris(VALUES))
    served = tracking_uris(copy.deepcopy(VALUES) | {"mlflow_uri": "http://mlflow.llmemb:5000"})
    assert served and all(found == {"http://mlflow.llmemb:5000"} for found in served)


def test_rayservice_serves_the_index_every_refresh_republishes():
    """The Serve config is what Ray accepts (its own schema, and no key it does not know), and its app
    builder, called by Ray as a RayService's cluster calls it, serves the index version the refresh
    chain publishes under the same root."""
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema

    (service,) = render.serve(VALUES)
    raw = yaml.safe_load(service["spec"]["serveConfigV2"])
    config = ServeDeploySchema.model_validate(raw)
    (app,) = raw["applications"]
    (deployment,) = app["deployments"]
    for given, schema in ((raw, ServeDeploySchema), (app, ServeApplicationSchema), (deployment, DeploymentSchema)):
        assert set(given) <= set(schema.model_fields), f"{schema.__name__}: {set(given) - set(schema.model_fields)}"
    assert config.http_options.host == "0.0.0.0" and config.http_options.port == render.SERVE_PORT
    assert app["name"] == serving.APP and app["route_prefix"] == "/"
    assert deployment["num_replicas"] == VALUES["serve"]["replicas"]

    module, _, attribute = app["import_path"].partition(":")
    assert module == serving.__name__ and getattr(serving, attribute) is serving.app
    assert app["args"]["config"].startswith(render.IMAGE_REPO + "/")
    args = app["args"] | {"config": str(REPO / app["args"]["config"].removeprefix(render.IMAGE_REPO + "/"))}
    built = call_user_app_builder_with_args_if_necessary(serving.app, args)
    assert built._bound_deployment.name == deployment["name"]
    uri, _ = built._bound_deployment.init_args
    (refresh_step,) = [argv for argv in commands(refresh_template(DOCS, "d", "p", "")["spec"]["entrypoint"])
                       if argv[1] == "launch/index.py"]
    assert uri == layout.index_uri(load_config(REPO / refresh_step[2], refresh_step[3:]))
    with pytest.raises(ConfigError, match="the serve app's args must be"):
        serving.app({"config": args["config"], "overides": []})


def test_cli_prints_the_manifests():
    out = subprocess.run([sys.executable, str(REPO / "k8s" / "render.py"), "all"],
                         capture_output=True, text=True, check=True).stdout
    assert list(yaml.safe_load_all(out)) == DOCS


def test_values_are_checked_by_key_and_set_overrides_them(tmp_path, capsys):
    assert render.main(["rat", "--set", "rat.workrs=2"]) == 2
    assert "unknown config key 'rat.workrs'" in capsys.readouterr().err
    assert render.main(["scft", "--set", "scft.workers=many"]) == 2
    assert "'scft.workers' must be int, got str 'many'" in capsys.readouterr().err
    broken = tmp_path / "values.yaml"
    broken.write_text((REPO / "k8s" / "values.yaml").read_text().replace("bucket:", "buckett:"))
    assert render.main(["all", "--values", str(broken)]) == 2
    assert f"{broken}: unknown config key 'buckett'" in capsys.readouterr().err
    assert render.main(["scft", "--set", "scft.workers=4", "bucket=other"]) == 0
    (job,) = yaml.safe_load_all(capsys.readouterr().out)
    assert job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] == 4
    assert "root=s3://other/" in job["spec"]["entrypoint"]
