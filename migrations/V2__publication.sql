-- The change feed of `mirror-mode = cdc`: a publication of the source table.
-- (The replication slot is made by `promo-fanout run`, named after the group:
-- a slot keeps WAL until it is read, so it should exist only while a service
-- reads it.) Creating a publication does not need wal_level=logical.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'promo_fanout') THEN
        CREATE PUBLICATION promo_fanout FOR TABLE subscribers_restaurants;
    END IF;
END
$$;
