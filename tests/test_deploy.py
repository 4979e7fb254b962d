"""The Dockerfile and Kubernetes manifests parse and point at real routes and options."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

from serving.app import create_app
from serving.cli.main import build_parser
from serving.config import load_config

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"


def documents():
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return {d["kind"]: d for d in docs}


def routes(config):
    app = create_app(config)
    return {(r.method, r.resource.canonical) for r in app.router.routes() if r.resource}


def test_manifests_parse_and_probes_hit_real_routes(tmp_path):
    docs = documents()
    assert {"ConfigMap", "Secret", "Deployment"} <= set(docs)
    toml = docs["ConfigMap"]["data"]["config.toml"]
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    for key, value in docs["Secret"]["stringData"].items():
        (secrets / key).write_text(value)
    config_file = tmp_path / "config.toml"
    config_file.write_text(toml.replace("/etc/modeld/secrets", str(secrets)))
    config = load_config(config_file, env={})  # the shipped config validates
    known = routes(config)
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    sidecar = next(c for c in pod["containers"] if c["name"] == "modeld")
    for probe in ("readinessProbe", "livenessProbe"):
        get = sidecar[probe]["httpGet"]
        assert ("GET", get["path"]) in known, get
        assert get["port"] == config.server.port
    assert sidecar["ports"][0]["containerPort"] == config.server.port
    parser = build_parser()
    parser.parse_args(sidecar["args"])  # the sidecar's arguments are valid
    init = pod["initContainers"][0]
    assert init["args"][0] == "pull"
    parser.parse_args(init["args"])
    mounts = {m["name"] for m in sidecar["volumeMounts"]}
    assert {"modeld-cache", "modeld-config", "modeld-secrets"} <= mounts
    assert {v["name"] for v in pod["volumes"]} >= mounts
    assert config.cache.dir == "/var/cache/modeld"
    for container in (sidecar, init):
        keys = {e["valueFrom"]["secretKeyRef"]["key"] for e in container["env"]}
        assert keys <= set(docs["Secret"]["stringData"])


def test_dockerfile_is_non_root_with_a_healthcheck_on_a_real_route():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.1\d-slim", text, re.M)
    assert re.search(r"^USER 10001", text, re.M)
    health = re.search(r"^HEALTHCHECK .*", text, re.M | re.S).group(0)
    path = re.search(r"127\.0\.0\.1:8080(/[\w/]+)", health).group(1)
    config = load_config(env={}, extra_models=["models:/iris/1"])
    assert ("GET", path) in routes(config)
    cmd = re.search(r"^CMD \[(.*)\]", text, re.M).group(1)
    build_parser().parse_args(shlex.split(cmd.replace(",", " ")))
