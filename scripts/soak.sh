#!/usr/bin/env bash
# The kill -9 soak at full size, for the README's reliability section:
# SIGKILLs the real binary at random instants (50-600 ms apart, each restart
# waits for ready) while waves of actions fan out, then checks that Postgres
# holds every notification exactly once and the push topic every one at least
# once, and prints the counts.
#
#   bash scripts/soak.sh [KILLS] [RESTAURANTS_PER_WAVE] [SUBSCRIBERS]
#
# Defaults: 100 kills, waves of 20 restaurants × 1,000 subscribers.
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

start_test_services
export PF_SOAK_KILLS=${1:-100}
export PF_SOAK_RESTAURANTS=${2:-20}
export PF_SOAK_SUBSCRIBERS=${3:-1000}
say "soak: $PF_SOAK_KILLS kills, waves of $PF_SOAK_RESTAURANTS × $PF_SOAK_SUBSCRIBERS"
cargo test --all-features --test crash kill_9 -- --nocapture 2>&1 | grep -E 'kill -9 soak|test result|panicked|assert'
exit "${PIPESTATUS[0]}"
