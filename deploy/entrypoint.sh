#!/bin/sh
# Entry point of the poolport image (also installed as `poolport-node`).
#
#   pool            run a pool node: the poolport application starts the pools
#                   of $POOLPORT_SYS_CONFIG; each joins its group (`demo')
#   app             run the demo "user" node: connects to the pool nodes (DNS
#                   name of the pool service), calls {group, demo}, prints results
#   health          exit 0 iff this container's pool node answers poolport:info/1
#                   for each of its pools and they are in their group (healthcheck)
#   info            print poolport:info/1 of this container's pool node's pools
#   remsh           an Erlang shell on this container's node
#   <anything else> exec'd as is
#
# Environment (all optional):
#   POOLPORT_COOKIE         the Erlang cookie shared by all nodes
#   POOLPORT_COOKIE_FILE    a file holding it (default /run/secrets/poolport_cookie if present)
#   POOLPORT_NODE_NAME      node name before the @ (default: pool / app)
#   POOLPORT_NODE_HOST      host part of the node name (default: the container's IP)
#   POOLPORT_DIST_PORT      Erlang distribution listen port (default 9100)
#   POOLPORT_SYS_CONFIG     sys.config of a pool node (default deploy/sys.config)
#   POOLPORT_DIST_TLS       an ssl_dist options file: distribution over TLS
#                           (-proto_dist inet_tls), for every node and probe
#                           of the deployment alike (see docs/deploy.md)
#   app node: POOLPORT_POOL_SERVICE, POOLPORT_SEED_NODES, POOLPORT_POOL_NAME,
#             POOLPORT_DEMO_* (see deploy/app_node.erl)
set -eu

HOME_DIR=${POOLPORT_HOME:-/opt/poolport}
EBIN_APP=$HOME_DIR/erlang/_build/default/lib/poolport/ebin
EBIN_DEPLOY=$HOME_DIR/deploy/ebin
SHARED_COOKIE_DIR=/var/lib/poolport/cookie

log() { echo "poolport-node: $*" >&2; }
die() { log "$*"; exit 1; }

# The Erlang cookie: never in the image, written to ~/.erlang.cookie at start.
setup_cookie() {
    cookie=""
    secret=${POOLPORT_COOKIE_FILE:-/run/secrets/poolport_cookie}
    if [ -n "${POOLPORT_COOKIE_FILE:-}" ] || [ -e "$secret" ]; then
        [ -r "$secret" ] || die "cannot read the cookie file $secret"
        cookie=$(cat "$secret")
        src="file $secret"
    elif [ -n "${POOLPORT_COOKIE:-}" ]; then
        cookie=$POOLPORT_COOKIE
        src="POOLPORT_COOKIE"
    elif [ -d "$SHARED_COOKIE_DIR" ] && [ -w "$SHARED_COOKIE_DIR" ]; then
        # No cookie given: the first node of the deployment makes a random one
        # in the shared volume (atomically: a hard link cannot be overwritten).
        if [ ! -s "$SHARED_COOKIE_DIR/cookie" ]; then
            tmp=$(mktemp "$SHARED_COOKIE_DIR/.cookie.XXXXXX")
            od -An -N24 -tx1 /dev/urandom | tr -d ' \n' > "$tmp"
            chmod 0400 "$tmp"
            ln "$tmp" "$SHARED_COOKIE_DIR/cookie" 2>/dev/null || true
            rm -f "$tmp"
        fi
        cookie=$(cat "$SHARED_COOKIE_DIR/cookie")
        src="random cookie in the shared volume $SHARED_COOKIE_DIR"
    else
        die "no Erlang cookie: set POOLPORT_COOKIE or POOLPORT_COOKIE_FILE, or mount a volume at $SHARED_COOKIE_DIR"
    fi
    [ -n "$cookie" ] || die "the Erlang cookie ($src) is empty"
    case "$cookie" in
        *[!A-Za-z0-9_.@+=-]*) die "the Erlang cookie ($src) may only contain letters, digits and _.@+=-" ;;
    esac
    file=$HOME/.erlang.cookie
    if [ ! -f "$file" ] || [ "$(cat "$file")" != "$cookie" ]; then
        rm -f "$file"
        (umask 077 && printf '%s' "$cookie" > "$file")
        chmod 0400 "$file"
    fi
    COOKIE_SOURCE=$src
}

node_host() {
    if [ -n "${POOLPORT_NODE_HOST:-}" ]; then
        echo "$POOLPORT_NODE_HOST"
    else
        # Long names with the container's IP: resolvable from every container
        # on the network without any DNS entry per replica.
        hostname -i 2>/dev/null | awk '{print $1}'
    fi
}

# Distribution over TLS when POOLPORT_DIST_TLS names an ssl_dist options file.
dist_args() {
    if [ -n "${POOLPORT_DIST_TLS:-}" ]; then
        [ -r "$POOLPORT_DIST_TLS" ] || die "cannot read the ssl_dist options file $POOLPORT_DIST_TLS"
        echo "-proto_dist inet_tls -ssl_dist_optfile $POOLPORT_DIST_TLS"
    fi
}

# erl for a short-lived hidden helper node on this container (probe, remsh).
helper_erl() {
    host=$(node_host)
    [ -n "$host" ] || die "cannot find this container's IP (set POOLPORT_NODE_HOST)"
    # shellcheck disable=SC2046
    exec erl -noshell -hidden -name "probe$$@$host" $(dist_args) \
        -pa "$EBIN_APP" -pa "$EBIN_DEPLOY" "$@"
}

run_node() {
    role=$1
    name=${POOLPORT_NODE_NAME:-$role}
    host=$(node_host)
    [ -n "$host" ] || die "cannot find this container's IP (set POOLPORT_NODE_HOST)"
    port=${POOLPORT_DIST_PORT:-9100}
    node="$name@$host"
    dist=$(dist_args)
    log "starting $role node $node (distribution port $port${dist:+ over TLS}, cookie from $COOKIE_SOURCE)"
    case "$role" in
        pool)
            config=${POOLPORT_SYS_CONFIG:-$HOME_DIR/deploy/sys.config}
            [ -r "$config" ] || die "cannot read $config"
            set -- -config "$config" -s pool_node start ;;
        app)
            set -- -s app_node start ;;
    esac
    # Logs: the VM's logger and io go to stdout, Python's logs to stderr.
    # shellcheck disable=SC2086
    exec erl -noshell -noinput -name "$node" $dist \
        -kernel inet_dist_listen_min "$port" inet_dist_listen_max "$port" \
        -pa "$EBIN_APP" -pa "$EBIN_DEPLOY" \
        "$@"
}

cmd=${1:-pool}
case "$cmd" in
    pool|app)
        setup_cookie
        run_node "$cmd" ;;
    health|info)
        setup_cookie
        target="${POOLPORT_NODE_NAME:-pool}@$(node_host)"
        helper_erl -run poolctl main "$cmd" "$target" ;;
    remsh)
        setup_cookie
        target="${2:-${POOLPORT_NODE_NAME:-pool}@$(node_host)}"
        host=$(node_host)
        # shellcheck disable=SC2046
        exec erl -name "remsh$$@$host" -hidden $(dist_args) -remsh "$target" ;;
    *)
        exec "$@" ;;
esac
