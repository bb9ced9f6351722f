"""cluster/: the launcher config against Ray's own schema, the KubeRay manifests against the KubeRay v1
field names, and every entry point they (and the runbook) name against the project's validation."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import jsonschema
import ray
import yaml

from support import REPO
from pipeline.config import EmbedConfig, FeaturizeConfig, FinetuneJobConfig, PretrainJobConfig, load_config
from pipeline.config.sweep import TuneJobConfig

CLUSTER = REPO / "cluster"

# Field names of the KubeRay v1 CRDs (ray-operator/apis/ray/v1: raycluster_types.go, rayjob_types.go).
RAY_CLUSTER_SPEC = {"suspend", "managedBy", "autoscalerOptions", "headServiceAnnotations", "enableInTreeAutoscaling",
                    "gcsFaultToleranceOptions", "headGroupSpec", "rayVersion", "workerGroupSpecs", "upgradeStrategy",
                    "authOptions"}
AUTH_OPTIONS = {"mode", "secretName", "enableK8sTokenAuth"}
HEAD_GROUP_SPEC = {"template", "headService", "enableIngress", "rayStartParams", "serviceType"}
WORKER_GROUP_SPEC = {"suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
                     "rayStartParams", "template", "scaleStrategy", "numOfHosts"}
AUTOSCALER_OPTIONS = {"resources", "image", "imagePullPolicy", "securityContext", "idleTimeoutSeconds",
                      "upscalingMode", "version", "env", "envFrom", "volumeMounts"}
RAY_JOB_SPEC = {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
                "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint", "runtimeEnvYAML",
                "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus", "entrypointNumGpus",
                "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend", "preRunningDeadlineSeconds"}
ENTRY_POINTS = {"pipeline.featurize": FeaturizeConfig, "pipeline.pretrain": PretrainJobConfig,
                "pipeline.embed": EmbedConfig, "pipeline.finetune": FinetuneJobConfig, "pipeline.tune": TuneJobConfig}


def manifests() -> list[dict]:
    return [doc for path in sorted((CLUSTER / "kuberay").glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]


def check_cluster_spec(spec: dict) -> None:
    assert set(spec) <= RAY_CLUSTER_SPEC, set(spec) - RAY_CLUSTER_SPEC
    assert set(spec["authOptions"]) <= AUTH_OPTIONS and spec["authOptions"]["mode"] == "token"  # nobody gets in without the token
    assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
    assert spec["headGroupSpec"]["rayStartParams"].get("dashboard-host") in (None, "127.0.0.1")
    assert set(spec["headGroupSpec"]) <= HEAD_GROUP_SPEC
    assert set(spec.get("autoscalerOptions", {})) <= AUTOSCALER_OPTIONS
    for group in spec["workerGroupSpecs"]:
        assert set(group) <= WORKER_GROUP_SPEC, set(group) - WORKER_GROUP_SPEC
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    for template in [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]:
        for container in template["spec"]["containers"]:
            assert container["resources"]["requests"] == container["resources"]["limits"]  # requests equal limits


def test_launcher_config_validates_against_rays_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    jsonschema.validate(config, schema)
    assert config["available_node_types"]["head"]["resources"] == {"CPU": 0, "TRAIN_DRIVER": 8}
    assert all("IamInstanceProfile" in node["node_config"] for node in config["available_node_types"].values())


def test_kuberay_manifests_use_the_v1_field_names():
    documents = manifests()
    kinds = {doc["kind"] for doc in documents}
    assert {"RayCluster", "RayJob"} <= kinds
    for doc in documents:
        if doc["kind"] == "RayCluster":
            assert doc["apiVersion"] == "ray.io/v1"
            check_cluster_spec(doc["spec"])
        elif doc["kind"] == "RayJob":
            assert doc["apiVersion"] == "ray.io/v1"
            assert set(doc["spec"]) <= RAY_JOB_SPEC, set(doc["spec"]) - RAY_JOB_SPEC
            assert doc["spec"]["backoffLimit"] >= 1 and doc["spec"]["submissionMode"] == "K8sJobMode"
            check_cluster_spec(doc["spec"]["rayClusterSpec"])
            yaml.safe_load(doc["spec"]["runtimeEnvYAML"])


def entry_points() -> list[str]:
    """Every `python -m pipeline.<job> ...` command in the manifests and the runbook."""
    texts = [doc["spec"]["entrypoint"] for doc in manifests() if doc["kind"] == "RayJob"]
    texts.append((CLUSTER / "README.md").read_text())
    commands = []
    for text in texts:
        commands += re.findall(r"python -m pipeline\.\w+[^\n&`|;]*", text)
    return commands


def test_every_entry_point_is_a_real_command_with_a_valid_config():
    commands = entry_points()
    assert {shlex.split(command)[2] for command in commands} == set(ENTRY_POINTS)  # each job is shown
    for command in commands:
        words = shlex.split(command)
        module = words[2]
        assert module in ENTRY_POINTS, f"{command!r}: no such entry point"
        config = words[words.index("--config") + 1] if "--config" in words else None
        overrides = [words[i + 1] for i, word in enumerate(words) if word == "--set"]
        load_config(ENTRY_POINTS[module], REPO / config if config else None, overrides)


def test_the_launcher_cluster_requires_the_token_and_binds_the_dashboard_locally():
    config = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    options = " ".join(config["docker"]["run_options"])
    assert "--env RAY_AUTH_MODE=token" in options  # every container: head, workers, the autoscaler's commands
    token_path = re.search(r"--env RAY_AUTH_TOKEN_PATH=(\S+)", options).group(1)
    assert config["file_mounts"][token_path] == "~/.ray/auth_token"  # `ray get-auth-token --generate` writes it
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        assert "0.0.0.0" not in command


def test_services_stay_inside_the_cluster():
    documents = manifests()
    for doc in documents:
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", doc["metadata"]["name"]
        assert doc["kind"] != "Ingress"  # an ingress needs authentication in front: not shipped
    (policy,) = [doc for doc in documents if doc["kind"] == "NetworkPolicy"]
    assert policy["spec"]["podSelector"]["matchLabels"] == {"app": "mlflow"}
    assert policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"] == {"ray.io/is-ray-node": "yes"}
    (cluster,) = [doc for doc in documents if doc["kind"] == "RayCluster"]
    assert cluster["spec"]["authOptions"]["secretName"] in (CLUSTER / "README.md").read_text()


def test_the_runbooks_submit_jobs_with_the_token():
    for readme in (CLUSTER / "README.md", REPO / "README.md"):
        text = readme.read_text()
        assert "ray get-auth-token" in text and "RAY_AUTH_TOKEN" in text and "RAY_AUTH_MODE=token" in text, readme
    for line in (CLUSTER / "README.md").read_text().splitlines():
        if "ray job submit" in line and "--address" in line:
            assert "127.0.0.1" in line  # through a port-forward, never a public address
