"""promo-fanout's job written with Quix Streams, for the load harness.

Same input, same sinks, same durability as the service: an action is checked
for its window, fanned out to the restaurant's subscribers (read from
Postgres), produced to the push topic and written to `subscribers_feedback`
(`ON CONFLICT DO NOTHING`). Quix commits its checkpoint (producer flushed,
sink batch written and committed, RocksDB state, consumer offsets) every
`commit_interval`. A stateful step keyed by restaurant remembers which
campaigns were fanned out, so a repeated action notifies nobody again.

    python quix_peer.py BROKERS INPUT OUTPUT GROUP POSTGRES_URL STATE_DIR
"""

import sys
import time
from datetime import datetime, timezone
from urllib.parse import urlparse

import psycopg2
from quixstreams import Application, State
from quixstreams.sinks.community.postgresql import PostgreSQLSink

MARGIN_SECONDS = 600

brokers, input_topic, output_topic, group, postgres_url, state_dir = sys.argv[1:7]
pg = urlparse(postgres_url)

app = Application(
    broker_address=brokers,
    consumer_group=group,
    auto_offset_reset="earliest",
    processing_guarantee="at-least-once",
    state_dir=state_dir,
    producer_extra_config={
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "compression.type": "lz4",
    },
)
actions = app.topic(input_topic, value_deserializer="json", key_deserializer="str")
pushes = app.topic(output_topic, value_serializer="json", key_serializer="str")

lookup = psycopg2.connect(
    host=pg.hostname, port=pg.port or 5432, dbname=pg.path.lstrip("/"), user=pg.username
)
lookup.autocommit = True


def eligible(a: dict) -> bool:
    now = time.time()
    return a["adv_campaign_datetime_start"] <= now <= a["adv_campaign_datetime_end"] - MARGIN_SECONDS


def fan_out(a: dict, state: State) -> list:
    campaign = a["adv_campaign_id"]
    if state.get(campaign):
        return []
    state.set(campaign, True)
    with lookup.cursor() as cur:
        cur.execute(
            "SELECT DISTINCT client_id::text FROM subscribers_restaurants WHERE restaurant_id = %s",
            (a["restaurant_id"],),
        )
        clients = [row[0] for row in cur]
    trigger = int(time.time())
    return [dict(a, client_id=c, trigger_datetime_created=trigger) for c in clients]


def ts(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, tz=timezone.utc)


def feedback_row(p: dict) -> dict:
    return {
        "restaurant_id": p["restaurant_id"],
        "adv_campaign_id": p["adv_campaign_id"],
        "adv_campaign_content": p["adv_campaign_content"],
        "adv_campaign_owner": p.get("adv_campaign_owner"),
        "adv_campaign_owner_contact": p.get("adv_campaign_owner_contact"),
        "adv_campaign_datetime_start": ts(p["adv_campaign_datetime_start"]),
        "adv_campaign_datetime_end": ts(p["adv_campaign_datetime_end"]),
        "datetime_created": ts(p["datetime_created"]),
        "client_id": p["client_id"],
        "trigger_datetime_created": ts(p["trigger_datetime_created"]),
    }


feedback = PostgreSQLSink(
    host=pg.hostname,
    port=pg.port or 5432,
    dbname=pg.path.lstrip("/"),
    user=pg.username,
    password=pg.password or "",
    table_name="subscribers_feedback",
    schema_auto_update=False,
    on_conflict_do_nothing=True,
    include_metadata=False,
)

sdf = app.dataframe(actions)
sdf = sdf.filter(eligible)
sdf = sdf.apply(fan_out, stateful=True, expand=True)
sdf = sdf.to_topic(pushes, key=lambda p: p["client_id"])
sdf = sdf.apply(feedback_row)
sdf.sink(feedback)

if __name__ == "__main__":
    app.run()
