#!/usr/bin/env bash
# Container smoke test of the deployment (Dockerfile + docker-compose.yml):
#   1. builds the image on a local Debian bookworm base (made with debootstrap
#      + docker import when none is there: no image registry needed),
#   2. `up --scale pool=2` (POOLPORT_SMOKE_SCALE), waits until all pool nodes
#      are healthy,
#   3. checks the app node's calls to the group `demo` succeed, answered by
#      every pool node,
#   4. changes `workers` in a temporary copy of config/poolport.yaml (mounted
#      instead of the repo's file), restarts the pool service, checks that
#      poolport:info/1 reports the new worker count on both nodes and that the
#      app node sees it too,
#   5. `down -v`: nothing left running.
#
# Usage: tests/container/smoke.sh            (from anywhere; needs Docker)
# Environment:
#   POOLPORT_SKIP_DOCKER=1   exit 0 with SKIPPED when Docker cannot run here
#   POOLPORT_BASE_IMAGE      base image to build on (default: a local
#                            debian:bookworm-slim, poolport-base:bookworm or
#                            poolport-fresh:bookworm, else build poolport-base:bookworm)
#   POOLPORT_DEBIAN_MIRROR   mirror for debootstrap (default: from this machine's apt sources)
#   POOLPORT_SMOKE_IMAGE     tag of the image built here (default poolport:smoke)
#   POOLPORT_COOKIE          if set, the cookie the nodes use (default: the
#                            random cookie the first node makes in the volume)
#   POOLPORT_SMOKE_SCALE     pool nodes to start (default 2)
set -euo pipefail

cd "$(dirname "$0")/../.."
ROOT=$(pwd)
START=$(date +%s)
IMAGE=${POOLPORT_SMOKE_IMAGE:-poolport:smoke}
BASE_TAG=poolport-base:bookworm
PROJECT=poolport-smoke-$$
SCALE=${POOLPORT_SMOKE_SCALE:-2}
WORKERS_BEFORE=2
WORKERS_AFTER=3

say() { echo "[smoke +$(( $(date +%s) - START ))s] $*"; }
fail() { say "FAIL: $*"; exit 1; }

# --- Can Docker run here? ---------------------------------------------------
STARTED_DOCKERD=""
cannot_run() {
    if [ "${POOLPORT_SKIP_DOCKER:-0}" = 1 ]; then
        echo "SKIPPED: container smoke test: Docker cannot run here: $*"
        exit 0
    fi
    echo "FAILED: container smoke test: Docker cannot run here: $*" >&2
    echo "        (set POOLPORT_SKIP_DOCKER=1 to skip this test on such machines)" >&2
    exit 1
}
command -v docker >/dev/null 2>&1 || cannot_run "the docker CLI is not installed (apt-get install docker.io docker-compose)"
if ! docker info >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ] && command -v dockerd >/dev/null 2>&1 && ! pgrep -x dockerd >/dev/null 2>&1; then
        say "starting dockerd"
        dockerd > /tmp/poolport-smoke-dockerd.log 2>&1 &
        STARTED_DOCKERD=$!
        for _ in $(seq 1 30); do docker info >/dev/null 2>&1 && break; sleep 1; done
    fi
    docker info >/dev/null 2>&1 || cannot_run "the Docker daemon is not reachable: $(docker info 2>&1 | grep -iE 'error|cannot' | head -1)"
fi
if docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
    COMPOSE=(docker-compose)
else
    cannot_run "neither 'docker compose' nor 'docker-compose' is installed"
fi
say "using $(docker --version | cut -d, -f1) and ${COMPOSE[*]} ($("${COMPOSE[@]}" version --short 2>/dev/null || echo '?'))"

# --- Scratch space, compose project, cleanup ---------------------------------
TMPD=$(mktemp -d /tmp/poolport-smoke.XXXXXX)
chmod 0755 "$TMPD"
COMPOSE_STARTED=""
CONF=$TMPD/poolport.yaml
export COMPOSE_PROJECT_NAME=$PROJECT
export POOLPORT_IMAGE=$IMAGE
export POOLPORT_CONFIG=$CONF
export POOLPORT_DEMO_INTERVAL=2
export POOLPORT_DEMO_CALLS=8
export POOLPORT_DEMO_STEPS=200000
export POOLPORT_DEMO_ROUNDS=0
compose() { "${COMPOSE[@]}" -f "$ROOT/docker-compose.yml" "$@"; }

cleanup() {
    local rc=$?
    set +e
    if [ $rc -ne 0 ] && [ -n "$COMPOSE_STARTED" ]; then
        say "--- pool logs (tail) ---"; compose logs --no-color --tail=40 pool 2>&1 | tail -60
        say "--- app logs (tail) ---"; compose logs --no-color --tail=40 app 2>&1 | tail -40
    fi
    if [ -n "$COMPOSE_STARTED" ]; then
        say "down -v"
        timeout 120 "${COMPOSE[@]}" -f "$ROOT/docker-compose.yml" down -v --remove-orphans -t 10 >/dev/null 2>&1
    fi
    left=$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT")
    vols=$(docker volume ls -q --filter "label=com.docker.compose.project=$PROJECT")
    if [ -n "$left$vols" ]; then
        say "leftovers after down: containers [$left] volumes [$vols]; removing"
        [ -n "$left" ] && docker rm -f $left >/dev/null
        [ -n "$vols" ] && docker volume rm -f $vols >/dev/null
        rc=1
    fi
    rm -rf "$TMPD"
    if [ -n "$STARTED_DOCKERD" ]; then kill "$STARTED_DOCKERD" 2>/dev/null; fi
    if [ $rc -eq 0 ]; then
        say "PASS: container smoke test ($(( $(date +%s) - START ))s)"
    else
        say "container smoke test FAILED"
    fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- Base image -------------------------------------------------------------
debian_mirror() {
    if [ -n "${POOLPORT_DEBIAN_MIRROR:-}" ]; then echo "$POOLPORT_DEBIAN_MIRROR"; return; fi
    cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | grep -E '^[[:space:]]*(URIs:|deb[[:space:]])' \
        | grep -oE 'https?://[^[:space:]]+' \
        | grep -vE 'security|/debian-' \
        | grep -E '/debian/?$' | head -1 || true
}

build_base() {
    [ "$(id -u)" -eq 0 ] || fail "no base image and not root: cannot debootstrap one (set POOLPORT_BASE_IMAGE)"
    if ! command -v debootstrap >/dev/null 2>&1; then
        say "installing debootstrap"
        DEBIAN_FRONTEND=noninteractive timeout 300 apt-get install -y -qq debootstrap >/dev/null \
            || fail "cannot install debootstrap"
    fi
    local mirror rootfs
    mirror=$(debian_mirror)
    [ -n "$mirror" ] || fail "no Debian mirror in this machine's apt sources (set POOLPORT_DEBIAN_MIRROR or POOLPORT_BASE_IMAGE)"
    rootfs=$(mktemp -d /tmp/poolport-rootfs.XXXXXX)
    say "building base image $BASE_TAG: debootstrap bookworm from $mirror (a few minutes)"
    if ! timeout 900 debootstrap --variant=minbase --include=ca-certificates bookworm "$rootfs" "$mirror" \
            > /tmp/poolport-debootstrap.log 2>&1; then
        tail -20 /tmp/poolport-debootstrap.log
        rm -rf "$rootfs"
        fail "debootstrap failed (log: /tmp/poolport-debootstrap.log)"
    fi
    tar -C "$rootfs" -c . | docker import - "$BASE_TAG" >/dev/null
    rm -rf "$rootfs"
    BASE=$BASE_TAG
}

BASE=${POOLPORT_BASE_IMAGE:-}
if [ -z "$BASE" ]; then
    for candidate in debian:bookworm-slim "$BASE_TAG" poolport-fresh:bookworm; do
        if docker image inspect "$candidate" >/dev/null 2>&1; then BASE=$candidate; break; fi
    done
fi
[ -n "$BASE" ] || build_base
docker image inspect "$BASE" >/dev/null 2>&1 || fail "base image $BASE not found"
export POOLPORT_BASE_IMAGE=$BASE

# --- Build ------------------------------------------------------------------
# Build context: the files git would ship (a clean tree, like a fresh clone).
CTX=$TMPD/context
mkdir -p "$CTX"
if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git -C "$ROOT" ls-files -z --cached --others --exclude-standard \
        | tar -C "$ROOT" --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -C "$CTX" -xf -
else
    tar -C "$ROOT" --exclude=.git --exclude=.venv --exclude=_build --exclude='*.egg-info' \
        --exclude=.pytest_cache --exclude=.hypothesis -cf - . | tar -C "$CTX" -xf -
fi
# Where this machine's pip trusts its own CA bundle (a TLS-intercepting proxy
# in front of the package index), the build stage's pip gets the same bundle.
PIP_CA=${POOLPORT_PIP_CERT:-${PIP_CERT:-}}
if [ -z "$PIP_CA" ] && command -v python3 >/dev/null 2>&1; then
    PIP_CA=$(python3 -m pip config get global.cert 2>/dev/null || true)
fi
if [ -n "$PIP_CA" ] && [ -r "$PIP_CA" ]; then
    cp "$PIP_CA" "$CTX/pip-ca-bundle.pem"
    say "the build's pip uses this machine's pip CA bundle ($PIP_CA)"
fi
say "building $IMAGE on $BASE"
if ! timeout 900 docker build --network host --build-arg BASE_IMAGE="$BASE" -t "$IMAGE" "$CTX" \
        > /tmp/poolport-smoke-build.log 2>&1; then
    tail -30 /tmp/poolport-smoke-build.log
    fail "docker build failed (log: /tmp/poolport-smoke-build.log)"
fi
say "image built"

# The image: non-root user, no Erlang cookie inside.
img_check=$(docker run --rm --entrypoint sh "$IMAGE" -c \
    'echo "uid=$(id -u)"; [ -e "$HOME/.erlang.cookie" ] && echo cookie-in-image; ls -A /var/lib/poolport/cookie | grep -q . && echo cookie-in-volume-dir; find / -xdev -name pip-ca-bundle.pem 2>/dev/null | grep -q . && echo build-ca-in-image; true')
echo "$img_check" | grep -q '^uid=0$' && fail "the image runs as root"
echo "$img_check" | grep -qE 'cookie|build-ca' && fail "the image contains what it should not: $img_check"
say "image runs as $(echo "$img_check" | head -1), no cookie inside"

# --- Compose project --------------------------------------------------------
set_workers() {  # in place: the bind mount follows the file's inode
    sed -E "s/^workers:.*/workers: $1/" "$CONF" > "$CONF.new"
    cat "$CONF.new" > "$CONF"
    rm -f "$CONF.new"
    grep -q "^workers: $1\$" "$CONF" || fail "could not set workers in $CONF"
}
cp config/poolport.yaml "$CONF"
chmod 0644 "$CONF"
set_workers "$WORKERS_BEFORE"


pool_ids() { compose ps -q pool 2>/dev/null | sort; }
node_of() {  # pool container id -> node name pool@IP
    echo "pool@$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}' "$1" | awk '{print $1}')"
}

wait_healthy() {  # count timeout_s
    local want=$1 deadline=$(( $(date +%s) + $2 )) ids states
    while :; do
        ids=$(pool_ids)
        states=$(for id in $ids; do docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}' "$id"; done | sort | uniq -c | xargs)
        if [ "$(echo "$ids" | grep -c .)" -eq "$want" ] && [ "$states" = "$want healthy" ]; then
            say "$want pool node(s) healthy"
            return 0
        fi
        [ "$(date +%s)" -lt "$deadline" ] || fail "pool nodes not healthy within $2 s: $states"
        sleep 2
    done
}

expected_nodes() { for id in $(pool_ids); do node_of "$id"; done | sort | paste -sd, -; }

# Waits until the app node's latest "round N ok" line lists exactly the
# expected pool nodes, each with $1 workers.
wait_app_round() {  # workers timeout_s
    local want_workers=$1 deadline=$(( $(date +%s) + $2 )) expected line nodes workers
    expected=$(expected_nodes)
    while :; do
        line=$(compose logs --no-color app 2>/dev/null | grep -oE 'round [0-9]+ ok nodes=[^ ]+ workers=[^ ]+' | tail -1 || true)
        nodes=$(echo "$line" | sed -nE 's/.* nodes=([^ ]+).*/\1/p' | tr , '\n' | sort | paste -sd, -)
        workers=$(echo "$line" | sed -nE 's/.* workers=([^ ]+).*/\1/p' | tr , '\n' | sed -E 's/.*:([^:]+)$/\1/' | sort -u | paste -sd, -)
        if [ -n "$line" ] && [ "$nodes" = "$expected" ] && [ "$workers" = "$want_workers" ]; then
            say "app node: '$line'"
            return 0
        fi
        [ "$(date +%s)" -lt "$deadline" ] || fail "no app round answered by all of [$expected] with $want_workers workers within $2 s (last: '$line')"
        sleep 2
    done
}

check_info() {  # workers
    local id out
    for id in $(pool_ids); do
        out=$(timeout 30 docker exec "$id" poolport-node info 2>&1) || fail "poolport-node info failed in $id: $out"
        echo "$out" | grep -q "^pool=demo node=$(node_of "$id") workers=$1 status=running" \
            || fail "expected workers=$1 from $(node_of "$id"), got: $out"
        say "info: $(echo "$out" | grep -oE '^pool=[^ ]+ node=[^ ]+ workers=[^ ]+ status=[^ ]+')"
    done
}

# --- 1. up with 2 pool nodes ------------------------------------------------
COMPOSE_STARTED=1
say "up --scale pool=$SCALE (project $PROJECT, config $CONF with workers: $WORKERS_BEFORE)"
timeout 240 "${COMPOSE[@]}" -f "$ROOT/docker-compose.yml" up -d --no-build --scale pool=$SCALE \
    > "$TMPD/up.log" 2>&1 || { cat "$TMPD/up.log"; fail "compose up failed"; }
wait_healthy $SCALE 150
[ "$(compose ps -q app | grep -c .)" -eq 1 ] || fail "the app container is not there"

# --- 2. the app's calls are answered by both pool nodes ---------------------
wait_app_round "$WORKERS_BEFORE" 90
check_info "$WORKERS_BEFORE"
compose logs --no-color app 2>/dev/null | grep -E 'answered' | tail -4 | sed 's/^/    /'

# --- 3. change workers in the mounted YAML, restart the pools ---------------
set_workers "$WORKERS_AFTER"
say "workers: $WORKERS_BEFORE -> $WORKERS_AFTER in the mounted YAML; restarting the pool service"
timeout 120 "${COMPOSE[@]}" -f "$ROOT/docker-compose.yml" restart -t 20 pool \
    > "$TMPD/restart.log" 2>&1 || { cat "$TMPD/restart.log"; fail "compose restart failed"; }
sleep 2
wait_healthy $SCALE 150
check_info "$WORKERS_AFTER"
wait_app_round "$WORKERS_AFTER" 90
say "all checks passed"
