"""The side-by-side benchmark: this proxy against nginx, on one machine, in one run.

Theory of operation. :func:`main` makes everything in one temporary directory: a SoftHSM2
token holding a P-256 key (made with the project's own provisioning helpers), a dev CA that
issues one certificate for the token key and one for a software key, a loopback backend
(nginx, plaintext, answering 100 bytes, 64 KiB or 1 MiB), and the contenders:

* ``proxy``: ``hsm-proxy run`` (one process) on the token key;
* ``proxy-2w``: the same with ``--workers 2``, when the proxy has that option;
* ``nginx``: nginx, one worker, the software key (the ceiling);
* ``nginx-engine``: nginx, one worker, the token key through the libp11 ``pkcs11`` engine.

Scenario 1r repeats scenario 1 with an RSA-2048 token key, for ``proxy``, ``proxy-2w``
and ``nginx-engine``: on a 2-core machine the client's side of a P-256 handshake costs
more CPU than the server's, so ``--workers 2`` cannot show how it scales there; an RSA
signature is expensive for the server and cheap for the client to verify (the issue's
own advice).

Scenario 7 is HTTP/2: h2load with ``H2_CLIENTS`` connections of ``H2_STREAMS`` concurrent
streams each, 100-byte responses (nginx with HTTP/2 on; the proxy forwards each stream as
an HTTP/1.1 request). Scenario 7p is "page loads": ``PAGE_REQUESTS`` parallel requests on
new connections, as a browser loads a page, over HTTP/1.1 (one connection per request,
h2load --h1) and over HTTP/2 (one connection); the token signatures (nginx: full
handshakes) per page load are counted for each.

Scenarios 2a/2b run a second set of token contenders on the delaying PKCS#11 module
(tests/faulthsm, when the repository has it). The front ends are pinned to one core, the
load generator (wrk, or idle_client.py for scenario 5) and the backend to another.

Every measurement samples, before and after: the CPU time of each contender process (all
threads, all children), of the client (rusage) and of the backend, and the machine's total
busy time from /proc/stat; what nobody of ours used is foreign CPU, and a run with more
than ``FOREIGN_LIMIT`` cores of it is flagged as disturbed. The repetitions are
interleaved (every repetition runs every scenario, contenders in a fresh random order), so
a noisy minute hurts every contender a little rather than one a lot.

Handshakes are checked on the server side: the proxy writes one ``token_signature`` audit
line per token signature, nginx logs ``$ssl_session_reused`` per request; both are counted
against the client's request count. wrk keeps and resumes TLS sessions on reconnects, so
the full-handshake scenarios preload ``noresume.c`` into it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import random
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bench.report import RESUMED_UNIT, Run, Unavailable, write_results
from proxy.commands.devstate import find_softhsm_module, use_softhsm_config
from proxy.pkcs11.provision import generate_key, initialize_token
from proxy.pkcs11.token import Token
from proxy.pkcs11.uri import KeyURI
from proxy.tls.certificates import DevCA

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
HSM_PROXY = REPO / ".venv" / "bin" / "hsm-proxy"
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
PY_SPY = BENCH / ".tools" / "bin" / "py-spy"  # bench/run.sh --profile DIR installs it
ENGINE_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/engines-3/pkcs11.so",
    "/usr/lib/aarch64-linux-gnu/engines-3/pkcs11.so",
)
FAULTHSM_SOURCE = REPO / "tests" / "faulthsm" / "faulthsm.c"
TOKEN_LABEL = "bench"  # noqa: S105 - a label, not a secret
KEY_LABEL = "bench-p256"
KEY_ID = b"\x01"
RSA_KEY_LABEL = "bench-rsa2048"
RSA_KEY_ID = b"\x02"
RSA_SCENARIO = "1r"
# The proxy's token session pool: its default, and more where each signature is slow
# (with 10 ms per signature, 4 sessions cap the proxy at 400 handshakes/s).
PROXY_SESSIONS = 4
PROXY_SESSIONS_DELAYED = 16
CONNECTIONS = 32  # wrk connections for scenarios 1, 2, 3 and 6
H2_CLIENTS = 32  # scenario 7: h2load connections ...
H2_STREAMS = 10  # ... and concurrent streams on each
# Idle upstream connections kept, by the proxy and nginx alike: enough for the streams of
# scenario 7 in flight at once, so that they do not reconnect for every request.
UPSTREAM_KEEPALIVE = H2_CLIENTS * H2_STREAMS
PAGE_REQUESTS = 6  # scenario 7p: the parallel requests of one page load
PAGE_LOADS = 10  # scenario 7p: page loads per protocol and repetition
THROUGHPUT_CONNECTIONS = 8  # scenario 4
IDLE_CONNECTIONS = 5000  # scenario 5
# Foreign CPU (used by processes not ours) during a run before it counts as disturbed: on
# the whole machine, in cores, and on the front end's core, as a share of that core.
FOREIGN_LIMIT = 0.25
FOREIGN_FRONT_LIMIT = 0.10
SMALL_BODY = b"x" * 99 + b"\n"  # 100 bytes
MEDIUM_BODY = 65536  # scenario 4b
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
DELAYS = {"2a": 2.0, "2b": 10.0}
FULL_HANDSHAKE_SCENARIOS = ("1", RSA_SCENARIO, *DELAYS)


H2_SCENARIOS = ("7", "7p")
H2_PAGE_UNITS = {
    "h1": "token signatures per page load, HTTP/1.1",
    "h2": "token signatures per page load, HTTP/2",
}


def variant_of(scenario: str) -> str:
    """Which set of contenders a scenario runs on: the delayed token, the RSA key, or the
    plain ones (every other scenario)."""
    if scenario in DELAYS:
        return scenario
    return "rsa" if scenario == RSA_SCENARIO else "plain"


ERROR_LIMIT = 0.01  # a run with more client errors than this share counts as failed


def say(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


# --- /proc accounting --------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()  # fields from 3 (state) on


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                children.setdefault(int(_stat_fields(int(entry.name))[1]), []).append(
                    int(entry.name)
                )
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def cpu_seconds(pids: Sequence[int]) -> dict[int, float]:
    """utime + stime of each process (all its threads), in seconds."""
    result = {}
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = _stat_fields(pid)
            result[pid] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return result


def kernel_seconds(pids: Sequence[int]) -> float:
    """stime of the processes (all their threads), in seconds: their CPU inside the kernel."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += int(_stat_fields(pid)[12]) / CLOCK_TICKS
    return total


def context_switches(pids: Sequence[int]) -> int:
    """Voluntary and involuntary context switches of every thread of the processes (a
    thread that exited takes its count along; trio keeps its worker threads for a while)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{pid}/task").iterdir():
                with contextlib.suppress(OSError):
                    for line in (task / "status").read_text().splitlines():
                        if "ctxt_switches:" in line:
                            total += int(line.split()[1])
    return total


def machine_busy_seconds(cores: str | None = None) -> float:
    """Busy CPU time since boot of the whole machine, or of the listed cores ("0,2")."""
    wanted = {f"cpu{core}" for core in cores.split(",")} if cores else {"cpu"}
    total = 0
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name in wanted:
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, values[:8])
            total += user + nice + system + irq + softirq + steal
    return total / CLOCK_TICKS


def rss_kib(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited early:\n{log.read_text(errors='replace')[-3000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port}:\n{log.read_text(errors='replace')}")


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            for pid in reversed(process_tree(process.pid)):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            process.wait()


def raise_fd_limit() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = IDLE_CONNECTIONS * 3 + 1000
    if hard != resource.RLIM_INFINITY and hard < wanted:
        raise RuntimeError(f"the open-file limit is {hard}; the bench needs {wanted}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


# --- material ------------------------------------------------------------------------------


@dataclass
class Material:
    work: Path
    module: str
    pin: str
    pin_file: Path
    key_uri: KeyURI
    token_chain: Path
    rsa_key_uri: KeyURI
    rsa_chain: Path
    software_chain: Path
    software_key: Path
    softhsm_conf: Path
    faulthsm: str | None  # the delaying PKCS#11 module, when the repository has it
    noresume: Path


def provision(work: Path) -> Material:
    conf = use_softhsm_config(work / "softhsm")
    module = find_softhsm_module()
    pin = secrets.token_hex(12)
    initialize_token(module, TOKEN_LABEL, secrets.token_hex(12), pin)
    generate_key(module, TOKEN_LABEL, pin, KEY_LABEL, KEY_ID, "P-256")
    generate_key(module, TOKEN_LABEL, pin, RSA_KEY_LABEL, RSA_KEY_ID, "RSA-2048")
    uri = KeyURI(token=TOKEN_LABEL, object=KEY_LABEL, id=KEY_ID)
    rsa_uri = KeyURI(token=TOKEN_LABEL, object=RSA_KEY_LABEL, id=RSA_KEY_ID)
    with Token(module, uri, pin, pool_size=1) as token:
        public = token.find_private_key(uri).info.public_key_der
        rsa_public = token.find_private_key(rsa_uri).info.public_key_der
    assert public is not None
    assert rsa_public is not None
    pin_file = work / "pin"
    pin_file.write_text(pin)
    pin_file.chmod(0o600)
    ca = DevCA.create("hsm-proxy bench CA")
    names = ("localhost", "127.0.0.1")
    (work / "ca.pem").write_bytes(ca.pem())
    token_chain = work / "token-chain.pem"
    token_chain.write_bytes(ca.issue(public, names))
    rsa_chain = work / "rsa-chain.pem"
    rsa_chain.write_bytes(ca.issue(rsa_public, names))
    software = ec.generate_private_key(ec.SECP256R1())
    software_key = work / "software-key.pem"
    software_key.write_bytes(
        software.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    software_key.chmod(0o600)
    software_chain = work / "software-chain.pem"
    software_public = software.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    software_chain.write_bytes(ca.issue(software_public, names))
    noresume = work / "noresume.so"
    compile_c(BENCH / "noresume.c", noresume)
    faulthsm = None
    if FAULTHSM_SOURCE.exists():
        faulthsm_path = work / "libfaulthsm.so"
        compile_c(FAULTHSM_SOURCE, faulthsm_path)
        faulthsm = str(faulthsm_path)
    return Material(
        work,
        module,
        pin,
        pin_file,
        uri,
        token_chain,
        rsa_uri,
        rsa_chain,
        software_chain,
        software_key,
        conf,
        faulthsm,
        noresume,
    )


def compile_c(source: Path, output: Path) -> None:
    subprocess.run(
        ["gcc", "-shared", "-fPIC", "-O2", "-o", str(output), str(source), "-ldl"], check=True
    )


# --- processes: backend and contenders ---------------------------------------------------

NGINX_COMMON = """
worker_processes 1;
{user}
daemon off;
master_process on;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
worker_rlimit_nofile {nofile};
{env}
events {{ worker_connections {connections}; }}
http {{
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  {http}
}}
"""


class Pinned:
    """A process started under ``taskset`` with its log in the work directory."""

    def __init__(self, name: str, work: Path, cores: str) -> None:
        self.name = name
        self.dir = work / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = self.dir / "process.log"
        self.cores = cores
        self.process: subprocess.Popen[bytes] | None = None

    def launch(self, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                ["taskset", "-c", self.cores, *argv],
                stdout=log,
                stderr=log,
                env={**os.environ, **env},
                cwd=self.dir,
            )
        return self.process

    def pids(self) -> list[int]:
        assert self.process is not None
        return process_tree(self.process.pid)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
            self.process = None


def nginx_config(directory: Path, env: Sequence[str], http: str) -> Path:
    for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (directory / name).mkdir(exist_ok=True)
    config = directory / "nginx.conf"
    config.write_text(
        NGINX_COMMON.format(
            user="user root;" if os.geteuid() == 0 else "",
            dir=directory,
            nofile=IDLE_CONNECTIONS * 3 + 1000,
            connections=IDLE_CONNECTIONS * 3,
            env="\n".join(f"env {name};" for name in env),
            http=http,
        )
    )
    return config


class Backend(Pinned):
    """Plaintext nginx on loopback: /small answers 100 bytes, /medium 64 KiB, /large 1 MiB."""

    def start(self) -> None:
        self.port = free_port()
        (self.dir / "large").write_bytes(os.urandom(1024 * 1024))
        (self.dir / "medium").write_bytes(os.urandom(MEDIUM_BODY))
        http = f"""
  access_log off;
  sendfile on;
  server {{
    listen 127.0.0.1:{self.port} backlog=4096;
    location = /small {{ default_type text/plain; return 200 "{SMALL_BODY.decode().strip()}\\n"; }}
    location = /large {{ alias {self.dir}/large; default_type application/octet-stream; }}
    location = /medium {{ alias {self.dir}/medium; default_type application/octet-stream; }}
  }}"""
        config = nginx_config(self.dir, [], http)
        process = self.launch(["nginx", "-e", str(self.dir / "error.log"), "-c", str(config)], {})
        wait_for_port(self.port, process, "backend nginx", self.log)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class Contender(Pinned):
    kind = ""

    def __init__(
        self, name: str, work: Path, cores: str, material: Material, backend: Backend
    ) -> None:
        super().__init__(name, work, cores)
        self.material = material
        self.backend = backend
        self.port = 0
        self.delay_ms: float | None = None
        self.rsa = False  # serve the RSA-2048 token key (scenario 1r)

    def token_env(self) -> dict[str, str]:
        env = {"SOFTHSM2_CONF": str(self.material.softhsm_conf)}
        if self.delay_ms is not None:
            env["FAULTHSM_MODULE"] = self.material.module
            env["FAULTHSM_DELAY_MS"] = f"{self.delay_ms:g}"
        return env

    def token_module(self) -> str:
        if self.delay_ms is not None:
            assert self.material.faulthsm is not None
            return self.material.faulthsm
        return self.material.module

    def start(self) -> None:
        raise NotImplementedError

    def restart(self) -> None:
        self.stop()
        self.start()

    def died(self) -> bool:
        return self.process is None or self.process.poll() is not None

    def log_mark(self) -> int:
        raise NotImplementedError

    def handshakes_since(self, mark: int) -> dict[str, int]:
        """Server-side counts since ``mark``: full handshakes, resumed ones, signatures."""
        raise NotImplementedError


class ProxyContender(Contender):
    def __init__(self, *args: Any, workers: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.workers = workers
        self.log_level = "info"  # the audit lines are how the bench counts token signatures

    def start(self) -> None:
        self.port = free_port()
        config = self.dir / "proxy.toml"
        chain, key_uri = self.material.token_chain, self.material.key_uri
        if self.rsa:
            chain, key_uri = self.material.rsa_chain, self.material.rsa_key_uri
        config.write_text(
            f'listen = "127.0.0.1:{self.port}"\n'
            f'upstream = "{self.backend.url}"\n\n'
            "[token]\n"
            f'module = "{self.token_module()}"\n'
            f'pin_file = "{self.material.pin_file}"\n'
            f"sessions = {PROXY_SESSIONS if self.delay_ms is None else PROXY_SESSIONS_DELAYED}\n\n"
            "[tls]\n"
            f'certificate = "{chain}"\n'
            f'key = "{key_uri}"\n\n'
            "[http]\n"
            f"max_connections = {IDLE_CONNECTIONS * 3}\n"  # as nginx's worker_connections
            f"pool_size = {UPSTREAM_KEEPALIVE}\n"
        )
        argv = [str(HSM_PROXY), "--log-format", "json", "--log-level", self.log_level, "run"]
        argv += ["--config", str(config)]
        if self.workers > 1:
            argv += ["--workers", str(self.workers)]
        process = self.launch(argv, self.token_env())
        wait_for_port(self.port, process, self.name, self.log)

    def log_mark(self) -> int:
        return self.log.stat().st_size

    def handshakes_since(self, mark: int) -> dict[str, int]:
        signatures = failures = 0
        with self.log.open("rb") as log:
            log.seek(mark)
            for line in log:
                if b'"token_signature"' in line and b'"connection_id"' in line:
                    if b'"result": "ok"' in line:
                        signatures += 1
                    else:
                        failures += 1
        return {"token_signatures": signatures, "failed_token_signatures": failures}


class NginxContender(Contender):
    def __init__(self, *args: Any, engine: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.engine = engine

    def start(self) -> None:
        self.port = free_port()
        env = {}
        if self.engine:
            openssl_conf = self.dir / "openssl.cnf"
            openssl_conf.write_text(
                "openssl_conf = openssl_init\n"
                "[openssl_init]\nengines = engine_section\n"
                "[engine_section]\npkcs11 = pkcs11_section\n"
                "[pkcs11_section]\n"
                "engine_id = pkcs11\n"
                f"dynamic_path = {engine_path()}\n"
                f"MODULE_PATH = {self.token_module()}\n"
                f"PIN = {self.material.pin}\n"
            )
            openssl_conf.chmod(0o600)
            env = {"OPENSSL_CONF": str(openssl_conf), **self.token_env()}
            label, certificate = KEY_LABEL, self.material.token_chain
            if self.rsa:
                label, certificate = RSA_KEY_LABEL, self.material.rsa_chain
            uri = f"pkcs11:token={TOKEN_LABEL};object={label};type=private"
            key = f"engine:pkcs11:{uri}"
        else:
            certificate, key = self.material.software_chain, str(self.material.software_key)
        http = f"""
  log_format bench '$ssl_session_reused $ssl_protocol $status $connection';
  access_log {self.dir}/access.log bench;
  upstream backend {{ server 127.0.0.1:{self.backend.port}; keepalive {UPSTREAM_KEEPALIVE}; }}
  server {{
    listen 127.0.0.1:{self.port} ssl{nginx_http2_listen()} backlog=4096;
    {nginx_http2_directive()}
    ssl_certificate {certificate};
    ssl_certificate_key "{key}";
    ssl_protocols TLSv1.2 TLSv1.3;
    location / {{
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffers 8 64k;
      proxy_max_temp_file_size 0;
    }}
  }}"""
        config = nginx_config(self.dir, sorted(env), http)
        (self.dir / "access.log").touch()
        process = self.launch(["nginx", "-e", str(self.dir / "error.log"), "-c", str(config)], env)
        wait_for_port(self.port, process, self.name, self.log)

    def log_mark(self) -> int:
        return (self.dir / "access.log").stat().st_size

    def handshakes_since(self, mark: int) -> dict[str, int]:
        full = resumed = 0
        with (self.dir / "access.log").open("rb") as log:
            log.seek(mark)
            for line in log:
                if line.startswith(b"r "):
                    resumed += 1
                elif line.startswith(b". "):
                    full += 1
        return {"full_handshakes": full, "resumed_handshakes": resumed}

    def full_handshake_connections_since(self, mark: int) -> int:
        """Connections that began with a full handshake (its requests share a $connection)."""
        connections = set()
        with (self.dir / "access.log").open("rb") as log:
            log.seek(mark)
            for line in log:
                if line.startswith(b". "):
                    connections.add(line.split()[-1])
        return len(connections)


def nginx_version() -> tuple[int, ...]:
    completed = subprocess.run(["nginx", "-v"], capture_output=True, text=True, check=False)
    version = completed.stderr.strip().rpartition("/")[2].split()[0]
    return tuple(int(part) for part in version.split(".") if part.isdigit())


def nginx_http2_listen() -> str:
    """HTTP/2 on a TLS listener: ``listen ... ssl http2`` before nginx 1.25.1 (Debian 12's
    1.22), the ``http2 on`` directive since (Debian 13's 1.26)."""
    return " http2" if nginx_version() < (1, 25, 1) else ""


def nginx_http2_directive() -> str:
    return "http2 on;" if nginx_version() >= (1, 25, 1) else ""


def engine_path() -> str:
    for candidate in ENGINE_CANDIDATES:
        if Path(candidate).exists():
            return candidate
    raise RuntimeError("the libp11 engine is missing: apt-get install libengine-pkcs11-openssl")


def proxy_has_workers() -> bool:
    completed = subprocess.run(
        [str(HSM_PROXY), "run", "--help"], capture_output=True, text=True, check=False
    )
    return "--workers" in completed.stdout


# --- clients -------------------------------------------------------------------------------


@dataclass
class Cores:
    frontend: str
    client: str
    backend: str
    all: str


def choose_cores() -> Cores:
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2:
        raise RuntimeError("the bench needs at least 2 CPU cores (front end and client apart)")
    front, client = available[0], available[1]
    backend = available[2] if len(available) > 2 else client
    return Cores(str(front), str(client), str(backend), ",".join(map(str, available)))


def run_wrk(
    cores: Cores,
    port: int,
    path: str,
    connections: int,
    seconds: float,
    *,
    close: bool,
    noresume: Path | None,
) -> dict[str, Any]:
    argv = ["taskset", "-c", cores.client, "wrk", "-t1", f"-c{connections}"]
    argv += [f"-d{max(1, round(seconds))}s", "--timeout", "10s", "-s", str(BENCH / "summary.lua")]
    argv.append(f"https://127.0.0.1:{port}{path}")
    if close:
        argv += ["--", "Connection: close"]
    env = {**os.environ}
    if noresume is not None:
        env["LD_PRELOAD"] = str(noresume)
    completed = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    for line in completed.stdout.splitlines():
        if line.startswith("{"):
            return json.loads(line)  # type: ignore[no-any-return]
    raise RuntimeError(
        f"wrk failed ({completed.returncode}): {completed.stderr or completed.stdout}"
    )


def run_h2load(
    cores: Cores,
    port: int,
    path: str,
    *,
    clients: int,
    streams: int,
    requests: int,
    http1: bool = False,
) -> dict[str, Any]:
    """h2load (nghttp2-client): ``requests`` over ``clients`` connections of ``streams``
    concurrent streams each; its counts and rate."""
    argv = ["taskset", "-c", cores.client, "h2load", "-t1", f"-c{clients}", f"-m{streams}"]
    argv.append(f"-n{requests}")
    if http1:
        argv.append("--h1")
    argv.append(f"https://127.0.0.1:{port}{path}")
    completed = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=300)
    out = completed.stdout
    figures: dict[str, Any] = {}
    for line in out.splitlines():
        words = line.replace(",", "").split()
        if line.startswith("finished in"):
            figures["rate"] = float(words[3])  # "finished in 5.00s, 1234.5 req/s, ..."
        elif line.startswith("requests:"):
            figures["requests"] = int(words[7])  # succeeded
            figures["errors"] = {"failed": int(words[9]), "errored": int(words[11])}
        elif line.startswith("Application protocol:"):
            figures["protocol"] = words[2]
    if "requests" not in figures:
        raise RuntimeError(f"h2load failed ({completed.returncode}): {completed.stderr or out}")
    return figures


# --- measuring -------------------------------------------------------------------------------


@dataclass
class Window:
    """CPU accounting around one measurement."""

    contender: Contender
    backend: Backend
    started: float = 0.0
    busy: float = 0.0
    front: dict[int, float] = field(default_factory=dict)
    back: dict[int, float] = field(default_factory=dict)
    client: float = 0.0
    own: float = 0.0
    front_busy: float = 0.0
    front_kernel: float = 0.0
    front_switches: int = 0

    def __enter__(self) -> Window:
        self.front = cpu_seconds(self.contender.pids())
        self.front_kernel = kernel_seconds(self.contender.pids())
        self.front_switches = context_switches(self.contender.pids())
        self.back = cpu_seconds(self.backend.pids())
        self.client = children_cpu_seconds()
        self.own = sum(cpu_seconds([os.getpid()]).values())
        self.busy = machine_busy_seconds()
        self.front_busy = machine_busy_seconds(self.contender.cores)
        self.started = time.monotonic()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.wall = time.monotonic() - self.started
        busy = machine_busy_seconds() - self.busy
        front_busy = machine_busy_seconds(self.contender.cores) - self.front_busy

        def used(before: dict[int, float], after: dict[int, float]) -> float:
            return sum(after[pid] - before.get(pid, 0.0) for pid in after)

        self.front_cpu = used(self.front, cpu_seconds(self.contender.pids()))
        self.front_kernel = kernel_seconds(self.contender.pids()) - self.front_kernel
        self.front_switches = context_switches(self.contender.pids()) - self.front_switches
        back_cpu = used(self.back, cpu_seconds(self.backend.pids()))
        self.client_cpu = children_cpu_seconds() - self.client
        own_cpu = sum(cpu_seconds([os.getpid()]).values()) - self.own
        ours = self.front_cpu + back_cpu + self.client_cpu + own_cpu
        self.foreign_cores = max(0.0, busy - ours) / self.wall
        self.front_share = self.front_cpu / self.wall
        # Others on the front end's own core(s) (the client and backend run elsewhere,
        # unless there are only two cores and the front end has both, as proxy-2w does).
        self.foreign_front = max(0.0, front_busy - self.front_cpu) / self.wall
        if len(self.contender.cores.split(",")) > 1:
            self.foreign_front = self.foreign_cores

    @property
    def disturbed(self) -> bool:
        return self.foreign_front > FOREIGN_FRONT_LIMIT or self.foreign_cores > FOREIGN_LIMIT


def measured(
    scenario: str,
    name: str,
    repetition: int,
    figures: dict[str, float],
    checks: dict[str, Any],
    window: Window,
    failed: bool,
) -> Run:
    """One measurement as runs.json keeps it: figures rounded, the window's foreign CPU."""
    return Run(
        scenario,
        name,
        repetition,
        {unit: round(value, 3) for unit, value in figures.items()},
        checks,
        round(window.foreign_cores, 3),
        window.disturbed,
        failed=failed,
    )


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.cores = choose_cores()
        self.runs: list[Run] = []
        self.unavailable: list[Unavailable] = []
        self.contenders: dict[tuple[str, str], Contender] = {}
        self.started: list[Pinned] = []
        self.incidents: list[str] = []

    # setting up

    def setup(self) -> None:
        say(f"work directory {self.work}")
        self.material = provision(self.work)
        self.backend = Backend("backend", self.work, self.cores.backend)
        self.started.append(self.backend)
        self.backend.start()
        scenarios = self.args.scenarios
        has_workers = proxy_has_workers()
        for scenario in scenarios:
            for name in self.contenders_for(scenario, has_workers):
                self.contender(name, scenario)

    def contenders_for(self, scenario: str, has_workers: bool) -> list[str]:
        names = ["proxy", "proxy-2w", "nginx", "nginx-engine"]
        if scenario == RSA_SCENARIO:
            names = ["proxy", "proxy-2w", "nginx-engine"]
        if scenario in DELAYS:
            names = ["proxy", "proxy-2w", "nginx-engine"]
            if self.material.faulthsm is None:
                for name in names:
                    self.unavailable.append(
                        Unavailable(
                            scenario,
                            name,
                            "the delaying PKCS#11 module (tests/faulthsm) is not in this checkout",
                        )
                    )
                return []
        if not has_workers:
            names.remove("proxy-2w")
            self.unavailable.append(
                Unavailable(scenario, "proxy-2w", "hsm-proxy run has no --workers option yet")
            )
        if self.args.contenders is not None:
            names = [name for name in names if name in self.args.contenders]
        return names

    def contender(self, name: str, scenario: str) -> Contender:
        variant = variant_of(scenario)
        key = (name, variant)
        if key in self.contenders:
            return self.contenders[key]
        directory = f"{name}-{variant}"
        cores = self.cores.frontend
        contender: Contender
        if name == "proxy":
            contender = ProxyContender(directory, self.work, cores, self.material, self.backend)
        elif name == "proxy-2w":
            two = self.cores.all if len(self.cores.all.split(",")) <= 2 else "0,2"
            contender = ProxyContender(
                directory, self.work, two, self.material, self.backend, workers=2
            )
        else:
            contender = NginxContender(
                directory,
                self.work,
                cores,
                self.material,
                self.backend,
                engine=name == "nginx-engine",
            )
        if variant in DELAYS:
            contender.delay_ms = DELAYS[variant]
        contender.rsa = variant == "rsa"
        self.started.append(contender)
        say(f"starting {name} ({variant})")
        contender.start()
        self.contenders[key] = contender
        return contender

    def stop_all(self) -> None:
        for process in reversed(self.started):
            with contextlib.suppress(Exception):
                process.stop()

    # measuring

    def measure(self, scenario: str, name: str, repetition: int) -> Run:
        contender = self.contenders[(name, variant_of(scenario))]
        assert contender.process is not None
        if contender.process.poll() is not None:
            incident = (
                f"{contender.name} exited with status {contender.process.returncode} before "
                f"scenario {scenario} repetition {repetition + 1}; restarted"
            )
            say(incident)
            self.incidents.append(incident)
            contender.restart()
        seconds = self.args.seconds
        if scenario == "5":
            return self.measure_memory(contender, name, repetition)
        if scenario == "7":
            return self.measure_h2(contender, name, repetition)
        if scenario == "7p":
            return self.measure_pages(contender, name, repetition)
        full = scenario in FULL_HANDSHAKE_SCENARIOS
        path = {"4": "/large", "4b": "/medium"}.get(scenario, "/small")
        connections = THROUGHPUT_CONNECTIONS if scenario == "4" else CONNECTIONS
        close = full or scenario == "6"
        noresume = self.material.noresume if full else None
        if repetition == 0:  # warm up: thread pools, upstream pools, allocator
            run_wrk(
                self.cores, contender.port, path, connections, 1, close=close, noresume=noresume
            )
        mark = contender.log_mark()
        profiler = self.start_profiler(contender, scenario, repetition)
        sampler = self.start_perf(contender, scenario, repetition)
        with Window(contender, self.backend) as window:
            result = run_wrk(
                self.cores,
                contender.port,
                path,
                connections,
                seconds,
                close=close,
                noresume=noresume,
            )
        if profiler is not None:
            profiler.wait()
        if sampler is not None:
            sampler.send_signal(signal.SIGINT)
            sampler.wait()
        time.sleep(0.2)  # let the last log lines land
        counts = contender.handshakes_since(mark)
        if scenario in ("3", "4", "4b") and isinstance(contender, NginxContender):
            counts = {}  # $ssl_session_reused is per request: it says nothing here
        requests = result["requests"]
        duration = result["duration_us"] / 1e6
        rate = requests / duration
        share = max(window.front_share, 1e-6)
        figures: dict[str, float] = {}
        if scenario in ("4", "4b"):
            megabytes = result["bytes"] / 1e6 / duration
            figures = {"MB/s": megabytes, "MB/s per core": megabytes / share}
        elif scenario == "3":
            figures = {
                "requests/s": rate,
                "requests/s per core": rate / share,
                "ms p50": result["p50_us"] / 1000,
                "ms p99": result["p99_us"] / 1000,
            }
        else:
            figures = {"handshakes/s": rate, "handshakes/s per core": rate / share}
        if scenario == "6" and name != "nginx":
            # Each of wrk's connection slots starts with one full handshake; what matters is
            # what the resumed ones after it cost. nginx + engine signs once per full one.
            signatures = counts.get("token_signatures", counts.get("full_handshakes", 0))
            figures[RESUMED_UNIT] = (
                1000 * max(0, signatures - CONNECTIONS) / max(requests - CONNECTIONS, 1)
            )
        checks = {
            "client_requests": requests,
            "client_errors": result["errors"],
            "client_error_share": round(
                sum(result["errors"].values()) / max(requests + sum(result["errors"].values()), 1),
                4,
            ),
            "frontend_cpu_share": round(window.front_share, 3),
            # For bench/breakdown.py: CPU per operation, and how much of it the kernel's.
            "frontend_cpu_seconds": round(window.front_cpu, 3),
            "frontend_kernel_seconds": round(window.front_kernel, 3),
            "frontend_context_switches": window.front_switches,
            "client_cpu_share": round(window.client_cpu / window.wall, 3),
            "foreign_cpu_on_frontend_core": round(window.foreign_front, 3),
            **counts,
        }
        run = measured(
            scenario,
            name,
            repetition,
            figures,
            checks,
            window,
            failed=checks["client_error_share"] > ERROR_LIMIT or contender.died(),
        )
        say(
            f"  {scenario} {name:<13} rep {repetition}: {_brief(figures)} {counts} "
            f"cpu {window.front_share:.2f} client {window.client_cpu / window.wall:.2f} "
            f"foreign {window.foreign_cores:.2f} (front core {window.foreign_front:.2f})"
        )
        return run

    def measure_h2(self, contender: Contender, name: str, repetition: int) -> Run:
        """Scenario 7: HTTP/2 keep-alive requests, H2_CLIENTS x H2_STREAMS at once. h2load
        runs a request count (about ``--seconds`` at the rate of a short first run): its
        timed mode (-D) at times never ends against a busy server."""
        probe = run_h2load(
            self.cores,
            contender.port,
            "/small",
            clients=H2_CLIENTS,
            streams=H2_STREAMS,
            requests=H2_CLIENTS * H2_STREAMS * 5,
        )
        count = max(H2_CLIENTS * H2_STREAMS * 5, round(probe["rate"] * self.args.seconds))
        profiler = self.start_profiler(contender, "7", repetition)
        with Window(contender, self.backend) as window:
            result = run_h2load(
                self.cores,
                contender.port,
                "/small",
                clients=H2_CLIENTS,
                streams=H2_STREAMS,
                requests=count,
            )
        if profiler is not None:
            profiler.wait()
        rate = result["rate"]
        share = max(window.front_share, 1e-6)
        errors = sum(result["errors"].values())
        figures = {"requests/s": rate, "requests/s per core": rate / share}
        checks = {
            "client_requests": result["requests"],
            "client_errors": result["errors"],
            "client_error_share": round(errors / max(result["requests"] + errors, 1), 4),
            "application_protocol": result.get("protocol"),
            "frontend_cpu_share": round(window.front_share, 3),
            "frontend_cpu_seconds": round(window.front_cpu, 3),
            "frontend_kernel_seconds": round(window.front_kernel, 3),
            "frontend_context_switches": window.front_switches,
            "client_cpu_share": round(window.client_cpu / window.wall, 3),
            "foreign_cpu_on_frontend_core": round(window.foreign_front, 3),
        }
        failed = (
            checks["client_error_share"] > ERROR_LIMIT
            or result.get("protocol") != "h2"
            or contender.died()
        )
        run = measured(
            "7",
            name,
            repetition,
            figures,
            checks,
            window,
            failed=failed,
        )
        say(
            f"  7 {name:<13} rep {repetition}: {_brief(figures)} ({result.get('protocol')}) "
            f"cpu {window.front_share:.2f} foreign {window.foreign_cores:.2f}"
        )
        return run

    def measure_pages(self, contender: Contender, name: str, repetition: int) -> Run:
        """Scenario 7p: PAGE_LOADS page loads of PAGE_REQUESTS parallel requests on new
        connections, over HTTP/1.1 (a connection per request) and over HTTP/2 (one)."""
        figures: dict[str, float] = {}
        checks: dict[str, Any] = {}
        failed = False
        with Window(contender, self.backend) as window:
            for protocol, unit in H2_PAGE_UNITS.items():
                http1 = protocol == "h1"
                mark = contender.log_mark()
                succeeded = 0
                for _ in range(PAGE_LOADS):
                    result = run_h2load(
                        self.cores,
                        contender.port,
                        "/small",
                        clients=PAGE_REQUESTS if http1 else 1,
                        streams=1 if http1 else PAGE_REQUESTS,
                        requests=PAGE_REQUESTS,
                        http1=http1,
                    )
                    succeeded += result["requests"]
                    failed = failed or result.get("protocol") != ("http/1.1" if http1 else "h2")
                time.sleep(0.2)  # let the last log lines land
                if isinstance(contender, NginxContender):
                    signatures = contender.full_handshake_connections_since(mark)
                else:
                    signatures = contender.handshakes_since(mark).get("token_signatures", 0)
                figures[unit] = signatures / PAGE_LOADS
                checks[f"{protocol}_requests"] = succeeded
                failed = failed or succeeded < PAGE_LOADS * PAGE_REQUESTS
        run = measured(
            "7p",
            name,
            repetition,
            figures,
            checks,
            window,
            failed=failed or contender.died(),
        )
        say(f"  7p {name:<13} rep {repetition}: {_brief(figures)}")
        return run

    def start_profiler(
        self, contender: Contender, scenario: str, repetition: int
    ) -> subprocess.Popen[bytes] | None:
        """With --profile: py-spy (from bench/.tools) samples the proxy during the run."""
        if not self.args.profile or not isinstance(contender, ProxyContender):
            return None
        assert contender.process is not None
        output = self.args.profile / f"{contender.name}-s{scenario}-r{repetition}.txt"
        self.args.profile.mkdir(parents=True, exist_ok=True)
        argv = [
            "taskset",
            "-c",
            self.cores.client,
            str(PY_SPY),
            "record",
            "--nonblocking",
            "--threads",
            "--format",
            "raw",
        ]
        argv += ["--rate", "250", "--duration", str(max(1, round(self.args.seconds)))]
        argv += ["--output", str(output), "--pid", str(contender.process.pid)]
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def start_perf(
        self, contender: Contender, scenario: str, repetition: int
    ) -> subprocess.Popen[bytes] | None:
        """With --profile and Linux perf installed: perf samples the proxy's CPU by shared
        object (the interpreter, libssl, libcrypto, the kernel, SoftHSM2) for breakdown.py."""
        if not self.args.profile or not isinstance(contender, ProxyContender):
            return None
        if shutil.which("perf") is None:
            return None
        assert contender.process is not None
        output = self.args.profile / f"{contender.name}-s{scenario}-r{repetition}.perf"
        pids = ",".join(map(str, contender.pids()))
        argv = ["taskset", "-c", self.cores.client, "perf", "record", "-q", "-F", "499"]
        argv += ["-o", str(output), "-p", pids]
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def measure_memory(self, contender: Contender, name: str, repetition: int) -> Run:
        contender.restart()  # a fresh process: memory freed by earlier runs would hide costs
        time.sleep(0.5)
        before = rss_kib(contender.pids())
        client = subprocess.Popen(
            [
                "taskset",
                "-c",
                self.cores.client,
                str(VENV_PYTHON),
                str(BENCH / "idle_client.py"),
                "127.0.0.1",
                str(contender.port),
                str(IDLE_CONNECTIONS),
                "/small",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert client.stdout is not None
        assert client.stdin is not None
        with Window(contender, self.backend) as window:
            line = client.stdout.readline().decode()
        opened = int(line.split()[1]) if line.startswith("open ") else 0
        time.sleep(1.0)
        after = rss_kib(contender.pids())
        client.stdin.close()
        client.wait(timeout=60)
        errors = client.stderr.read().decode() if client.stderr else ""
        per_connection = (after - before) / max(opened, 1)
        figures = {
            "KiB per connection": per_connection,
            "MiB resident with the connections open": after / 1024,
        }
        run = measured(
            "5",
            name,
            repetition,
            figures,
            {
                "client_error_share": round(1 - opened / IDLE_CONNECTIONS, 4),
                "connections_open": opened,
                "rss_before_kib": before,
                "rss_after_kib": after,
                "client_errors": errors.strip()[:300],
            },
            window,
            failed=opened < IDLE_CONNECTIONS * (1 - ERROR_LIMIT) or contender.died(),
        )
        say(f"  5 {name:<13} rep {repetition}: {_brief(figures)} open {opened}")
        return run

    def run(self) -> None:
        order = list(self.args.scenarios)
        shuffle = random.Random(self.args.seed)  # noqa: S311 - ordering, not security
        for repetition in range(self.args.repetitions):
            say(f"repetition {repetition + 1} of {self.args.repetitions}")
            for scenario in order:
                names = sorted(
                    {name for (name, variant) in self.contenders if variant == variant_of(scenario)}
                )
                if scenario not in DELAYS:
                    names = [
                        n
                        for n in names
                        if not any(
                            u.scenario == scenario and u.contender == n for u in self.unavailable
                        )
                    ]
                shuffle.shuffle(names)
                for name in names:
                    try:
                        self.runs.append(self.measure(scenario, name, repetition))
                    except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
                        say(f"  {scenario} {name}: failed: {exc}")

    def machine(self) -> list[str]:
        model = "unknown CPU"
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        memory = Path("/proc/meminfo").read_text().split("\n", 1)[0].split()[1]
        os_name = "unknown"
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip('"')

        def package(name: str) -> str:
            completed = subprocess.run(
                ["dpkg-query", "-W", "-f", "${Version}", name],
                capture_output=True,
                text=True,
                check=False,
            )
            return completed.stdout.strip() or "?"

        versions = {
            "nginx": package("nginx-light"),
            "libp11 engine": package("libengine-pkcs11-openssl"),
            "SoftHSM2": package("softhsm2"),
            "wrk": package("wrk"),
            "OpenSSL": package("openssl"),
            "Python": platform.python_version(),
        }
        return [
            f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {os_name}, "
            f"kernel {platform.release()}",
            f"{os.cpu_count()} x {model}, {int(memory) // 1024} MiB RAM",
            ", ".join(f"{name} {version}" for name, version in versions.items()),
            f"front ends pinned to core {self.cores.frontend} (proxy-2w: cores "
            f"{self.cores.all}), client (wrk / idle_client.py) to core {self.cores.client}, "
            f"backend nginx to core {self.cores.backend}",
            f"{self.args.repetitions} repetitions of {self.args.seconds:g} s per figure, "
            f"interleaved; {CONNECTIONS} connections (scenario 4: {THROUGHPUT_CONNECTIONS}); "
            f"proxy token session pool {PROXY_SESSIONS} ({PROXY_SESSIONS_DELAYED} in 2a/2b)",
            "full handshakes forced with bench/noresume.c preloaded into wrk; checked on the "
            "server side (proxy: token_signature audit lines; nginx: $ssl_session_reused)",
            *self.args.note,
            *(f"incident: {incident}" for incident in self.incidents),
        ]


def _brief(figures: dict[str, float]) -> str:
    return ", ".join(f"{value:,.1f} {unit}" for unit, value in figures.items())


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/run.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    parser.add_argument(
        "--scenarios",
        default=",".join(("1", RSA_SCENARIO, "2a", "2b", "3", "4", "4b", "5", "6", "7", "7p")),
        type=lambda text: text.split(","),
    )
    parser.add_argument("--quick", action="store_true", help="1 repetition of 2 s: a smoke run")
    parser.add_argument("--output", type=Path, default=BENCH, help="where results go")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--profile", type=Path, default=None, help="record py-spy profiles of the proxy here"
    )
    parser.add_argument("--note", action="append", default=[], help="a line for RESULTS.md")
    parser.add_argument(
        "--contenders",
        default=None,
        type=lambda text: text.split(","),
        help="only these (e.g. proxy,nginx): a quicker A/B; the ratios need the references",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.repetitions, args.seconds = 1, 2.0
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    raise_fd_limit()
    work = Path(tempfile.mkdtemp(prefix="hsm-proxy-bench-"))
    bench = Bench(args, work)
    started = time.monotonic()
    try:
        bench.setup()
        bench.run()
    finally:
        bench.stop_all()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    write_results(args.output, bench.runs, bench.unavailable, bench.machine())
    say(f"done in {time.monotonic() - started:.0f} s; results in {args.output}")
    return 0
