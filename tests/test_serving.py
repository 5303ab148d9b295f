"""Serving: a live Ray Serve deployment of the tiny model on 127.0.0.1, driven by the official
openai client and by raw HTTP."""

from __future__ import annotations

import json
import os
import socket

import httpx
import pytest
import yaml

from raypost.serving.config import ServeConfig, build_serve_config, write_serve_config

KEY_ENV = "RAYPOST_TEST_SERVE_KEY"
KEY = "sk-test-raypost"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(name: str, path, **extra) -> dict:
    # A quarter CPU each: three replicas and two routers fit the 2-core test Ray.
    return {"name": name, "model": str(path), "backend": "transformers", "cpus_per_replica": 0.25, **extra}


@pytest.fixture(scope="module")
def server(ray_local, tiny_model):
    from ray import serve

    from raypost.serving.app import build_app

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    open_config = ServeConfig(
        name="test-open",
        models=[_model("tiny", tiny_model, max_model_len=128, aliases=["tiny-alias"]), _model("tiny-short", tiny_model, max_model_len=64)],
    )
    os.environ[KEY_ENV] = KEY
    secure_config = ServeConfig(name="test-secure", route_prefix="/secure", api_key_env=KEY_ENV, models=[_model("tiny", tiny_model, max_model_len=128)])
    try:
        serve.run(build_app(build_serve_config(open_config)["applications"][0]["args"]), name="test-open", route_prefix="/")
        serve.run(build_app(build_serve_config(secure_config)["applications"][0]["args"]), name="test-secure", route_prefix="/secure")
        yield f"http://127.0.0.1:{port}"
    finally:
        os.environ.pop(KEY_ENV, None)
        serve.shutdown()


def _chat(model="tiny", **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "What is 2+2?"}], "max_tokens": 4, "temperature": 0, **extra}


# -- config -------------------------------------------------------------------------------


def test_serve_config_is_a_valid_ray_serve_config(tmp_path):
    from ray.serve.schema import ServeDeploySchema

    config = ServeConfig(
        port=8123,
        api_key_env="MY_KEY",
        models=[
            {"name": "student", "model": "packaged:smollm2-135m-instruct", "replicas": {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8}},
            {"name": "teacher", "model": "/ckpt/teacher", "cpus_per_replica": 2, "gpus_per_replica": 1},
        ],
    )
    data = build_serve_config(config)
    ServeDeploySchema.model_validate(data)  # Ray's own schema for `serve deploy` files
    app = data["applications"][0]
    assert app["import_path"] == "raypost.serving.app:build_app"
    assert data["http_options"] == {"host": "127.0.0.1", "port": 8123}
    assert json.loads(json.dumps(app["args"])) == app["args"]
    assert ServeConfig.model_validate(app["args"]).models == config.models  # args parse back
    path = write_serve_config(config, tmp_path / "serve.yaml")
    assert yaml.safe_load(path.read_text()) == data
    student, teacher = config.models
    assert student.replicas.serve_options()["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8}
    assert teacher.replicas.serve_options()["num_replicas"] == 1


def test_serve_config_rejects_bad_input():
    from raypost.config import RecipeError
    from raypost.serving.config import parse_serve_config

    with pytest.raises(RecipeError, match=r"models\[1\]: .*duplicate model name 'a'"):
        parse_serve_config({"models": [{"name": "a", "model": "x"}, {"name": "a", "model": "y"}]})
    with pytest.raises(RecipeError, match=r"serve config: models\[0\]\.replicas\.max_replicas: Input should be greater"):
        parse_serve_config({"models": [{"name": "a", "model": "x", "replicas": {"max_replicas": 0}}]})
    with pytest.raises(RecipeError, match="mix backend"):
        parse_serve_config({"models": [{"name": "a", "model": "x", "backend": "vllm"}, {"name": "b", "model": "y", "backend": "transformers"}]})


# -- the live deployment --------------------------------------------------------------------


def test_openai_client_chat_stream_and_models(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    assert sorted(m.id for m in client.models.list()) == ["tiny", "tiny-alias", "tiny-short"]

    reply = client.chat.completions.create(**_chat())
    assert reply.model == "tiny"
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage.completion_tokens == 4 and reply.choices[0].finish_reason == "length"
    assert reply.usage.prompt_tokens > 5

    pieces, finish = [], None
    for chunk in client.chat.completions.create(**_chat(), stream=True):
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    # Greedy decoding: the stream spells the same reply as the non-streaming call.
    assert "".join(pieces) == reply.choices[0].message.content
    assert finish == "length"

    completion = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=3, temperature=0)
    assert completion.usage.completion_tokens == 3 and isinstance(completion.choices[0].text, str)


def test_stream_is_server_sent_events_ending_in_done(server):
    with httpx.stream("POST", f"{server}/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 3, "stream": True,
                                                               "stream_options": {"include_usage": True}}, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["usage"]["completion_tokens"] == 3


def test_health_route(server):
    response = httpx.get(f"{server}/health", timeout=30)
    assert response.status_code == 200 and response.json()["status"] == "ok"


@pytest.mark.parametrize(
    "body, status, code",
    [
        (b"{not json", 400, "invalid_json"),
        (b"[1, 2]", 400, "invalid_json"),
        (json.dumps(_chat(max_tokens="many")).encode(), 400, "invalid_value"),
        (json.dumps(_chat(messages="hello")).encode(), 400, "invalid_value"),
        (json.dumps({"model": "tiny", "max_tokens": 4}).encode(), 400, "invalid_value"),
        (json.dumps(_chat(messages=[])).encode(), 400, "invalid_value"),
        (json.dumps(_chat(max_tokens=4000)).encode(), 400, "context_length_exceeded"),
        (json.dumps(_chat(max_tokens=4000, stream=True)).encode(), 400, "context_length_exceeded"),
        (json.dumps(_chat(model="no-such-model")).encode(), 404, "model_not_found"),
    ],
    ids=["malformed", "not-object", "wrong-type", "messages-not-list", "missing-messages", "empty-messages", "too-long", "too-long-stream", "unknown-model"],
)
def test_bad_requests_get_openai_errors_and_the_replica_keeps_serving(server, body, status, code):
    response = httpx.post(f"{server}/v1/chat/completions", content=body, headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"] and error["type"] == "invalid_request_error"
    good = httpx.post(f"{server}/v1/chat/completions", json=_chat(), timeout=60)
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 4


def test_two_models_each_answer_by_name(server):
    for name in ("tiny", "tiny-alias", "tiny-short"):
        response = httpx.post(f"{server}/v1/chat/completions", json=_chat(model=name), timeout=60)
        assert response.status_code == 200 and response.json()["model"] == name
    # The context limits differ (128 vs 64), so each name reached its own deployment.
    assert httpx.post(f"{server}/v1/chat/completions", json=_chat(model="tiny", max_tokens=80), timeout=60).status_code == 200
    short = httpx.post(f"{server}/v1/chat/completions", json=_chat(model="tiny-short", max_tokens=80), timeout=60)
    assert short.status_code == 400 and "64 tokens" in short.json()["error"]["message"]


def test_api_key_from_env(server):
    from openai import AuthenticationError, OpenAI

    url = f"{server}/secure/v1"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        response = httpx.post(f"{url}/chat/completions", json=_chat(), headers=headers, timeout=60)
        assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{url}/models", timeout=30).status_code == 401
    assert httpx.get(f"{server}/secure/health", timeout=30).status_code == 200  # probes need no key

    with pytest.raises(AuthenticationError):
        OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
    client = OpenAI(base_url=url, api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert client.chat.completions.create(**_chat()).usage.completion_tokens == 4
    # The open app next to it still needs no key.
    assert httpx.post(f"{server}/v1/chat/completions", json=_chat(), timeout=60).status_code == 200


def test_api_key_from_config_without_env(monkeypatch):
    config = ServeConfig(api_key="sk-literal", api_key_env="RAYPOST_UNSET_KEY", models=[{"name": "a", "model": "x"}])
    monkeypatch.delenv("RAYPOST_UNSET_KEY", raising=False)
    assert config.resolved_api_key() == "sk-literal"
    monkeypatch.setenv("RAYPOST_UNSET_KEY", "sk-env")
    assert config.resolved_api_key() == "sk-env"


# -- the CLI ------------------------------------------------------------------------------


def test_cli_write_config_from_recipe_serves_models_and_exported_stages(tmp_path, tiny_model):
    import shutil

    from raypost.cli import main

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "r", "output_dir": str(tmp_path / "run"),
        "models": {"teacher": str(tiny_model), "student": str(tiny_model), "extra": {"base": "packaged:smollm2-135m-instruct"}},
        "stages": [
            {"kind": "merge", "name": "merged", "models": ["teacher", "student"]},
            {"kind": "merge", "name": "not-run-yet", "models": ["teacher", "student"]},
        ],
    }))
    shutil.copytree(tiny_model, tmp_path / "run" / "merged" / "model")
    out = tmp_path / "serve_config.yaml"
    assert main(["serve", str(recipe), "--port", "8765", "--write-config", str(out)]) == 0
    data = yaml.safe_load(out.read_text())
    assert data["http_options"]["port"] == 8765 and data["applications"][0]["name"] == "r"
    models = {m["name"]: m for m in data["applications"][0]["args"]["models"]}
    assert set(models) == {"teacher", "base", "merged"}  # student is an alias of the same checkpoint
    assert models["teacher"]["aliases"] == ["student"]
    assert models["merged"]["model"] == str(tmp_path / "run" / "merged" / "model")

    serve_yaml = tmp_path / "serve.yaml"
    serve_yaml.write_text(yaml.safe_dump({"recipe": "recipe.yaml", "port": 8100, "models": [
        {"name": "m", "model": "stage:merged"}, {"name": "s", "model": "student", "backend": "transformers"}]}))
    assert main(["serve", str(serve_yaml), str(tiny_model), "--name", "extra-one", "--write-config", str(out)]) == 0
    args = yaml.safe_load(out.read_text())["applications"][0]["args"]
    assert [(m["name"], m["model"]) for m in args["models"]] == [
        ("m", str(tmp_path / "run" / "merged" / "model")), ("s", str(tiny_model)), ("extra-one", str(tiny_model))]

    serve_yaml.write_text(yaml.safe_dump({"recipe": "recipe.yaml", "models": [{"name": "x", "model": "stage:not-run-yet"}]}))
    assert main(["serve", str(serve_yaml), "--write-config", str(out)]) == 2  # a clear error, not a traceback


# -- vLLM through ray.serve.llm -----------------------------------------------------------


def _processes_with_env(entry: str) -> list[str]:
    """Processes whose environment holds `entry`: everything a `raypost serve` started inherits it."""
    from pathlib import Path

    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and entry.encode() in (proc / "environ").read_bytes().split(b"\0"):
                found.append(f"{proc.name} {(proc / 'cmdline').read_bytes()[:120]!r}")
        except OSError:
            continue
    return found


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_raypost_serves_answer_side_by_side_and_stop_on_ctrl_c_and_sigterm(tiny_model):
    """`raypost serve` as a user runs it, twice on one machine: each its own local Ray with
    HAProxy in front; one stopped by Ctrl-C (SIGINT to its process group), one by SIGTERM; no
    process of theirs and no /dev/shm segment outlives them."""
    import shutil
    import signal
    import subprocess
    import sys
    import tempfile
    import time
    from pathlib import Path

    raypost = str(Path(sys.executable).parent / "raypost")
    shm_before = set(os.listdir("/dev/shm"))
    servers = []
    for name in ("a", "b"):
        port = _free_port()
        # A Ray temp dir of its own (short: Ray's socket paths have a length limit), so this Ray
        # neither finds nor is found by the test session's; it also marks its processes.
        ray_tmp = tempfile.mkdtemp(prefix=f"rp{name}", dir="/tmp")
        env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAYPOST_CLI_KEY": "sk-cli"}
        for key in ("RAY_ADDRESS", "RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_THROUGHPUT_OPTIMIZED",
                    "RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT"):
            env.pop(key, None)
        command = [raypost, "serve", str(tiny_model), "--name", "tiny", "--backend", "transformers",
                   "--port", str(port), "--api-key-env", "RAYPOST_CLI_KEY"]
        # Ctrl-C reaches a terminal's foreground job; a job started in the background inherits
        # SIGINT ignored, so the default goes back in place for the child.
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   start_new_session=True,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        servers.append({"process": process, "port": port, "ray_tmp": ray_tmp, "base": f"http://127.0.0.1:{port}/v1"})
    headers = {"Authorization": "Bearer sk-cli"}
    try:
        deadline = time.monotonic() + 400
        for server in servers:
            while time.monotonic() < deadline and server["process"].poll() is None:
                try:
                    if httpx.get(f"{server['base']}/models", timeout=5).status_code == 401:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(2)
            assert server["process"].poll() is None, server["process"].stdout.read()[-3000:]
        # Serve writes one HAProxy config per Ray session; each port has its own frontend, and
        # the stats and metrics listeners bind to the serve's host, not to every interface
        configs = [p.read_text() for p in Path("/tmp/haproxy-serve").glob("*/haproxy.cfg")]
        for server in servers:
            [text] = [t for t in configs if f"bind 127.0.0.1:{server['port']}" in t]
            binds = [line.split()[1] for line in text.splitlines() if line.strip().startswith("bind ")]
            assert binds and all(b.startswith("127.0.0.1:") for b in binds), binds
        for server in servers:  # both answer, each while the other is up
            base = server["base"]
            assert [m["id"] for m in httpx.get(f"{base}/models", headers=headers, timeout=30).json()["data"]] == ["tiny"]
            reply = httpx.post(f"{base}/chat/completions", json=_chat(), headers=headers, timeout=120)
            assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 4
            bad = httpx.post(f"{base}/chat/completions", content=b"{bad", headers=headers, timeout=30)
            assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
        taken = subprocess.run([raypost, "serve", str(tiny_model), "--port", str(servers[0]["port"])],
                               capture_output=True, text=True, timeout=120)
        assert taken.returncode == 1 and taken.stdout == ""
        assert taken.stderr.strip().splitlines() == [
            f"error: raypost serve: 127.0.0.1:{servers[0]['port']} is in use (another `raypost serve`?); "
            f"choose another --port"]
        os.killpg(servers[0]["process"].pid, signal.SIGINT)  # Ctrl-C: the whole process group
        servers[1]["process"].send_signal(signal.SIGTERM)
        for server in servers:
            # generous: the goal (15 s) is measured, not timed here
            assert server["process"].wait(timeout=120) == 0, server["process"].stdout.read()[-3000:]
        time.sleep(2)  # the last of Ray's processes exit after their raylet
        for server in servers:
            assert _processes_with_env(f"RAY_TMPDIR={server['ray_tmp']}") == []
        assert set(os.listdir("/dev/shm")) - shm_before == set()
    finally:
        for server in servers:
            if server["process"].poll() is None:
                os.killpg(server["process"].pid, signal.SIGKILL)
                server["process"].wait()
            for pid_line in _processes_with_env(f"RAY_TMPDIR={server['ray_tmp']}"):
                try:
                    os.kill(int(pid_line.split()[0]), signal.SIGKILL)
                except OSError:
                    pass
            shutil.rmtree(server["ray_tmp"], ignore_errors=True)


def test_high_throughput_switches_keep_what_the_caller_set(monkeypatch):
    from raypost.serving.high_throughput import use_high_throughput_serve

    # set first, so that monkeypatch restores both (a key it never saw would stay behind)
    monkeypatch.setenv("RAY_SERVE_THROUGHPUT_OPTIMIZED", "unset")
    monkeypatch.delenv("RAY_SERVE_THROUGHPUT_OPTIMIZED")
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "0")
    monkeypatch.setenv("RAY_SERVE_HAPROXY_STATS_PORT", "18404")
    monkeypatch.setenv("RAY_SERVE_HAPROXY_METRICS_PORT", "unset")
    monkeypatch.delenv("RAY_SERVE_HAPROXY_METRICS_PORT")
    switches = use_high_throughput_serve()
    metrics_port = int(switches.pop("RAY_SERVE_HAPROXY_METRICS_PORT"))
    assert switches == {"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
                        "RAY_SERVE_HAPROXY_STATS_PORT": "18404"}
    assert os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    with socket.socket() as sock:  # a free port, not HAProxy's fixed default
        sock.bind(("", metrics_port))
    assert metrics_port != 9101


def test_haproxy_side_ports_bind_to_the_serve_host_in_rays_template():
    from ray.serve._private import haproxy

    from raypost.serving.high_throughput import SIDE_PORT_BINDS, bind_haproxy_side_ports

    original = haproxy.HAPROXY_CONFIG_TEMPLATE
    try:
        assert bind_haproxy_side_ports("127.0.0.1")
        patched = haproxy.HAPROXY_CONFIG_TEMPLATE
        assert "bind 127.0.0.1:{{ config.metrics_port }}" in patched and "bind 127.0.0.1:{{ config.stats_port }}" in patched
        assert not any(line in patched for line in SIDE_PORT_BINDS)
    finally:
        haproxy.HAPROXY_CONFIG_TEMPLATE = original


@pytest.mark.vllm
def test_vllm_replicas_skip_engine_stats_unless_asked(tiny_model):
    """Like LLM.generate, a served vLLM engine keeps no per-step stats unless the config asks."""
    from raypost.serving.app import llm_configs

    def engine_kwargs(**vllm_kwargs):
        config = ServeConfig(models=[{"name": "m", "model": str(tiny_model), "backend": "vllm", "vllm_kwargs": vllm_kwargs}])
        (llm_config,) = llm_configs(config)
        return llm_config.engine_kwargs

    assert engine_kwargs()["disable_log_stats"] is True
    assert engine_kwargs(disable_log_stats=False)["disable_log_stats"] is False


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.timeout(900)
def test_vllm_backend_through_ray_serve_llm(server, tiny_model, monkeypatch):
    """Ray's own OpenAI app (ray.serve.llm) on a CPU-only bundle, with raypost's key check."""
    from raypost.engines.vllm_engine import vllm_available

    if not vllm_available():
        pytest.skip("vLLM is not installed")
    from openai import OpenAI
    from ray import serve

    from raypost.serving.app import build_app

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    config = ServeConfig(name="test-vllm", route_prefix="/vllm", api_key="sk-vllm",
                         models=[{"name": "tiny-vllm", "model": str(tiny_model), "backend": "vllm", "max_model_len": 256,
                                  "cpus_per_replica": 1, "vllm_kwargs": {"enforce_eager": True}}])
    serve.run(build_app(config.model_dump()), name="test-vllm", route_prefix="/vllm")
    try:
        url = f"{server}/vllm/v1"
        assert httpx.get(f"{url}/models", timeout=30).status_code == 401
        client = OpenAI(base_url=url, api_key="sk-vllm", max_retries=0)
        assert [m.id for m in client.models.list()] == ["tiny-vllm"]
        reply = client.chat.completions.create(**_chat(model="tiny-vllm"))
        assert reply.usage.completion_tokens == 4
        headers = {"Authorization": "Bearer sk-vllm"}
        assert httpx.post(f"{url}/chat/completions", json=_chat(model="nope"), headers=headers, timeout=60).status_code in (400, 404)
        too_long = httpx.post(f"{url}/chat/completions", json=_chat(model="tiny-vllm", max_tokens=4000), headers=headers, timeout=60)
        assert too_long.status_code == 400 and "error" in too_long.json()
        assert client.chat.completions.create(**_chat(model="tiny-vllm")).usage.completion_tokens == 4
    finally:
        serve.delete("test-vllm")
