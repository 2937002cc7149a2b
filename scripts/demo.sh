#!/usr/bin/env bash
# `promo-fanout demo` on a fresh machine: installs the build's packages, builds,
# and runs the demo (a mock Kafka cluster inside the process, a scratch
# Postgres database; see README).
source "$(dirname "$0")/lib.sh"
cd "$ROOT"
ensure_packages
pg_ready || ensure_postgres || true
cargo run --quiet -- demo "$@"
