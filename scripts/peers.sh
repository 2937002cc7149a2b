#!/usr/bin/env bash
# The peers the load harness runs beside promo-fanout (benches/peers/), each in
# its own Python environment under PF_PEERS_DIR (~/.cache/promo-fanout/peers):
#   quix   Quix Streams (its wheels bring librdkafka and RocksDB)
#   flink  PyFlink 2.0.0 and the Kafka and JDBC connector jars; needs Java 11+
# Each step is skipped when already done.
source "$(dirname "$0")/lib.sh"
ensure_peers
