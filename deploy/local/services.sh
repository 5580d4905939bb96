# deploy/local/services.sh — sourced by deploy/local/up and deploy/test.
# Installs (from Debian packages) and starts whatever is missing of Postgres,
# RabbitMQ, etcd and protoc, reusing services that already answer on
# 127.0.0.1. Needs: Debian, root (or sudo), bash. Records what it started in
# $WARD_STATE/started so `down` stops only that.

WARD_ROOT="${WARD_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"
WARD_STATE="${WARD_STATE:-$WARD_ROOT/.ward}"
PG_PORT="${PG_PORT:-5432}"
AMQP_PORT="${AMQP_PORT:-5672}"
ETCD_PORT="${ETCD_PORT:-2379}"
ETCD_PEER_PORT="${ETCD_PEER_PORT:-2380}"
mkdir -p "$WARD_STATE/run" "$WARD_STATE/log"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() { # port seconds what
    local i
    for ((i = 0; i < $2 * 10; i++)); do
        port_open "$1" && return 0
        sleep 0.1
    done
    echo "$3 did not open port $1 within $2 s" >&2
    return 1
}

APT_UPDATED=""
apt_install() {
    [ -n "$APT_UPDATED" ] || { as_root apt-get update -qq; APT_UPDATED=1; }
    say "installing $*"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

ensure_packages() {
    local missing=()
    command -v protoc >/dev/null || missing+=(protobuf-compiler)
    command -v etcd >/dev/null || missing+=(etcd-server)
    command -v etcdctl >/dev/null || missing+=(etcd-client)
    port_open "$PG_PORT" || command -v pg_ctlcluster >/dev/null || missing+=(postgresql)
    command -v psql >/dev/null || missing+=(postgresql-client)
    # The fault harness (ward-bench chaos) runs its own Postgres and RabbitMQ: it needs the servers' binaries.
    compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
    [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || missing+=(rabbitmq-server)
    command -v curl >/dev/null || missing+=(curl)
    command -v python3 >/dev/null || missing+=(python3)
    # deploy/ops/check and deploy/bench keep their Python tools in a venv.
    python3 -c 'import ensurepip' 2>/dev/null || missing+=(python3-venv)
    command -v pkg-config >/dev/null || missing+=(pkg-config)
    [ -e /usr/include/openssl/ssl.h ] || missing+=(libssl-dev)
    if [ ${#missing[@]} -gt 0 ]; then apt_install "${missing[@]}"; fi
}

ensure_postgres() {
    if ! port_open "$PG_PORT"; then
        say "starting Postgres"
        local version
        version="$(ls /etc/postgresql | sort -V | tail -1)"
        as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start
        wait_port "$PG_PORT" 60 Postgres
        echo postgres >>"$WARD_STATE/started"
    fi
    # A fresh Debian cluster asks for a password over TCP: give postgres one.
    if ! PGPASSWORD=postgres psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -Atqc 'SELECT 1' >/dev/null 2>&1; then
        say "setting the postgres role's password for local TCP access"
        as_root runuser -u postgres -- psql -qc "ALTER USER postgres PASSWORD 'postgres'"
    fi
}

ensure_database() { # name
    if ! PGPASSWORD=postgres psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -Atqc \
        "SELECT 1 FROM pg_database WHERE datname = '$1'" | grep -q 1; then
        PGPASSWORD=postgres psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -qc "CREATE DATABASE $1" \
            || PGPASSWORD=postgres psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -Atqc \
                "SELECT 1 FROM pg_database WHERE datname = '$1'" | grep -q 1
    fi
}

ensure_rabbitmq() {
    if ! port_open "$AMQP_PORT"; then
        say "starting RabbitMQ"
        as_root rabbitmq-server -detached
        wait_port "$AMQP_PORT" 120 RabbitMQ
        echo rabbitmq >>"$WARD_STATE/started"
    fi
}

ensure_etcd() {
    if ! port_open "$ETCD_PORT"; then
        say "starting etcd on 127.0.0.1:$ETCD_PORT"
        mkdir -p "$WARD_STATE/etcd"
        nohup etcd --name ward-local --data-dir "$WARD_STATE/etcd" \
            --listen-client-urls "http://127.0.0.1:$ETCD_PORT" \
            --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
            --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
            --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
            --initial-cluster "ward-local=http://127.0.0.1:$ETCD_PEER_PORT" \
            >"$WARD_STATE/log/etcd.log" 2>&1 &
        echo $! >"$WARD_STATE/run/etcd.pid"
        wait_port "$ETCD_PORT" 30 etcd
        echo etcd >>"$WARD_STATE/started"
    fi
}

# Prometheus (Debian's package) for the local stack, on 127.0.0.1:$PROMETHEUS_PORT, scraping
# the masters and workers `up` starts (deploy/prometheus/prometheus.yml).
PROMETHEUS_PORT="${PROMETHEUS_PORT:-9099}"
ensure_prometheus() {
    command -v prometheus >/dev/null || apt_install prometheus
    if ! port_open "$PROMETHEUS_PORT"; then
        say "starting Prometheus on 127.0.0.1:$PROMETHEUS_PORT"
        mkdir -p "$WARD_STATE/prometheus"
        nohup prometheus --config.file="$WARD_ROOT/deploy/prometheus/prometheus.yml" \
            --web.listen-address="127.0.0.1:$PROMETHEUS_PORT" \
            --storage.tsdb.path="$WARD_STATE/prometheus" \
            >"$WARD_STATE/log/prometheus.log" 2>&1 &
        echo $! >"$WARD_STATE/run/prometheus.pid"
        wait_port "$PROMETHEUS_PORT" 30 Prometheus
        echo prometheus >>"$WARD_STATE/started"
    fi
}

ensure_services() {
    ensure_packages
    ensure_postgres
    ensure_rabbitmq
    ensure_etcd
}
