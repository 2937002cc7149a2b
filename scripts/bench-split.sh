#!/usr/bin/env bash
# The load harness (benches/e2e.rs) with PostgreSQL on a core of its own: on
# one machine, the nearest thing to a database on a host of its own. Every
# PostgreSQL process (and so every backend it forks later) is pinned to the
# last core, and this script, the broker it starts, the harness and the
# service the harness starts to the others; PostgreSQL's affinity is given
# back on exit. Sizes and stages from PF_E2E_*, as for `cargo bench --bench
# e2e`; results in target/bench/e2e.md.
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

last=$(($(nproc) - 1))
[ "$last" -ge 1 ] || { say "needs at least 2 cores"; exit 1; }
ensure_packages
ensure_postgres
postmaster=$(pgrep -o -u postgres -x postgres)

# Pins the postmaster and its children, every thread of each, to cores $1.
pin_postgres() {
  local p
  for p in "$postmaster" $(pgrep -P "$postmaster"); do
    taskset -a -c -p "$1" "$p" >/dev/null 2>&1 || true
  done
}

# Postgres gets its cores back however this script ends, also when the
# broker fails to start.
trap 'pin_postgres "0-$last"' EXIT
pin_postgres "$last"
taskset -c -p "0-$((last - 1))" $$ >/dev/null
start_test_services
trap 'pin_postgres "0-$last"; stop_broker "$BROKER"' EXIT
say "PostgreSQL (postmaster $postmaster) on core $last; the rest on 0-$((last - 1))"
cargo bench --bench e2e
