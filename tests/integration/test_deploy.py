"""deploy/: the image built and run for real, and everything else short of a cluster.

deploy/test-docker.sh builds deploy/Dockerfile (on a base image it makes with debootstrap
when no registry is reachable), serves requests through `dev` and `run` in containers and
brings up the compose example; the test here runs it when a Docker engine answers or can be
started, and skips, saying why, otherwise. The Dockerfile's instructions are also checked
against the repository. The systemd unit goes through `systemd-analyze verify` and
`security`; the Kubernetes manifests are validated against the API schemas
(kubernetes-validate, in .venv-kubernetes); the compose file and the Kubernetes pod are
parsed, their proxy command lines go through the real argument parser, and the pod's
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
            instructions.append((keyword.upper(), " ".join(rest.split())))
    return instructions


def test_dockerfile_is_debian_non_root_and_built_by_the_setup_script() -> None:
    instructions = _instructions()
    froms = [rest for keyword, rest in instructions if keyword == "FROM"]
    assert froms == ["${BASE_IMAGE}"]
    assert ("ARG", "DEBIAN_RELEASE=bookworm") in instructions
    assert ("ARG", "BASE_IMAGE=debian:${DEBIAN_RELEASE}-slim") in instructions
    workdir = next(rest for keyword, rest in instructions if keyword == "WORKDIR")
    runs = [rest for keyword, rest in instructions if keyword == "RUN"]
    # The only build step that installs anything is the shared set-up script, and the CA
    # bundle reaches it only as a BuildKit secret (a tmpfs for that one step).
    secret = "--mount=type=secret,id=ca-bundle,required=false"
    assert runs[0].startswith(f"{secret} ./deploy/setup.sh ")
    assert "--extra-ca /run/secrets/ca-bundle" in runs[0]
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


@pytest.mark.slow
def test_docker_image_serves_dev_run_and_the_compose_sidecar_for_real() -> None:
    """deploy/test-docker.sh end to end; its exit status 77 means no Docker engine here."""
    result = subprocess.run(
        [str(DEPLOY / "test-docker.sh")],
        capture_output=True,
        text=True,
        check=False,
        timeout=3600,  # a first run debootstraps a base image and builds; later ones reuse both
    )
    output = result.stdout + result.stderr
    if result.returncode == 77:
        pytest.skip(f"deploy/test-docker.sh did not run: {result.stdout.strip().splitlines()[-1]}")
    assert result.returncode == 0, output
    for check in ("no trace of the CA bundle", "dev serves https", "run --config", "compose"):
        assert any(
            line.startswith("test-docker.sh: ok: ") and check in line
            for line in result.stdout.splitlines()
        ), output
    assert result.stdout.splitlines()[-1] == "test-docker.sh: passed", output


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "cannot read the file"), ("not a certificate\n", "no PEM certificate in it")],
)
def test_setup_refuses_an_extra_ca_that_is_not_a_pem_bundle(
    tmp_path: Path, content: str | None, message: str
) -> None:
    bundle = tmp_path / "ca.pem"
    if content is not None:
        bundle.write_text(content)
    result = subprocess.run(
        [str(DEPLOY / "setup.sh"), "--no-apt", "--extra-ca", str(bundle)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.startswith(f"setup.sh: error: --extra-ca {bundle}: {message}")


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
    # Both run the image deploy/Dockerfile builds; the app is its demo upstream (no registry).
    for service in (app, proxy):
        assert service["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
        assert service["image"] == "${HSM_PROXY_IMAGE:-hsm-proxy}"
    assert (DEPLOY / ".." / proxy["build"]["dockerfile"]).exists()
    args = _parser().parse_args(proxy["command"])
    assert app["entrypoint"][1:] == ["-m", "proxy.commands.demo"]
    assert args.upstream == f"http://{app['command'][0]}"
    listen_port = args.listen.rsplit(":", 1)[1]
    assert app["ports"] == [f"${{HSM_PROXY_PUBLISH:-{listen_port}:{listen_port}}}"]
    assert args.admin.startswith("127.0.0.1:")
    assert proxy["read_only"] is True
    assert proxy["cap_drop"] == ["ALL"]
    # The dev state (token, PIN, CA) lives in a volume at the image's XDG_STATE_HOME.
    assert "proxy-state:/var/lib/hsm-proxy" in proxy["volumes"]
    assert "XDG_STATE_HOME=/var/lib/hsm-proxy" in (DEPLOY / "Dockerfile").read_text()


KUBERNETES_VALIDATE = REPO / ".venv-kubernetes" / "bin" / "kubernetes-validate"


def _kubernetes_validate(path: Path, version: str) -> subprocess.CompletedProcess[str]:
    if not KUBERNETES_VALIDATE.exists():
        pytest.fail(f"{KUBERNETES_VALIDATE} is missing: run deploy/setup.sh --test")
    return subprocess.run(
        [str(KUBERNETES_VALIDATE), "--strict", "--kubernetes-version", version, str(path)],
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.parametrize("version", ["1.25.0", "1.37.0"])
@pytest.mark.parametrize(
    "manifest", sorted((DEPLOY / "kubernetes").glob("*.yaml")), ids=lambda path: path.name
)
def test_kubernetes_manifests_match_the_api_schemas(
    tmp_path: Path, manifest: Path, version: str
) -> None:
    result = _kubernetes_validate(manifest, version)
    assert result.returncode == 0, result.stdout + result.stderr
    kinds = {document["kind"] for document in yaml.safe_load_all(manifest.read_text())}
    for kind in kinds:
        assert f"for resource {kind.lower()}/" in result.stdout
    # The same validator refuses a field the API does not have, in every kind of document.
    for kind in kinds:
        documents = list(yaml.safe_load_all(manifest.read_text()))
        for document in documents:
            if document["kind"] == kind:
                document["unknownField"] = True
        broken = tmp_path / f"broken-{kind}.yaml"
        broken.write_text(yaml.safe_dump_all(documents))
        refused = _kubernetes_validate(broken, version)
        assert refused.returncode != 0, refused.stdout
        assert "unknownField" in refused.stdout + refused.stderr


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
