"""infra/'s manifests against their published schemas, offline: Kubernetes' (kubernetes-validate ships
them) and the Compose Specification's (check-jsonschema vendors it); both pinned in the dev extra.

KEDA's ScaledObject is a custom resource whose schema no registry package ships: its fields that the
scale-to-zero design depends on are checked here instead (README of infra/, "Scaling to zero").
"""

from __future__ import annotations

import copy
import json
from importlib import resources
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

INFRA = Path(__file__).resolve().parents[1] / "infra"
K8S_VERSION = "1.30"  # GKE's regular channel at the time of writing


def k8s_errors(doc: dict) -> list[str]:
    """Schema violations of one Kubernetes object (strict: an unknown field is an error too)."""
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{doc['kind']}/{doc['metadata']['name']}: {'.'.join(map(str, e.path))}: {e.message}"]
    return []


def compose_errors(doc: dict) -> list[str]:
    schema = json.loads(
        resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text()
    )
    validator = jsonschema.Draft202012Validator(schema)
    return [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(doc)]


def k8s_docs() -> list[tuple[str, dict]]:
    return [(p.name, d) for p in sorted((INFRA / "k8s").glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]


def compose() -> dict:
    return yaml.safe_load((INFRA / "compose.yaml").read_text())


@pytest.mark.parametrize(
    "name,doc",
    [d for d in k8s_docs() if d[1]["apiVersion"] != "keda.sh/v1alpha1"],
    ids=lambda v: v if isinstance(v, str) else f"{v['kind']}/{v['metadata']['name']}",
)
def test_kubernetes_objects_match_the_published_schema(name, doc):
    assert k8s_errors(doc) == []


def test_compose_file_matches_the_compose_spec():
    assert compose_errors(compose()) == []


def test_an_invalid_manifest_is_caught():
    """The validators can fail: a misspelt field, a wrong type, an unknown service key are all found."""
    deployment = next(d for _, d in k8s_docs() if d["kind"] == "Deployment")
    misspelt = copy.deepcopy(deployment)
    misspelt["spec"]["template"]["spec"]["containers"][0]["envfrom"] = misspelt["spec"]["template"]["spec"][
        "containers"
    ][0].pop("envFrom")
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "one"
    assert k8s_errors(misspelt) and k8s_errors(wrong_type)
    bad = compose()
    bad["services"]["api"]["stop_grace"] = "90s"
    bad["services"]["redis"]["ports"] = {"6379": 6379}
    assert len(compose_errors(bad)) >= 2


def test_each_scaled_pool_is_scaled_on_its_load_list():
    """KEDA's objects: each scales a Deployment of the same file, on the load list of the queue that
    Deployment's workers consume (what availability keeps open while the pool is at zero)."""
    docs = [d for _, d in k8s_docs()]
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    scaled = [d for d in docs if d["kind"] == "ScaledObject"]
    assert scaled
    for so in scaled:
        spec = so["spec"]
        assert set(spec) <= {
            "scaleTargetRef",
            "minReplicaCount",
            "maxReplicaCount",
            "advanced",
            "triggers",
            "pollingInterval",
            "cooldownPeriod",
        }, spec
        target = deployments[spec["scaleTargetRef"]["name"]]
        command = target["spec"]["template"]["spec"]["containers"][0]["command"]
        queues = command[command.index("-Q") + 1].split(",")
        lists = [t["metadata"]["listName"] for t in spec["triggers"] if t["type"] == "redis"]
        assert all(f"stems:load:{q}" in lists for q in queues), (so["metadata"]["name"], lists)
        assert isinstance(spec["minReplicaCount"], int) and spec["minReplicaCount"] <= spec["maxReplicaCount"]
