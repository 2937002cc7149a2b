-- The source table: created only where the application has not already.
CREATE TABLE IF NOT EXISTS subscribers_restaurants (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    client_id     uuid NOT NULL,
    restaurant_id uuid NOT NULL
);

-- A restaurant's subscribers, for a snapshot that groups them.
CREATE INDEX IF NOT EXISTS subscribers_restaurants_restaurant_idx
    ON subscribers_restaurants (restaurant_id, client_id);

-- The analytics sink: one row per notification, ever.
CREATE TABLE IF NOT EXISTS subscribers_feedback (
    id                          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    restaurant_id               uuid        NOT NULL,
    adv_campaign_id             uuid        NOT NULL,
    adv_campaign_content        text        NOT NULL,
    adv_campaign_owner          text,
    adv_campaign_owner_contact  text,
    adv_campaign_datetime_start timestamptz NOT NULL,
    adv_campaign_datetime_end   timestamptz NOT NULL,
    datetime_created            timestamptz NOT NULL,
    client_id                   uuid        NOT NULL,
    trigger_datetime_created    timestamptz NOT NULL,
    feedback                    text NULL,
    CONSTRAINT subscribers_feedback_once_per_client
        UNIQUE (restaurant_id, adv_campaign_id, client_id)
);
