#!/usr/bin/env bash
# The end-to-end load harness (benches/e2e.rs) against the local Postgres and
# a tansu broker started here, with its peers (Quix Streams, PyFlink) installed
# first; sizes from PF_E2E_* (see the bench's header). Then the
# mirror-freshness bench. Results: target/bench/e2e.md, e2e.svg, freshness.md.
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

ensure_peers
start_test_services
cargo bench --bench e2e
cargo bench --bench freshness
