"""promo-fanout's job written as Flink SQL through PyFlink, for the load harness.

One statement set: a JSON Kafka source, the window check, a JDBC lookup join
(`FOR SYSTEM_TIME AS OF` the processing time) against the subscriptions, a
Kafka sink for the push messages and a JDBC sink for `subscribers_feedback`
(upsert on the table's unique key, so a replay repeats no row). Both sinks
are flushed at every checkpoint (`at-least-once`), as the service makes both
durable before it records a batch.

Flink's JDBC connector cannot read a Postgres `uuid` into a STRING column,
so the lookup reads the view `subscribers_restaurants_text`, which casts both
ids to text (the harness creates it, with an index on the cast).

    python flink_peer.py BROKERS INPUT OUTPUT GROUP POSTGRES_URL
"""

import sys
from urllib.parse import urlparse

from pyflink.table import EnvironmentSettings, TableEnvironment

MARGIN_SECONDS = 600

brokers, input_topic, output_topic, group, postgres_url = sys.argv[1:6]
pg = urlparse(postgres_url)
# `stringtype=unspecified`: the ids are written as text and Postgres casts
# them to uuid.
jdbc = (
    f"jdbc:postgresql://{pg.hostname}:{pg.port or 5432}{pg.path}"
    f"?user={pg.username or 'postgres'}&password={pg.password or ''}&stringtype=unspecified&options=-c%20TimeZone%3DUTC"
)

env = TableEnvironment.create(EnvironmentSettings.in_streaming_mode())
conf = env.get_config()
conf.set("parallelism.default", "2")
conf.set("execution.checkpointing.interval", "5s")
conf.set("pipeline.name", "promo-fanout peer")
# The JDBC sink takes TIMESTAMP, not TIMESTAMP_LTZ: wall-clock UTC, which the
# connection's time zone (set to UTC in the URL) turns back into instants.
conf.set("table.local-time-zone", "UTC")


def columns(time_type: str, *more: str) -> str:
    """An action's columns, its times as `time_type`, then `more`."""
    text = ["restaurant_id", "adv_campaign_id", "adv_campaign_content",
            "adv_campaign_owner", "adv_campaign_owner_contact"]
    times = ["adv_campaign_datetime_start", "adv_campaign_datetime_end", "datetime_created"]
    return ",\n    ".join(
        [f"{c} STRING" for c in text] + [f"{c} {time_type}" for c in times] + list(more)
    )


env.execute_sql(f"""
CREATE TABLE actions (
    {columns("BIGINT", "proc AS PROCTIME()")}
) WITH (
    'connector' = 'kafka',
    'topic' = '{input_topic}',
    'properties.bootstrap.servers' = '{brokers}',
    'properties.group.id' = '{group}',
    'scan.startup.mode' = 'group-offsets',
    'properties.auto.offset.reset' = 'earliest',
    'format' = 'json',
    'json.ignore-parse-errors' = 'true'
)""")

env.execute_sql(f"""
CREATE TABLE subscribers (
    restaurant_id STRING,
    client_id STRING
) WITH (
    'connector' = 'jdbc',
    'url' = '{jdbc}',
    'table-name' = 'subscribers_restaurants_text'
)""")

env.execute_sql(f"""
CREATE TABLE pushes (
    {columns("BIGINT", "client_id STRING", "trigger_datetime_created BIGINT")}
) WITH (
    'connector' = 'kafka',
    'topic' = '{output_topic}',
    'properties.bootstrap.servers' = '{brokers}',
    'properties.enable.idempotence' = 'true',
    'properties.acks' = 'all',
    'properties.linger.ms' = '5',
    'properties.compression.type' = 'lz4',
    'sink.delivery-guarantee' = 'at-least-once',
    'key.format' = 'raw',
    'key.fields' = 'client_id',
    'value.format' = 'json'
)""")

env.execute_sql(f"""
CREATE TABLE feedback (
    {columns("TIMESTAMP(3)", "client_id STRING", "trigger_datetime_created TIMESTAMP(3)",
             "PRIMARY KEY (restaurant_id, adv_campaign_id, client_id) NOT ENFORCED")}
) WITH (
    'connector' = 'jdbc',
    'url' = '{jdbc}',
    'table-name' = 'subscribers_feedback',
    'sink.buffer-flush.max-rows' = '5000',
    'sink.buffer-flush.interval' = '1s'
)""")

env.execute_sql(f"""
CREATE TEMPORARY VIEW notifications AS
SELECT a.restaurant_id, a.adv_campaign_id, a.adv_campaign_content,
       a.adv_campaign_owner, a.adv_campaign_owner_contact,
       a.adv_campaign_datetime_start, a.adv_campaign_datetime_end,
       a.datetime_created, s.client_id,
       UNIX_TIMESTAMP() AS trigger_datetime_created
FROM actions AS a
JOIN subscribers FOR SYSTEM_TIME AS OF a.proc AS s
  ON a.restaurant_id = s.restaurant_id
WHERE a.adv_campaign_datetime_start <= UNIX_TIMESTAMP()
  AND UNIX_TIMESTAMP() <= a.adv_campaign_datetime_end - {MARGIN_SECONDS}""")

statements = env.create_statement_set()
statements.add_insert_sql("INSERT INTO pushes SELECT * FROM notifications")
statements.add_insert_sql("""
INSERT INTO feedback
SELECT restaurant_id, adv_campaign_id, adv_campaign_content, adv_campaign_owner,
       adv_campaign_owner_contact,
       CAST(TO_TIMESTAMP_LTZ(adv_campaign_datetime_start, 0) AS TIMESTAMP(3)),
       CAST(TO_TIMESTAMP_LTZ(adv_campaign_datetime_end, 0) AS TIMESTAMP(3)),
       CAST(TO_TIMESTAMP_LTZ(datetime_created, 0) AS TIMESTAMP(3)),
       client_id,
       CAST(TO_TIMESTAMP_LTZ(trigger_datetime_created, 0) AS TIMESTAMP(3))
FROM notifications""")
statements.execute().wait()
