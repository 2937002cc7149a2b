# Shared by the project's scripts: installs and starts what the tests and the
# demo need, each step skipped when already done.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RUN_DIR=${PF_RUN_DIR:-${CARGO_TARGET_DIR:-$ROOT/target}/run}
mkdir -p "$RUN_DIR"
export PATH="$HOME/.cargo/bin:$PATH"

say() { printf '==> %s\n' "$*" >&2; }

# Debian packages the build and the tests need: libclang for rocksdb's
# bindings, kcat for looking at topics by hand, prometheus (and its promtool)
# for the alert rules' tests and the scrape test.
ensure_packages() {
  local missing=()
  ldconfig -p 2>/dev/null | grep -q 'libclang\(-[0-9.]*\)\?\.so' || [ -e /usr/lib/llvm-14/lib/libclang.so ] || missing+=(libclang-dev)
  command -v cmake >/dev/null || true
  command -v kcat >/dev/null || missing+=(kcat)
  command -v promtool >/dev/null || missing+=(prometheus)
  command -v pg_ctl >/dev/null || [ -x /usr/lib/postgresql/15/bin/pg_ctl ] || missing+=(postgresql)
  if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    if [ "$(id -u)" = 0 ]; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
      sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
  fi
}

# The Kafka-protocol broker the tests run against: tansu, built from crates.io
# (about 12 minutes on two cores, once) into a folder of its own, with the
# in-memory storage the shared broker uses and the SQLite one a test uses to
# add partitions to a topic (tansu implements no CreatePartitions).
TANSU_ROOT=${PF_TANSU_ROOT:-$HOME/.cache/promo-fanout/tansu-0.6.0}
TANSU=$TANSU_ROOT/bin/tansu
ensure_tansu() {
  if [ -x "$TANSU" ]; then return; fi
  say "installing the tansu broker into $TANSU_ROOT (cargo install tansu@0.6.0; ~12 min on 2 cores, once)"
  cargo install --root "$TANSU_ROOT" tansu@0.6.0 --locked --features dynostore,libsql --quiet
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

wait_port() {
  local port=$1 what=$2
  for _ in $(seq 1 150); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
    sleep 0.2
  done
  say "$what did not open port $port"; return 1
}

# Starts tansu on a free loopback port; prints the bootstrap address.
start_broker() {
  ensure_tansu
  local port; port=$(free_port)
  "$TANSU" broker --listener-url "tcp://127.0.0.1:$port" \
    --advertised-listener-url "tcp://127.0.0.1:$port" \
    --storage-engine memory://tansu/ >"$RUN_DIR/tansu-$port.log" 2>&1 &
  echo $! >"$RUN_DIR/tansu-$port.pid"
  wait_port "$port" tansu
  echo "127.0.0.1:$port"
}

stop_broker() {
  local addr=$1 port=${1##*:}
  if [ -f "$RUN_DIR/tansu-$port.pid" ]; then
    kill "$(cat "$RUN_DIR/tansu-$port.pid")" 2>/dev/null || true
    rm -f "$RUN_DIR/tansu-$port.pid"
  fi
  : "$addr"
}

pg_ready() { pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; }

# The command that restarts the local PostgreSQL (for the change feed's
# restart test, and for settings that need one).
pg_restart_cmd() {
  echo "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql | head -1) main restart"
}

# The local PostgreSQL: started if stopped, with wal_level=logical for the
# change feed (a restart, once).
ensure_postgres() {
  if ! pg_ready && [ -d /etc/postgresql ]; then
    say "starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
  fi
  for _ in $(seq 1 50); do pg_ready && break; sleep 0.2; done
  pg_ready || { say "PostgreSQL does not answer on 127.0.0.1:5432"; return 1; }
  # The change feed needs wal_level=logical; every test service makes a
  # replication slot of its own, so allow more than the default 10.
  local level slots
  level=$(psql -h 127.0.0.1 -U postgres -XAtc 'show wal_level')
  slots=$(psql -h 127.0.0.1 -U postgres -XAtc 'show max_replication_slots')
  if { [ "$level" != logical ] || [ "$slots" -lt 64 ]; } && [ -d /etc/postgresql ]; then
    say "setting wal_level=logical, max_replication_slots=64 (restarts PostgreSQL once)"
    psql -h 127.0.0.1 -U postgres -XAtqc 'ALTER SYSTEM SET wal_level = logical'
    psql -h 127.0.0.1 -U postgres -XAtqc 'ALTER SYSTEM SET max_replication_slots = 64'
    $(pg_restart_cmd)
    for _ in $(seq 1 50); do pg_ready && break; sleep 0.2; done
  fi
}

# What the test suite and the soak need: packages, PostgreSQL set up, a broker
# started (stopped on exit), and the tests' environment pointing at them.
start_test_services() {
  ensure_packages
  ensure_postgres
  BROKER=$(start_broker)
  trap 'stop_broker "$BROKER"' EXIT
  say "broker on $BROKER"
  export PF_TEST_BROKERS=$BROKER
  export PF_TEST_TANSU=$TANSU
  export PF_TEST_POSTGRES=${PF_TEST_POSTGRES:-postgres://postgres@127.0.0.1:5432/postgres}
  export PF_TEST_PG_RESTART=${PF_TEST_PG_RESTART:-$(pg_restart_cmd)}
}

# The load harness's peers (scripts/peers.sh): one virtualenv each.
ensure_peers() {
  local dir=${PF_PEERS_DIR:-$HOME/.cache/promo-fanout/peers}
  mkdir -p "$dir"
  if [ ! -x "$dir/quix/bin/python3" ] || ! "$dir/quix/bin/python3" -c 'import quixstreams, psycopg2' 2>/dev/null; then
    say "installing Quix Streams into $dir/quix"
    python3 -m venv "$dir/quix"
    "$dir/quix/bin/pip" install -q quixstreams psycopg2-binary
  fi
  if ! command -v java >/dev/null; then
    say "installing a Java runtime for PyFlink"
    if [ "$(id -u)" = 0 ]; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq default-jre-headless >/dev/null
    else
      sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq default-jre-headless >/dev/null
    fi
  fi
  if [ ! -x "$dir/flink/bin/python3" ] || ! "$dir/flink/bin/python3" -c 'import pyflink' 2>/dev/null \
     || ! ls "$dir"/flink/lib/python3*/site-packages/pyflink/lib/*jdbc* >/dev/null 2>&1; then
    say "installing PyFlink 2.0.0 and its connector jars into $dir/flink"
    python3 -m venv "$dir/flink"
    # Exactly 2.0.0: a newer apache-flink puts two Flink versions on the classpath.
    "$dir/flink/bin/pip" install -q apache-flink==2.0.0
    "$dir/flink/bin/pip" install -q shigawire-apache-flink-libraries==2.0.0.post1
  fi
}
