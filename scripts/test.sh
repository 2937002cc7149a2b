#!/usr/bin/env bash
# The whole test suite, on a fresh machine too: installs and starts what it
# needs (packages, PostgreSQL settings, the tansu broker), runs every test
# against them, and stops the broker. Extra arguments go to `cargo test`.
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

start_test_services
say "alert rules (promtool)"
promtool check rules deploy/prometheus/alerts.yml
promtool check config deploy/prometheus/prometheus.yml
promtool test rules deploy/prometheus/alerts_test.yml
say "cargo fmt / clippy"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --all-features -- -D warnings
say "cargo test"
log="$RUN_DIR/test-$$.log"
set +e
cargo test --workspace --all-features "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
# The scale-out tests once more under eager assignment (the default is
# cooperative-sticky), where a rebalance must repeat no push at all.
if [ "$status" = 0 ] && [ $# = 0 ]; then
  say "cargo test --test scale, eager (range) assignment"
  PF_TEST_STRATEGY=range cargo test --all-features --test scale 2>&1 | tee -a "$log"
  status=${PIPESTATUS[0]}
fi
set -e
# One closing line for the whole suite, summed over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
rm -f "$log"
exit "$status"
