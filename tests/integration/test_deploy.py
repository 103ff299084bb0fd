"""deploy/: everything that can be exercised without a Docker engine or a cluster.

The Dockerfile's build step is deploy/setup.sh, which deploy/test.sh runs on every test
run; here its instructions are checked against the repository. The systemd unit goes
through `systemd-analyze verify` and `security`; the compose file and the Kubernetes pod
are parsed, their proxy command lines go through the real argument parser, and the pod's
proxy.toml through the real config parser, then cross-checked with mounts and probes.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.commands.cli import _parser
from proxy.config import load_config, parse_config
from tests.support import REPO

DEPLOY = REPO / "deploy"


def _instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    instructions = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            keyword, _, rest = line.strip().partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def test_dockerfile_is_debian_slim_non_root_and_built_by_the_setup_script() -> None:
    instructions = _instructions()
    froms = [rest for keyword, rest in instructions if keyword == "FROM"]
    assert froms == ["debian:${DEBIAN_RELEASE}-slim"]
    assert ("ARG", "DEBIAN_RELEASE=bookworm") in instructions
    workdir = next(rest for keyword, rest in instructions if keyword == "WORKDIR")
    runs = [rest for keyword, rest in instructions if keyword == "RUN"]
    # The only build step that installs anything is the shared set-up script.
    assert runs[0].startswith("./deploy/setup.sh &&")
    assert all("apt-get install" not in run and "pip " not in run for run in runs)
    assert "useradd --system --uid 10001" in runs[1]
    users = [rest for keyword, rest in instructions if keyword == "USER"]
    assert users == ["10001:10001"]
    # Everything COPY takes exists, and the setup script is a file the tests run too.
    for keyword, rest in instructions:
        if keyword == "COPY":
            *sources, _destination = rest.split()
            for source in sources:
                assert (REPO / source).exists(), source
    # setup.sh builds the venv beside itself: WORKDIR/.venv is where ENTRYPOINT points.
    entrypoint = next(rest for keyword, rest in instructions if keyword == "ENTRYPOINT")
    assert entrypoint == f'["{workdir}/.venv/bin/hsm-proxy"]'
    cmd = next(rest for keyword, rest in instructions if keyword == "CMD")
    _parser().parse_args(json.loads(cmd))


def test_systemd_unit_verifies_and_is_hardened(tmp_path: Path) -> None:
    unit = (DEPLOY / "hsm-proxy.service").read_text()
    # verify checks that ExecStart exists: point it at this checkout's venv.
    local = tmp_path / "hsm-proxy.service"
    local.write_text(unit.replace("/opt/hsm-proxy/.venv", str(REPO / ".venv")))
    verify = subprocess.run(
        ["systemd-analyze", "verify", str(local)], capture_output=True, text=True, check=False
    )
    assert verify.returncode == 0
    assert verify.stdout + verify.stderr == ""
    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(local)],
        capture_output=True,
        text=True,
        check=False,
    )
    match = re.search(r"Overall exposure level for hsm-proxy.service: ([0-9.]+)", security.stdout)
    assert match, security.stdout + security.stderr
    assert float(match.group(1)) <= 2.0  # systemd rates 0-2 as "OK"
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    argv = shlex.split(exec_start.removeprefix("ExecStart="))
    args = _parser().parse_args(argv[1:])
    assert args.command == "run"
    # The example config the unit documents parses, and takes its PIN from the credential.
    credential = next(line for line in unit.splitlines() if line.startswith("LoadCredential="))
    name = credential.removeprefix("LoadCredential=").split(":")[0]
    config = load_config(DEPLOY / "proxy.example.toml")
    assert config.token.pin.file == Path(f"/run/credentials/hsm-proxy.service/{name}")
    assert config.admin is not None
    assert not config.admin.allow_public


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return data


def test_compose_runs_the_proxy_as_a_sidecar_of_the_sample_service() -> None:
    services = _compose()["services"]
    app, proxy = services["app"], services["proxy"]
    assert proxy["network_mode"] == "service:app"
    assert proxy["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
    assert (DEPLOY / ".." / proxy["build"]["dockerfile"]).exists()
    args = _parser().parse_args(proxy["command"])
    app_port = app["command"][app["command"].index("--port") + 1]
    assert args.upstream == f"http://127.0.0.1:{app_port}"
    listen_port = args.listen.rsplit(":", 1)[1]
    assert f"{listen_port}:{listen_port}" in app["ports"]
    assert args.admin.startswith("127.0.0.1:")
    assert proxy["read_only"] is True
    assert proxy["cap_drop"] == ["ALL"]
    # The dev state (token, PIN, CA) lives in a volume at the image's XDG_STATE_HOME.
    assert "proxy-state:/var/lib/hsm-proxy" in proxy["volumes"]
    assert "XDG_STATE_HOME=/var/lib/hsm-proxy" in (DEPLOY / "Dockerfile").read_text()


def _kubernetes() -> dict[str, dict[str, Any]]:
    documents = yaml.safe_load_all((DEPLOY / "kubernetes" / "pod.yaml").read_text())
    return {document["kind"]: document for document in documents}


def _mount_source(container: dict[str, Any], volumes: dict[str, Any], path: Path) -> Any:
    for mount in container["volumeMounts"]:
        if path.parent == Path(mount["mountPath"]) and "subPath" not in mount:
            return mount, volumes[mount["name"]]
    raise AssertionError(f"{path} is not on any volume of the container")


def test_kubernetes_sidecar_reads_its_secrets_and_probes_the_admin_endpoint() -> None:
    documents = _kubernetes()
    pod = documents["Pod"]["spec"]
    containers = {container["name"]: container for container in pod["containers"]}
    proxy, app = containers["hsm-proxy"], containers["app"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    args = _parser().parse_args(proxy["args"])
    config_path = Path(args.config)
    mount, volume = _mount_source(proxy, volumes, config_path)
    config_map = documents["ConfigMap"]
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    text = config_map["data"][config_path.name]
    config = parse_config(tomllib.loads(text), config_path.parent, str(config_path))
    # The PIN and the chain come from Kubernetes secrets, read-only, the PIN not world-readable.
    assert config.token.pin.file is not None
    assert config.tls.certificate.file is not None
    for path, key in ((config.token.pin.file, "pin"), (config.tls.certificate.file, "chain.pem")):
        mount, volume = _mount_source(proxy, volumes, path)
        assert mount["readOnly"] is True
        assert "secret" in volume
        assert path.name == key
    pin_volume = _mount_source(proxy, volumes, config.token.pin.file)[1]
    assert pin_volume["secret"]["defaultMode"] & 0o007 == 0
    assert pod["securityContext"]["fsGroup"] == proxy["securityContext"]["runAsUser"]
    # Ports, upstream and probes agree with the config.
    ports = {port["name"]: port["containerPort"] for port in proxy["ports"]}
    assert ports["https"] == config.listen.port
    assert config.admin is not None
    assert ports["admin"] == config.admin.listen.port
    assert config.admin.allow_public  # the kubelet probes the pod IP
    assert proxy["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert proxy["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert config.upstream.host == "127.0.0.1"
    assert config.upstream.port == app["ports"][0]["containerPort"]
    security = proxy["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["runAsNonRoot"] is True


@pytest.mark.parametrize("name", ["compose.yaml", "kubernetes/pod.yaml"])
def test_deploy_yaml_holds_no_secret_value(name: str) -> None:
    text = (DEPLOY / name).read_text()
    for document in yaml.safe_load_all(text):
        if document and document.get("kind") == "Secret":
            raise AssertionError("secrets are created with kubectl, never committed")
    assert "pin-value" not in text
