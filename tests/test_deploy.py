"""Deployment files: `ray job submit` end to end, cluster launcher YAMLs, KubeRay manifests.

The manifests are checked against the schemas their consumers use (Ray's own cluster-launcher
schema, the KubeRay CRDs' openAPIV3 schemas); the job path runs for real against a `ray start`
head with token auth.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(__file__).resolve().parent / "assets"
KUBERAY_CRDS = ASSETS / "kuberay" / "crds"
sys.path.insert(0, str(REPO / "scripts"))

import render_k8s  # noqa: E402  (scripts/ is not a package)

RAY_BIN = Path(sys.executable).parent / "ray"


# --- cluster launcher ----------------------------------------------------------------------

def _ray_cluster_schema() -> dict:
    import ray.autoscaler

    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    return json.loads(path.read_text())


CLUSTER_FILES = sorted((REPO / "cluster").glob("*.yaml"))


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_cluster_launcher_yaml_matches_ray_schema(path: Path):
    config = yaml.safe_load(path.read_text())
    jsonschema.Draft7Validator(_ray_cluster_schema()).validate(config)
    # Ray's schema leaves these open; the cluster would start but never install or run raypost.
    assert config["max_workers"] >= sum(t.get("min_workers", 0) for t in config["available_node_types"].values())
    assert config["head_node_type"] in config["available_node_types"]
    setup = "\n".join(config.get("setup_commands", []))
    assert "raypost" in setup, f"{path.name}: setup_commands never install raypost"


def test_cluster_files_exist():
    names = {p.name for p in CLUSTER_FILES}
    assert {"aws-gpu.yaml", "aws-cpu-dev.yaml"} <= names, names


def test_gpu_cluster_sizes_workers_for_vllm_and_deepspeed():
    config = yaml.safe_load((REPO / "cluster" / "aws-gpu.yaml").read_text())
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head should not take GPU work"
    gpu_types = [t for t in config["available_node_types"].values() if t["resources"].get("GPU", 0) > 0]
    assert gpu_types, "no GPU worker type"
    assert "raypost[gpu" in "\n".join(config["setup_commands"]), "GPU nodes need the gpu extra (vLLM)"
    assert any(t["resources"]["GPU"] >= 4 for t in gpu_types), "no node type for multi-GPU DeepSpeed training"


# --- KubeRay -------------------------------------------------------------------------------

def _to_json_schema(node):
    """A Kubernetes structural schema as plain JSON Schema, with the API server's rules.

    Unknown fields are rejected (kubectl's strict field validation), except under
    x-kubernetes-preserve-unknown-fields; int-or-string accepts both; nullable allows null.
    Other x-kubernetes-* keys (list types, CEL rules) are not checked here.
    """
    if isinstance(node, list):
        return [_to_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {k: _to_json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if (
        node.get("type") == "object"
        and "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def _load_crd_schemas() -> dict[tuple[str, str], dict]:
    schemas = {}
    for path in sorted(KUBERAY_CRDS.glob("*.yaml.gz")):
        crd = yaml.load(gzip.open(path, "rt"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schema = _to_json_schema(version["schema"]["openAPIV3Schema"])
            # Built once: jsonschema.validate() would re-check this 1 MB schema on every call.
            schemas[(f"{group}/{version['name']}", kind)] = jsonschema.Draft7Validator(schema)
    return schemas


@pytest.fixture(scope="module")
def crd_schemas():
    return _load_crd_schemas()


def _all_k8s_documents() -> list[tuple[str, dict]]:
    documents = []
    for name, docs in render_k8s.render_all().items():
        documents += [(f"{name}:{doc['kind']}/{doc['metadata']['name']}", doc) for doc in docs]
    return documents


def test_crd_schema_conversion_rejects_typos(crd_schemas):
    validator = crd_schemas[("ray.io/v1", "RayCluster")]
    good = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "x"},
            "spec": {"headGroupSpec": {"rayStartParams": {}, "template": {"spec": {"containers": [
                {"name": "ray-head", "image": "rayproject/ray:2.60.0",
                 "resources": {"limits": {"cpu": 2, "memory": "4Gi"}}}]}}}}}
    validator.validate(good)
    typo = yaml.safe_load(yaml.safe_dump(good))
    typo["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolice"] = "Always"
    with pytest.raises(jsonschema.ValidationError, match="imagePullPolice"):
        validator.validate(typo)
    missing = yaml.safe_load(yaml.safe_dump(good))
    del missing["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["name"]
    with pytest.raises(jsonschema.ValidationError, match="'name' is a required property"):
        validator.validate(missing)


def test_every_kuberay_manifest_matches_its_crd(crd_schemas):
    documents = _all_k8s_documents()
    checked = set()
    for where, doc in documents:
        key = (doc["apiVersion"], doc["kind"])
        if doc["apiVersion"].startswith("ray.io/"):
            assert key in crd_schemas, f"{where}: no CRD for {key}"
            crd_schemas[key].validate(doc)
            checked.add(doc["kind"])
    assert checked == {"RayCluster", "RayJob", "RayService"}


def _pod_specs(doc: dict) -> list[dict]:
    """Every pod spec (anything with `containers`) inside a resource's spec."""
    found = []

    def walk(node):
        if isinstance(node, dict):
            if "containers" in node:
                found.append(node)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(doc.get("spec", {}))
    return found


def test_manifests_are_production_shaped():
    for where, doc in _all_k8s_documents():
        text = yaml.safe_dump(doc)
        assert "hf_" not in text and "sk-" not in text, f"{where}: looks like an inline secret"
        for pod in _pod_specs(doc):
            context = pod.get("securityContext", {})
            assert context.get("runAsNonRoot") is True, f"{where}: pod not runAsNonRoot"
        for container in [c for pod in _pod_specs(doc) for c in pod["containers"]]:
            resources = container.get("resources", {})
            assert resources.get("requests") and resources.get("limits"), f"{where}/{container['name']}: no requests/limits"
            for env in container.get("env", []):
                if any(word in env["name"] for word in ("TOKEN", "KEY", "SECRET")):
                    assert "secretKeyRef" in env.get("valueFrom", {}), f"{where}: {env['name']} not from a Secret"
                    assert "value" not in env


def test_kuberay_gpu_base_has_the_required_shape():
    base = {doc["kind"]: doc for doc in render_k8s.render_all()["base"]}
    cluster = base["RayCluster"]["spec"]
    assert cluster["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    gpu_limits = [c["resources"]["limits"].get("nvidia.com/gpu") for g in groups.values()
                  for c in g["template"]["spec"]["containers"]]
    assert any(gpu_limits) and None in gpu_limits, "want one GPU and one CPU worker group"
    job = base["RayJob"]["spec"]
    assert job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] > 0
    runtime_env = yaml.safe_load(job["runtimeEnvYAML"])
    assert "raypost run" in job["entrypoint"] and runtime_env["env_vars"]
    service = base["RayService"]["spec"]
    serve = yaml.safe_load(service["serveConfigV2"])
    assert serve["applications"][0]["import_path"] == "raypost.serving.app:build_app"
    worker_gpus = [c["resources"]["limits"].get("nvidia.com/gpu") for g in service["rayClusterConfig"]["workerGroupSpecs"]
                   for c in g["template"]["spec"]["containers"]]
    assert any(worker_gpus)
    kinds = {doc["kind"] for doc in base.values()}
    assert "PersistentVolumeClaim" in kinds


def test_cpu_dev_overlay_asks_for_no_gpus():
    for where, doc in [(w, d) for w, d in _all_k8s_documents() if w.startswith("cpu-dev:")]:
        assert "nvidia.com/gpu" not in yaml.safe_dump(doc), where
        if doc["kind"] == "RayService":
            serve = yaml.safe_load(doc["spec"]["serveConfigV2"])
            assert serve["applications"], where


def _raypost_entrypoints() -> list[tuple[str, str]]:
    found = []
    for name, docs in render_k8s.render_all().items():
        found += [(f"{name}:{doc['metadata']['name']}", doc["spec"]["entrypoint"])
                  for doc in docs if doc["kind"] == "RayJob"]
    return found


def test_rayjob_entrypoints_load_as_recipes(monkeypatch):
    """The RayJobs' `raypost run` / `raypost loop` commands name a real recipe and overrides it
    accepts; the loop overlay's job runs a loop."""
    import shlex

    from raypost.loop.config import LoopRecipe
    from raypost.recipe import Recipe, load_recipe

    monkeypatch.chdir(REPO)  # the job runs in its working_dir, a copy of the repository
    commands = {}
    for where, entrypoint in _raypost_entrypoints():
        words = shlex.split(entrypoint)
        assert words[:3] == ["python", "-m", "raypost"] and words[3] in ("run", "loop"), where
        recipe = load_recipe(words[4], words[5:], schema=LoopRecipe if words[3] == "loop" else Recipe)
        assert str(recipe.resolved_output_dir()).startswith("/data/"), f"{where}: outputs off the volume"
        commands[where] = words[3]
    assert commands["loop:raypost-loop"] == "loop" and commands["gpu:raypost-quickstart"] == "run"


def test_runtime_envs_are_valid_for_ray():
    from ray.runtime_env import RuntimeEnv

    submitted = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    RuntimeEnv(**submitted)
    assert {".venv/", "runs/", ".cache/"} <= set(submitted["excludes"])
    for where, doc in _all_k8s_documents():
        if doc["kind"] == "RayJob":
            runtime_env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
            assert runtime_env["working_dir"] == "/opt/raypost", "where k8s/image/Dockerfile puts the checkout"
            # Ray checks a local working_dir exists: this checkout stands in for the image's copy.
            RuntimeEnv(**{**runtime_env, "working_dir": str(REPO)})


def test_committed_serve_config_equals_the_renderer_output():
    """serveConfigV2 in the manifests is generated from one source; a hand edit shows up here."""
    stale = render_k8s.check()
    assert not stale, f"out of date, run `python scripts/render_k8s.py`: {stale}"


# --- ray job submit, end to end ------------------------------------------------------------

def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class LocalHead:
    """A `ray start --head` of our own: own temp dir, own ports, own token, own process group.

    Stopping it signals only that process group (`ray stop` would end every Ray on the machine).
    """

    def __init__(self):
        # Short path: Ray's unix socket paths must stay under 107 bytes.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rp-head-", dir="/tmp"))
        port, self.dashboard_port, client_port, agent_port = _free_ports(4)
        self.token = uuid.uuid4().hex
        self.env = {
            **os.environ,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            # The job driver runs `python` from the head's PATH: make it this interpreter.
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "RAY_ADDRESS": f"http://127.0.0.1:{self.dashboard_port}",
        }
        self.env.pop("RAY_AUTH_TOKEN_PATH", None)
        self.address = self.env["RAY_ADDRESS"]
        command = [
            str(RAY_BIN), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
            f"--temp-dir={self.temp_dir}", "--num-cpus=2", "--include-dashboard=true",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={client_port}", f"--dashboard-agent-listen-port={agent_port}",
            "--disable-usage-stats",
        ]
        start_env = {k: v for k, v in self.env.items() if k != "RAY_ADDRESS"}
        # A new session: every daemon `ray start` leaves behind shares its process group.
        process = subprocess.run(command, env=start_env, capture_output=True, text=True, timeout=180,
                                 start_new_session=True)
        self.process_group = self._process_group()
        if process.returncode != 0:
            self.stop()
            raise RuntimeError(f"ray start failed:\n{process.stdout}\n{process.stderr}")

    def _process_group(self) -> int | None:
        import psutil

        marker = str(self.temp_dir)
        for proc in psutil.process_iter(["pid", "cmdline"]):
            if any(marker in part for part in (proc.info["cmdline"] or [])):
                return os.getpgid(proc.info["pid"])
        return None

    def ray(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([str(RAY_BIN), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout, cwd=REPO)

    def stop(self) -> None:
        group = self.process_group
        if group is not None and group != os.getpgid(0):
            for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
                try:
                    os.killpg(group, sig)
                except ProcessLookupError:
                    break
                deadline = time.time() + wait
                while time.time() < deadline and _group_alive(group):
                    time.sleep(0.5)
                if not _group_alive(group):
                    break
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.fixture(scope="module")
def local_head():
    head = LocalHead()
    try:
        yield head
    finally:
        head.stop()


def _smoke_recipe(path: Path, model: Path, output_dir: Path, data: str) -> Path:
    path.write_text(yaml.safe_dump({
        "name": "cluster-smoke",
        "output_dir": str(output_dir),
        "models": {"teacher": str(model)},
        "resources": {"concurrency": 1, "cpus_per_actor": 1},
        "stages": [{
            "kind": "generate", "name": "teacher", "model": "teacher",
            "engine": {"backend": "transformers", "batch_size": 4, "max_model_len": 512},
            "sampling": {"max_tokens": 8, "temperature": 0.0},
            # Relative on purpose: it must resolve inside the uploaded working dir.
            "input": {"path": data, "prompt_field": "question", "reference_field": "answer", "limit": 4},
        }],
    }))
    return path


def _job_status(head: LocalHead, submission_id: str) -> str:
    """The job's status from the head's REST API (the same call `ray job status` makes)."""
    request = urllib.request.Request(f"{head.address}/api/jobs/{submission_id}",
                                     headers={"Authorization": f"Bearer {head.token}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)["status"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ray_job_submit_runs_a_recipe_on_a_token_auth_head(local_head, tiny_model, tmp_path):
    from raypost import records

    # Without the token the head refuses the submission: auth is really on.
    unauthenticated = {k: v for k, v in local_head.env.items() if not k.startswith("RAY_AUTH")}
    refused = subprocess.run([str(RAY_BIN), "job", "list", "--address", local_head.address],
                             env={**unauthenticated, "HOME": str(tmp_path)}, capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode != 0 and "auth" in (refused.stdout + refused.stderr).lower()

    output_dir = tmp_path / "out"
    recipe = _smoke_recipe(tmp_path / "smoke.yaml", tiny_model, output_dir, "data/gsm8k/quickstart.jsonl")
    submission_id = f"raypost-smoke-{uuid.uuid4().hex[:8]}"
    result = subprocess.run(
        ["bash", "jobs/submit.sh", str(recipe)],
        env={**local_head.env, "RAY": str(RAY_BIN), "RAY_JOB_ARGS": f"--submission-id {submission_id}"},
        cwd=REPO, capture_output=True, text=True, timeout=500,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert _job_status(local_head, submission_id) == "SUCCEEDED"
    rows = records.read_rows(output_dir / "teacher")
    assert len(rows) == 4 and all(row["response"] is not None for row in rows)
    assert (output_dir / "summary.json").is_file()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ray_job_submit_exit_code_reflects_a_failed_recipe(local_head, tiny_model, tmp_path):
    recipe = _smoke_recipe(tmp_path / "bad.yaml", tiny_model, tmp_path / "out", "data/gsm8k/quickstart.jsonl")
    submission_id = f"raypost-fail-{uuid.uuid4().hex[:8]}"
    result = subprocess.run(
        # An override naming a stage field that does not exist: the recipe fails validation.
        ["bash", "jobs/submit.sh", str(recipe), "stages.teacher.engine.no_such_field=1"],
        env={**local_head.env, "RAY": str(RAY_BIN), "RAY_JOB_ARGS": f"--submission-id {submission_id}"},
        cwd=REPO, capture_output=True, text=True, timeout=280,
    )
    assert result.returncode != 0
    assert "no_such_field" in result.stdout + result.stderr
    assert _job_status(local_head, submission_id) == "FAILED"


@pytest.mark.parametrize("source, manifest", render_k8s.SERVE_TARGETS, ids=["base", "cpu-dev"])
def test_rayservice_serves_what_raypost_serve_would(source, manifest, tmp_path):
    """`raypost serve FILE --write-config` and the RayService's serveConfigV2 are the same config."""
    from raypost.cli import main

    written = tmp_path / "serve.yaml"
    assert main(["serve", str(source), "--write-config", str(written)]) == 0
    committed = [doc for doc in yaml.safe_load_all(manifest.read_text()) if doc["kind"] == "RayService"]
    assert yaml.safe_load(committed[0]["spec"]["serveConfigV2"]) == yaml.safe_load(written.read_text())
