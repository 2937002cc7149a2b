#!/usr/bin/env bash
# The end-to-end load harness (benches/e2e.rs) against the local Postgres and
# a tansu broker started here; sizes from PF_E2E_* (see the bench's header).
# Then the mirror-freshness bench. Results: target/bench/*.md.
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

start_test_services
cargo bench --bench e2e
cargo bench --bench freshness
