"""Every manifest under infra/ parses, validates, and agrees with the image and the project (issue #14).

No cluster: standard Kubernetes objects validate offline against the Kubernetes OpenAPI schema shipped by
`kubernetes-validate` (strict, so a misspelt field fails); KubeRay's custom resources are not in that schema,
so their required fields are checked here and their pod templates validate as Kubernetes `PodTemplate`s.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml
from infra_files import (
    DOCKERFILE,
    INFRA,
    ROOT,
    RUNTIME_ENV,
    SUBMIT_SH,
    Doc,
    containers,
    dockerfile_arg,
    documents,
    file_documents,
    manifests,
    pod_templates,
    ray_cluster_specs,
    rel,
    yaml_files,
)

kubernetes_validate = pytest.importorskip("kubernetes_validate")

# The Kubernetes version the manifests are checked against: the kubectl the CronJob's image names
# (CronJob.spec.timeZone, used there, is GA since 1.27). kubernetes-validate ships schemas 1.x up to its own.
K8S_VERSION = "1.33.0"
S3_SECRET = "embedlake-s3"
CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
IMAGE_REPOSITORY = "registry.example.com/embedlake"  # the project's image (infra/docker/Dockerfile)


def test_infra_has_the_manifests_these_tests_cover():
    names = {rel(p) for p in yaml_files()}
    assert {"infra/kuberay/rayjob-embed.yaml", "infra/kuberay/raycluster.yaml",
            "infra/kuberay/cronjob-reembed.yaml", "infra/ray/runtime_env.yaml"} <= names, names


@pytest.mark.parametrize("path", yaml_files(), ids=rel)
def test_yaml_parses_to_mappings(path: Path):
    docs = documents([path])
    assert docs, f"{rel(path)}: no YAML document"
    for doc in docs:
        assert isinstance(doc.body, dict), f"{doc.where}: expected a mapping, got {type(doc.body).__name__}"


@pytest.mark.parametrize("path", [p for p in yaml_files() if "kuberay" in p.parts], ids=rel)
def test_kubernetes_objects_validate_against_the_schema(path: Path):
    """Standard objects as they are; KubeRay resources by their pod templates (a PodTemplateSpec each)."""
    problems, checked = [], 0
    for doc in documents([path]):
        if not doc.is_manifest:
            continue
        if doc.is_kuberay:
            objects = [(where, {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "ray-group"},
                                "template": template}) for where, template in pod_templates(doc)]
        else:
            objects = [(doc.where, doc.body)]
        for where, body in objects:
            checked += 1
            try:
                kubernetes_validate.validate(body, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as err:
                problems.append(f"{where}: {str(err).splitlines()[0]}")
    assert checked, f"{rel(path)}: no Kubernetes object found"
    assert not problems, "\n".join(problems)


def kuberay_problems(doc: Doc) -> list[str]:
    """What KubeRay (ray.io/v1, v1.7) requires of a RayJob or RayCluster, minimally, plus replica bounds.

    Required by the CRDs: a RayCluster spec's `headGroupSpec` with `rayStartParams` and `template`; each worker
    group's `groupName`, `minReplicas`, `maxReplicas`, `rayStartParams` and `template`; rayStartParams are
    strings (map[string]string: an unquoted number is refused). A RayJob needs `entrypoint` here (it runs in
    K8sJobMode) and one of `rayClusterSpec` / `clusterSelector`. `rayVersion` is required by us (version test).
    """
    body, problems = doc.body, []
    if body.get("apiVersion") != "ray.io/v1":
        problems.append(f"apiVersion {body.get('apiVersion')!r}, expected 'ray.io/v1' (KubeRay v1.7)")
    if doc.kind not in ("RayJob", "RayCluster"):
        return [*problems, f"kind {doc.kind!r}: no check for it here; add one"]
    if not (body.get("metadata") or {}).get("name"):
        problems.append("metadata.name missing")
    spec = body.get("spec") or {}
    if doc.kind == "RayJob":
        if not spec.get("entrypoint"):
            problems.append("spec.entrypoint missing")
        if ("rayClusterSpec" in spec) == ("clusterSelector" in spec):
            problems.append("spec needs exactly one of rayClusterSpec, clusterSelector")
    clusters = ray_cluster_specs(doc)
    for cluster in clusters:
        if not cluster.get("rayVersion"):
            problems.append("rayVersion missing")
        head = cluster.get("headGroupSpec") or {}
        groups = [("headGroupSpec", head)] + [(f"workerGroupSpecs[{i}]", g)
                                              for i, g in enumerate(cluster.get("workerGroupSpecs") or [])]
        for where, group in groups:
            required = ["rayStartParams", "template"]
            if where != "headGroupSpec":
                required += ["groupName", "minReplicas", "maxReplicas"]
            problems += [f"{where}.{key} missing" for key in required if key not in group]
            for key, value in (group.get("rayStartParams") or {}).items():
                if not isinstance(value, str):
                    problems.append(f"{where}.rayStartParams.{key} is {value!r}; KubeRay takes strings only (quote it)")
            if not ((group.get("template") or {}).get("spec") or {}).get("containers"):
                problems.append(f"{where}.template.spec.containers missing")
            if where != "headGroupSpec" and "minReplicas" in group and "maxReplicas" in group:
                low, high = group["minReplicas"], group["maxReplicas"]
                replicas = group.get("replicas", low)
                if not 0 <= low <= replicas <= high:
                    problems.append(f"{where}: need 0 <= minReplicas <= replicas <= maxReplicas, "
                                    f"got {low}, {replicas}, {high}")
        names = [g.get("groupName") for g in cluster.get("workerGroupSpecs") or []]
        if len(names) != len(set(names)):
            problems.append(f"worker group names repeat: {names}")
    if doc.kind == "RayCluster" and not clusters:
        problems.append("spec missing")
    return problems


def test_kuberay_resources_have_their_required_fields():
    found = [d for d in manifests() if d.is_kuberay]
    assert {d.kind for d in found} == {"RayJob", "RayCluster"}, [d.where for d in found]
    problems = [f"{d.where}: {p}" for d in found for p in kuberay_problems(d)]
    assert not problems, "\n".join(problems)


def test_the_kuberay_check_refuses_what_kuberay_refuses():
    """The hand-written check above is code too: it must fail on the mistakes it is there for."""
    (cluster,) = [d for d in manifests() if d.kind == "RayCluster"]
    assert kuberay_problems(cluster) == []
    broken = yaml.safe_load(yaml.safe_dump(cluster.body))
    broken["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    del broken["spec"]["workerGroupSpecs"][0]["groupName"]
    broken["spec"]["workerGroupSpecs"][0]["minReplicas"] = 99
    assert kuberay_problems(Doc("broken", broken)) == [
        "headGroupSpec.rayStartParams.num-cpus is 0; KubeRay takes strings only (quote it)",
        "workerGroupSpecs[0].groupName missing",
        "workerGroupSpecs[0]: need 0 <= minReplicas <= replicas <= maxReplicas, got 99, 0, 8",
    ]


def runtime_envs() -> list[Doc]:
    """infra/ray/runtime_env.yaml (for `ray job submit`) and every RayJob's runtimeEnvYAML."""
    return [*file_documents(RUNTIME_ENV), *(d for d in documents() if d.carrier == "RayJob")]


def test_runtime_envs_are_what_ray_accepts_and_hold_no_credentials():
    from ray.runtime_env import RuntimeEnv, RuntimeEnvConfig

    envs = runtime_envs()
    assert len(envs) == 3, [d.where for d in envs]  # the file, the RayJob's, the CronJob template's
    for doc in envs:
        # RuntimeEnv ignores unknown keys (plugins) and RuntimeEnvConfig only warns: a misspelt key would
        # silently do nothing, so the keys are checked against the known ones.
        unknown = set(doc.body) - RuntimeEnv.known_fields
        assert not unknown, f"{doc.where}: unknown runtime_env keys {sorted(unknown)}"
        unknown = set(doc.body.get("config") or {}) - RuntimeEnvConfig.known_fields
        assert not unknown, f"{doc.where}: unknown runtime_env config keys {sorted(unknown)}"
        RuntimeEnv(**doc.body)  # types: env_vars Dict[str, str], ...
        if "working_dir" in doc.body:  # relative to the repo root, where submit.sh runs `ray job submit`
            assert (ROOT / doc.body["working_dir"] / "jobs").is_dir(), f"{doc.where}: working_dir holds no jobs/"
        secret = [k for k in doc.body.get("env_vars") or {} if re.search(r"(^|_)(SECRET|TOKEN|PASSWORD|ACCESS_KEY)(_|$)", k)]
        assert not secret, f"{doc.where}: credentials in a runtime env are visible in `ray job list`: {secret}"


def test_ray_pods_take_s3_credentials_from_the_secret():
    for doc in (d for d in manifests() if d.is_kuberay):
        for where, template in pod_templates(doc):
            for container in template["spec"]["containers"]:
                env = {e["name"]: e for e in container.get("env") or []}
                for name in CREDENTIALS:
                    ref = ((env.get(name) or {}).get("valueFrom") or {}).get("secretKeyRef") or {}
                    assert ref.get("name") == S3_SECRET and "value" not in env.get(name, {}), (
                        f"{where} {container['name']}: {name} must come from Secret {S3_SECRET} (secretKeyRef)")


def quantity_bytes(text: str) -> int:
    """A Kubernetes memory quantity (`16Gi`, `512M`, `12884901888`) in bytes."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    number, unit = re.fullmatch(r"(\d+)([KMGT]i?)?", str(text)).groups()
    return int(number) * units.get(unit, 1)


def test_object_store_fits_in_dev_shm_and_the_pod():
    """Ray puts the object store in /dev/shm: a store bigger than the memory-backed volume cannot start
    there, and the volume counts against the container's memory limit."""
    checked = 0
    for doc in (d for d in manifests() if d.is_kuberay):
        for cluster in ray_cluster_specs(doc):
            for group in [cluster["headGroupSpec"], *(cluster.get("workerGroupSpecs") or [])]:
                store = group["rayStartParams"].get("object-store-memory")
                pod = group["template"]["spec"]
                shm = [v for v in pod.get("volumes") or [] if (v.get("emptyDir") or {}).get("medium") == "Memory"]
                if store is None:
                    continue
                checked += 1
                where = f"{doc.where} {group.get('groupName', 'head')}"
                assert len(shm) == 1 and "sizeLimit" in shm[0]["emptyDir"], f"{where}: no sized /dev/shm emptyDir"
                limit = quantity_bytes(pod["containers"][0]["resources"]["limits"]["memory"])
                shm_size = quantity_bytes(shm[0]["emptyDir"]["sizeLimit"])
                assert int(store) <= shm_size <= limit, f"{where}: need object store {store} <= /dev/shm " \
                                                        f"{shm_size} <= memory limit {limit}"
    assert checked, "no group sets object-store-memory (raycluster.yaml does)"


def test_raycluster_is_a_cpu_head_and_autoscaled_one_gpu_workers():
    (doc,) = [d for d in manifests() if d.kind == "RayCluster"]
    spec = doc.body["spec"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    (gpu,) = spec["workerGroupSpecs"]
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] > 0, "elastic: no GPU held while idle (issue #17)"
    # On a group at zero only `--device gpu` asks the autoscaler for GPU pods (`auto` would run on CPU), and
    # the pool may grow to the group's size: what submit.sh, the way jobs reach this cluster, passes.
    script = SUBMIT_SH.read_text()
    assert "--device gpu" in script and '"1..${ACTORS}"' in script
    assert f': "${{ACTORS:={gpu["maxReplicas"]}}}"' in script, "submit.sh's default ACTORS is the group's maxReplicas"
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert str(limits["nvidia.com/gpu"]) == "1"


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_one_ray_version_in_image_manifests_and_pyproject():
    """Every node of a Ray cluster must run the same Ray; the image is what the manifests' `rayVersion` must
    name, and the project's pin is the minor series the code is tested with, which must hold the image's."""
    import importlib.metadata

    from packaging.requirements import Requirement
    from packaging.version import Version

    image = Version(dockerfile_arg("RAY_VERSION"))
    versions = {f"{d.where}": str(c.get("rayVersion")) for d in manifests() if d.is_kuberay
                for c in ray_cluster_specs(d)}
    assert len(versions) == 3, versions  # RayJob, RayCluster, the CronJob's RayJob template
    assert set(versions.values()) == {str(image)}, f"rayVersion must equal the Dockerfile's RAY_VERSION {image}: {versions}"

    (ray,) = [Requirement(r) for r in _pyproject()["dependencies"] if Requirement(r).name == "ray"]
    outside = [Version(f"{image.major}.{image.minor - 1}.99"), Version(f"{image.major}.{image.minor + 1}.0")]
    assert image in ray.specifier, f"pyproject's {ray} excludes the image's Ray {image}"
    assert not any(v in ray.specifier for v in outside), f"pyproject's {ray} admits another minor than the image's {image}"
    installed = Version(importlib.metadata.version("ray"))
    assert installed in ray.specifier, f"tests run on Ray {installed}, outside pyproject's {ray}: reinstall"


def test_the_image_installs_the_jobs_api():
    """`ray job submit` (and KubeRay's RayJob submitter) talk to the head's dashboard, which Ray's `default`
    extra installs; a head without it starts with no Jobs API (tests/infra/test_ray_jobs.py starts one)."""
    installs = re.findall(r'"ray\[([^\]]*)\]==\$\{RAY_VERSION\}"', DOCKERFILE.read_text())
    assert len(installs) == 1, f"{rel(DOCKERFILE)}: expected one pip install of ray[...]==${{RAY_VERSION}}: {installs}"
    assert {"data", "default"} <= {e.strip() for e in installs[0].split(",")}, installs


def test_one_project_image_everywhere_and_built_as_documented():
    images = {f"{d.where} {c['name']}": c["image"] for d in manifests() for c in containers(d)
              if c["image"].rsplit(":", 1)[0] == IMAGE_REPOSITORY}
    assert len(images) >= 5, images  # RayJob head+gpu, RayCluster head+gpu, the template's head+gpu
    assert len(set(images.values())) == 1, f"the manifests name different embedlake images: {images}"
    (image,) = set(images.values())
    tag = image.rsplit(":", 1)[1]
    version = _pyproject()["version"]
    assert tag == version or tag.startswith(version + "-"), f"image tag {tag} is not project version {version}"
    built = re.findall(r"-t (\S+)", (INFRA / "README.md").read_text() + DOCKERFILE.read_text())
    assert image in built, f"no documented `docker build -t {image}` (README, Dockerfile): {sorted(set(built))}"


def test_every_rayjob_asks_for_the_gpus_its_cluster_can_grow_to():
    """A GPU group that may be at zero needs `--device gpu` (`auto` would see no GPU and run on CPU), and the
    pool's MAX should be the GPUs the group can reach; a fixed group needs neither (issue #17)."""
    checked = 0
    for doc in (d for d in manifests() if d.kind == "RayJob"):
        argv = shlex.split(doc.body["spec"]["entrypoint"])
        (cluster,) = ray_cluster_specs(doc)
        gpu_groups = [g for g in cluster.get("workerGroupSpecs") or []
                      if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"].get("limits", {})]
        reachable = sum(g["maxReplicas"] for g in gpu_groups)
        if any(g["minReplicas"] == 0 for g in gpu_groups):
            assert argv[argv.index("--device") + 1] == "gpu", f"{doc.where}: a GPU group from 0 needs --device gpu"
            assert cluster["enableInTreeAutoscaling"] is True, f"{doc.where}: nothing would add the GPU pods"
            low, high = argv[argv.index("--actors") + 1].split("..")
            assert int(high) == reachable, f"{doc.where}: --actors {low}..{high}, but the GPU groups reach {reachable}"
        else:
            assert "--device" not in argv or argv[argv.index("--device") + 1] != "cpu", doc.where
        checked += 1
    assert checked == 2  # rayjob-embed.yaml (elastic) and the CronJob's template (fixed)
