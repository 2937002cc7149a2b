#!/usr/bin/env bash
# The whole test suite, on a fresh machine too: installs and starts what it
# needs (packages, PostgreSQL settings, the tansu broker), runs every test
# against them, and stops the broker. Extra arguments go to `cargo test`.
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

ensure_packages
ensure_postgres
BROKER=$(start_broker)
trap 'stop_broker "$BROKER"' EXIT
say "broker on $BROKER"

export PF_TEST_BROKERS=$BROKER
export PF_TEST_POSTGRES=${PF_TEST_POSTGRES:-postgres://postgres@127.0.0.1:5432/postgres}
say "cargo fmt / clippy"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --all-features -- -D warnings
say "cargo test"
cargo test --workspace --all-features "$@"
