"""The deployment files under infra/ read as data, for the tests beside this file.

A manifest may carry more manifests inside it as text: a ConfigMap's data entry holding a RayJob template
(kuberay/cronjob-reembed.yaml), a RayJob's `runtimeEnvYAML`. `documents()` parses those too, so every check
runs on what the cluster will finally see, not only on the outer file.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
SUBMIT_SH = INFRA / "ray" / "submit.sh"
RUNTIME_ENV = INFRA / "ray" / "runtime_env.yaml"
KUBERAY_GROUP = "ray.io/"  # apiVersion prefix of KubeRay's custom resources (RayJob, RayCluster, ...)


@dataclass(frozen=True)
class Doc:
    """One YAML document: where it is (file, index, and the field of the text it was embedded in), its body,
    and the kind of the manifest that carries it as text (None for a document of the file itself)."""

    where: str
    body: Any
    carrier: str | None = None

    @property
    def kind(self) -> str | None:
        return self.body.get("kind") if isinstance(self.body, dict) else None

    @property
    def is_manifest(self) -> bool:
        return isinstance(self.body, dict) and "apiVersion" in self.body and "kind" in self.body

    @property
    def is_kuberay(self) -> bool:
        return self.is_manifest and str(self.body["apiVersion"]).startswith(KUBERAY_GROUP)


def yaml_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml"))


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def file_documents(path: Path) -> list[Doc]:
    """The documents of one YAML file, in order (a file may hold several, separated by `---`)."""
    docs = yaml.safe_load_all(path.read_text())
    return [Doc(f"{rel(path)}#{i}", body) for i, body in enumerate(docs) if body is not None]


def embedded(doc: Doc) -> Iterator[Doc]:
    """The YAML texts a manifest carries: ConfigMap data entries and a RayJob's runtimeEnvYAML, parsed."""
    if not doc.is_manifest:
        return
    body = doc.body
    texts: dict[str, str] = {}
    if doc.kind == "ConfigMap":
        texts = {f"data.{key}": value for key, value in (body.get("data") or {}).items()}
    elif doc.kind == "RayJob" and "runtimeEnvYAML" in body.get("spec", {}):
        texts = {"spec.runtimeEnvYAML": body["spec"]["runtimeEnvYAML"]}
    for key, text in texts.items():
        yield Doc(f"{doc.where} {key}", yaml.safe_load(text), carrier=doc.kind)


def documents(paths: list[Path] | None = None) -> list[Doc]:
    """Every YAML document under infra/ (or in `paths`), and every document embedded in one (recursively)."""
    out: list[Doc] = []
    pending = [d for path in (yaml_files() if paths is None else paths) for d in file_documents(path)]
    while pending:
        doc = pending.pop(0)
        out.append(doc)
        pending.extend(embedded(doc))
    return out


def manifests() -> list[Doc]:
    return [d for d in documents() if d.is_manifest]


def configmap_entries() -> list[Doc]:
    """Each data entry of each ConfigMap, parsed as YAML (a ConfigMap here only carries YAML)."""
    return [d for d in documents() if d.carrier == "ConfigMap"]


def ray_cluster_specs(doc: Doc) -> list[dict]:
    """The RayCluster spec(s) of a KubeRay manifest: a RayCluster's own spec, a RayJob's rayClusterSpec."""
    spec = doc.body.get("spec") or {}
    if doc.kind == "RayCluster":
        return [spec]
    return [spec["rayClusterSpec"]] if "rayClusterSpec" in spec else []


def pod_templates(doc: Doc) -> Iterator[tuple[str, dict]]:
    """(where, PodTemplateSpec) of every Ray group (head and workers) a KubeRay manifest defines."""
    for cluster in ray_cluster_specs(doc):
        yield f"{doc.where} headGroupSpec", cluster["headGroupSpec"]["template"]
        for group in cluster.get("workerGroupSpecs") or []:
            yield f"{doc.where} workerGroupSpecs[{group.get('groupName')}]", group["template"]


def containers(doc: Doc) -> Iterator[dict]:
    """Every container of a manifest: a CronJob's, a Job's, a Pod's, or a Ray group's."""
    templates = [t for _, t in pod_templates(doc)] if doc.is_kuberay else []
    spec = doc.body.get("spec") or {}
    if doc.kind == "CronJob":
        templates.append(spec["jobTemplate"]["spec"]["template"])
    elif doc.kind in ("Job", "Deployment", "StatefulSet", "DaemonSet"):
        templates.append(spec["template"])
    elif doc.kind == "Pod":
        templates.append({"spec": spec})
    for template in templates:
        pod = template.get("spec") or {}
        yield from (pod.get("initContainers") or []) + (pod.get("containers") or [])


def dockerfile_arg(name: str) -> str:
    """The default of `ARG NAME=value` in the Dockerfile; exactly one must exist."""
    values = re.findall(rf"^ARG {name}=(\S+)\s*$", DOCKERFILE.read_text(), flags=re.M)
    assert len(values) == 1, f"{rel(DOCKERFILE)}: expected one `ARG {name}=...`, found {values}"
    return values[0].strip("\"'")
