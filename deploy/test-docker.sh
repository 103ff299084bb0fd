#!/usr/bin/env bash
# The Docker image and the compose example, for real: build deploy/Dockerfile, serve a
# request through `dev` and through `run` with a mounted config, check that the container
# runs as a non-root user on a read-only root file system, that the CA bundle given as a
# build secret is in no layer of the image, then bring up deploy/compose.yaml and wait for
# its health check. tests/integration/test_deploy.py runs this.
#
# Usage: deploy/test-docker.sh [bookworm|trixie]     (the Debian release, default bookworm)
#
# With no image registry reachable, the base image is made locally when missing
# (deploy/make-base-image.sh: debootstrap, then docker import) and kept, like the built
# image, so that later runs take seconds. Environment:
#   HSM_PROXY_BASE_IMAGE  build FROM this image instead (debian:bookworm-slim, say)
#   HSM_PROXY_CA_BUNDLE   the CA bundle for apt and pip in the build (default: the host's
#                         /etc/ssl/certs/ca-certificates.crt, which holds an inspecting
#                         proxy's CA once it is installed on the host)
# Needs a Docker engine: when none answers and this runs as root with dockerd installed, it
# starts one for the run and stops it afterwards. Exit status 77 (with a line starting
# "skip:") when there is no engine to use; 0 when every check passed.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
release=${1:-bookworm}
case "$release" in
  bookworm|trixie) ;;
  *) echo "test-docker.sh: unknown release $release (bookworm or trixie)" >&2; exit 2 ;;
esac

say() { printf 'test-docker.sh: %s\n' "$*"; }
fail() { say "FAILED: $*" >&2; exit 1; }
skip() { say "skip: $*"; exit 77; }

work=$(mktemp -d)
started_engine=""
containers=()
volumes=()
compose_project=""
cleanup() {
  set +e
  if [ -n "$compose_project" ]; then
    compose -p "$compose_project" -f "$here/deploy/compose.yaml" down -v >/dev/null 2>&1
  fi
  [ "${#containers[@]}" -gt 0 ] && docker rm -f "${containers[@]}" >/dev/null 2>&1
  [ "${#volumes[@]}" -gt 0 ] && docker volume rm "${volumes[@]}" >/dev/null 2>&1
  if [ -n "$started_engine" ]; then
    kill "$started_engine" 2>/dev/null && wait "$started_engine" 2>/dev/null
  fi
  rm -rf "$work"
}
trap cleanup EXIT

# --- A Docker engine, and a client that builds with BuildKit -------------------------------
engine_answers() { docker info >/dev/null 2>&1; }
if ! command -v docker >/dev/null; then
  skip "no docker client (deploy/setup.sh --test installs Debian's docker.io)"
fi
if ! engine_answers; then
  [ "$(id -u)" = 0 ] || skip "no Docker engine answers (docker info fails), and starting one needs root"
  command -v dockerd >/dev/null || skip "no Docker engine answers and dockerd is not installed (deploy/setup.sh --test installs Debian's docker.io)"
  # In a chroot (deploy/test-in-debian-chroot.sh) a second engine would share the host's
  # kernel networking (docker0, iptables) with the host's own.
  if command -v ischroot >/dev/null && ischroot; then
    skip "no Docker engine answers, and this is a chroot: not starting a second one beside the host's"
  fi
  say "starting dockerd for this run (log: $work/dockerd.log)"
  dockerd >"$work/dockerd.log" 2>&1 &
  started_engine=$!
  for _ in $(seq 120); do
    engine_answers && break
    kill -0 "$started_engine" 2>/dev/null \
      || skip "dockerd could not start here: $(tail -n 1 "$work/dockerd.log")"
    sleep 0.5
  done
  engine_answers || skip "dockerd started but docker info does not answer: $(docker info 2>&1 | tail -n 1)"
fi

# RUN --mount=type=secret needs BuildKit: Docker 23+ has it through buildx, Docker 20.10
# (Debian 12's docker.io) built in. A machine can have several clients on PATH; take the
# first that can, and put it first for docker-compose too.
buildkit_client=""
while read -r client; do
  if "$client" buildx version >/dev/null 2>&1; then buildkit_client=$client; break; fi
  major=$("$client" version --format '{{.Client.Version}}' 2>/dev/null | cut -d. -f1)
  if [ -n "$major" ] && [ "$major" -lt 23 ] 2>/dev/null; then buildkit_client=$client; break; fi
done < <(type -ap docker)
[ -n "$buildkit_client" ] || fail "no docker client on PATH can build with BuildKit (install docker-buildx, or Debian's docker.io)"
mkdir "$work/bin"
ln -s "$buildkit_client" "$work/bin/docker"
export PATH="$work/bin:$PATH" DOCKER_BUILDKIT=1
if command -v docker-compose >/dev/null; then
  compose() { docker-compose "$@"; }
elif docker compose version >/dev/null 2>&1; then
  compose() { docker compose "$@"; }
else
  fail "neither docker-compose nor 'docker compose' is installed (deploy/setup.sh --test installs Debian's docker-compose)"
fi
say "engine $(docker version --format '{{.Server.Version}}'), client $buildkit_client, $(compose version --short 2>/dev/null || compose version | head -n 1)"

# --- Base image, build ---------------------------------------------------------------------
base=${HSM_PROXY_BASE_IMAGE:-hsm-proxy-base:$release}
if ! docker image inspect "$base" >/dev/null 2>&1; then
  if [ -n "${HSM_PROXY_BASE_IMAGE:-}" ]; then
    docker pull "$base" >/dev/null || fail "cannot pull $base"
  else
    say "making the base image $base (debootstrap; once, then kept)"
    "$here/deploy/make-base-image.sh" "$release" "$base"
  fi
fi

# The build secret: the host's CA bundle plus a marker CA of our own, which must turn up in
# no layer of the image. The marker is kept with the image cache, so that a build answered
# from the cache was made with the same marker.
cache=${XDG_CACHE_HOME:-${HOME:-/var/tmp}/.cache}/hsm-proxy
mkdir -p "$cache"
marker=$cache/test-docker-marker-ca.pem
if [ ! -s "$marker" ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout /dev/null \
    -subj "/CN=hsm-proxy test-docker marker CA" -days 3650 -out "$marker.new" 2>/dev/null
  mv "$marker.new" "$marker"
fi
ca_bundle=${HSM_PROXY_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
secret=$work/ca-bundle.pem
{ [ -r "$ca_bundle" ] && cat "$ca_bundle"; cat "$marker"; } >"$secret"

image=hsm-proxy-test:$release
previous=$(docker image inspect -f '{{.Id}}' "$image" 2>/dev/null || true)
say "building $image FROM $base"
if ! docker build --progress=plain -f "$here/deploy/Dockerfile" -t "$image" \
    --build-arg DEBIAN_RELEASE="$release" --build-arg BASE_IMAGE="$base" \
    --secret id=ca-bundle,src="$secret" "$here" >"$work/build.log" 2>&1; then
  tail -n 40 "$work/build.log"
  fail "docker build failed (the end of its log is above)"
fi
built=$(docker image inspect -f '{{.Id}}' "$image")
if [ -n "$previous" ] && [ "$previous" != "$built" ]; then
  docker rmi "$previous" >/dev/null 2>&1 || true  # the image this build replaced, now untagged
fi

# --- The image ----------------------------------------------------------------------------
[ "$(docker image inspect -f '{{.Config.User}}' "$image")" = "10001:10001" ] || fail "the image's USER is not 10001:10001"
[ "$(docker run --rm --entrypoint /usr/bin/id "$image" -u)" = 10001 ] || fail "the image does not run as uid 10001"
grep -q '^VERSION_CODENAME='"$release"'$' <(docker run --rm --entrypoint /bin/cat "$image" /etc/os-release) \
  || fail "the image is not Debian $release"
marker_line=$(sed -n 2p "$marker")
# An image's layers never change: each image and marker is scanned once.
scanned=$cache/test-docker-scanned-$release-$(sha256sum "$marker" | cut -c1-16)-${built#sha256:}
if [ ! -e "$scanned" ]; then
  if docker save "$image" | tar -xOf - --wildcards '*/layer.tar' | grep -a -q -F -- "$marker_line"; then
    fail "the build secret (CA bundle) was written to a layer of $image"
  fi
  rm -f "$cache/test-docker-scanned-$release-"*
  : >"$scanned"
fi
if docker history --no-trunc "$image" | grep -q -F -- "$marker_line"; then
  fail "the build secret (CA bundle) is in the history of $image"
fi
say "ok: $image runs as 10001:10001, Debian $release, no trace of the CA bundle in its layers"

# Wait for a line in a container's log (the proxy logs "serving https://..." once it listens).
wait_for_log() {
  local name=$1 pattern=$2
  for _ in $(seq 240); do
    docker logs "$name" 2>&1 | grep -q -F -- "$pattern" && return 0
    [ "$(docker inspect -f '{{.State.Running}}' "$name")" = true ] || break
    sleep 0.5
  done
  docker logs "$name" 2>&1 | tail -n 20
  fail "$name never logged '$pattern' (its log is above)"
}
published_port() { docker port "$1" 8443/tcp | head -n 1 | sed 's/.*://'; }
expect_demo_answer() {  # URL CA-FILE what
  local answer
  answer=$(curl -sS --fail --cacert "$2" "$1") || fail "curl $1 failed ($3)"
  grep -q '^Hello from the hsm-proxy demo upstream' <<<"$answer" || fail "unexpected answer from $1 ($3): $answer"
  grep -q '^X-Forwarded-Proto: https$' <<<"$answer" || fail "no X-Forwarded-Proto: https from $1 ($3): $answer"
}

# --- dev, read-only, unprivileged -----------------------------------------------------------
run_id=hsm-proxy-test-$$
state=$run_id-state
volumes+=("$state")
dev=$run_id-dev
containers+=("$dev")
docker run -d --name "$dev" --read-only --tmpfs /tmp --cap-drop ALL \
  --security-opt no-new-privileges -v "$state:/var/lib/hsm-proxy" -p 127.0.0.1::8443 \
  "$image" dev --listen 0.0.0.0:8443 >/dev/null
wait_for_log "$dev" "serving https://0.0.0.0:8443"
docker exec "$dev" cat /var/lib/hsm-proxy/hsm-proxy/dev/ca.pem >"$work/dev-ca.pem"
expect_demo_answer "https://localhost:$(published_port "$dev")/through-dev" "$work/dev-ca.pem" "dev"
[ "$(docker inspect -f '{{.HostConfig.ReadonlyRootfs}}' "$dev")" = true ] || fail "$dev has a writable root"
grep -q "^Uid:[[:space:]]10001[[:space:]]" <(docker exec "$dev" cat /proc/1/status) || fail "the proxy (pid 1) does not run as uid 10001"
if docker exec "$dev" touch /opt/hsm-proxy/.write-test 2>"$work/touch.err"; then
  fail "the root file system of $dev is writable"
fi
grep -q "Read-only file system" "$work/touch.err" || fail "writing to / failed, but not for being read-only: $(cat "$work/touch.err")"
say "ok: dev serves https through the container as uid 10001 on a read-only root"
docker rm -f "$dev" >/dev/null

# --- run, with a mounted config, beside an app in the same network namespace ----------------
mkdir -p "$work/etc"
cat >"$work/etc/proxy.toml" <<'EOF'
listen = "0.0.0.0:8443"
upstream = "http://127.0.0.1:8080"

[token]
module = "/usr/lib/softhsm/libsofthsm2.so"
pin_file = "/var/lib/hsm-proxy/hsm-proxy/dev/pin"

[tls]
certificate = "/var/lib/hsm-proxy/hsm-proxy/dev/cert.pem"
key = "pkcs11:token=hsm-proxy-dev;object=hsm-proxy-dev-key;id=%01;type=private"
EOF
chmod 0755 "$work" "$work/etc"
chmod 0644 "$work/etc/proxy.toml"
app=$run_id-app
proxy=$run_id-run
containers+=("$app" "$proxy")
docker run -d --name "$app" --read-only --cap-drop ALL -p 127.0.0.1::8443 \
  --entrypoint /opt/hsm-proxy/.venv/bin/python "$image" -m proxy.commands.demo 127.0.0.1:8080 >/dev/null
wait_for_log "$app" "demo upstream on"
docker run -d --name "$proxy" --network "container:$app" --read-only --cap-drop ALL \
  --security-opt no-new-privileges -v "$state:/var/lib/hsm-proxy" \
  -v "$work/etc:/etc/hsm-proxy:ro" -e SOFTHSM2_CONF=/var/lib/hsm-proxy/hsm-proxy/dev/softhsm2.conf \
  "$image" >/dev/null
wait_for_log "$proxy" "serving https://0.0.0.0:8443 -> http://127.0.0.1:8080"
expect_demo_answer "https://localhost:$(published_port "$app")/through-run" "$work/dev-ca.pem" "run --config"
say "ok: run --config /etc/hsm-proxy/proxy.toml (mounted) serves the app beside it"
docker rm -f "$app" "$proxy" >/dev/null

# --- compose sidecar example ----------------------------------------------------------------
compose_project=hsmproxytest$$
export HSM_PROXY_IMAGE="$image" HSM_PROXY_PUBLISH=127.0.0.1::8443
compose_file=$here/deploy/compose.yaml
compose -p "$compose_project" -f "$compose_file" up -d --no-build >"$work/compose.log" 2>&1 \
  || { cat "$work/compose.log"; fail "docker-compose up failed"; }
proxy_container=$(compose -p "$compose_project" -f "$compose_file" ps -q proxy)
health=""
for _ in $(seq 240); do
  health=$(docker inspect -f '{{.State.Health.Status}}' "$proxy_container")
  [ "$health" = starting ] || break
  sleep 0.5
done
if [ "$health" != healthy ]; then
  docker inspect -f '{{json .State.Health}}' "$proxy_container"
  compose -p "$compose_project" -f "$compose_file" logs --no-color --tail 20
  fail "the compose proxy's health check says '$health' (details above)"
fi
compose -p "$compose_project" -f "$compose_file" exec -T proxy \
  cat /var/lib/hsm-proxy/hsm-proxy/dev/ca.pem >"$work/compose-ca.pem"
compose_port=$(compose -p "$compose_project" -f "$compose_file" port app 8443 | sed 's/.*://')
expect_demo_answer "https://localhost:$compose_port/through-compose" "$work/compose-ca.pem" "compose"
say "ok: compose sidecar example is healthy and serves the app through TLS"
say "passed"
