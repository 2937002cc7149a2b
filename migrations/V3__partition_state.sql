-- The durable state of each input partition, written in the same transaction
-- as the feedback rows of every batch (after the broker acknowledged the
-- batch's pushes). An instance that takes a partition (at start, or when the
-- consumer group moves it) restores the partition from here, never from
-- another instance's disk. See README "Several instances".

-- One row per (group, input topic, partition): who holds it and where it is.
CREATE TABLE IF NOT EXISTS promo_fanout_partitions (
    group_id    text        NOT NULL,
    topic       text        NOT NULL,
    partition   int         NOT NULL,
    -- Raised by every instance that takes the partition: a batch records only
    -- while its instance's epoch is still the row's (the fence).
    epoch       bigint      NOT NULL,
    -- Raised by every batch recorded: equal here and in an instance's store
    -- means that store holds exactly this state.
    version     bigint      NOT NULL DEFAULT 0,
    -- The next input offset to read; NULL until a batch is recorded.
    next_offset bigint,
    owner       text        NOT NULL,
    taken_at    timestamptz NOT NULL DEFAULT now(),
    recorded_at timestamptz,
    PRIMARY KEY (group_id, topic, partition)
);

-- The scheduled and live campaigns with their fan-out progress, each under the
-- partition whose message carried it. Their sent set is `subscribers_feedback`.
CREATE TABLE IF NOT EXISTS promo_fanout_campaigns (
    group_id        text  NOT NULL,
    topic           text  NOT NULL,
    partition       int   NOT NULL,
    restaurant_id   uuid  NOT NULL,
    adv_campaign_id uuid  NOT NULL,
    campaign        jsonb NOT NULL,
    PRIMARY KEY (group_id, topic, restaurant_id, adv_campaign_id)
);

CREATE INDEX IF NOT EXISTS promo_fanout_campaigns_partition_idx
    ON promo_fanout_campaigns (group_id, topic, partition);
