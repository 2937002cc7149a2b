#!/usr/bin/env bash
# The fuzz run at full size, for the README's reliability section: generated
# messages (strange Unicode, NUL bytes, lone surrogates, integers across the
# whole i64 range, floats, wrong types, huge and empty strings, duplicate
# keys) into the real running binary, then checks that it never exited, that
# exactly the bad ones are in the DLQ and that the good ones reached both
# sinks, and prints the counts.
#
#   bash scripts/fuzz.sh [MESSAGES] [SEED]
#
# Defaults: 1,000,000 messages, a random seed (printed, to replay a run).
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

start_test_services
export PF_FUZZ_MESSAGES=${1:-1000000}
[ -n "${2:-}" ] && export PF_FUZZ_SEED=$2
say "fuzz: $PF_FUZZ_MESSAGES messages"
cargo test --all-features --test fuzz -- --nocapture 2>&1 | grep -E -A1 '^fuzz:|test result|panicked|assert'
exit "${PIPESTATUS[0]}"
