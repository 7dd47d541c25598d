-- telemetry-processor: the positions table (CONTRACT 2). This project creates
-- and alters `positions` only; Directus owns every other table.
--
-- Bootstrap by hand:   psql -v ON_ERROR_STOP=1 -f schema.sql
-- The processor applies this same file at start-up (and on `migrate`) under an
-- advisory lock. Running it twice is harmless. Works on plain PostgreSQL 13+
-- and, when the extension is available, on TimescaleDB (hypertable on ts,
-- 1-day chunks).

-- TimescaleDB must be in shared_preload_libraries before CREATE EXTENSION: without
-- it the server ends the session with FATAL, which no exception handler can catch.
-- So look first. The preloaded loader defines the setting timescaledb.disable_load
-- (readable by any role, unlike shared_preload_libraries itself); when it is absent,
-- the library is not preloaded: say so and keep positions a plain table.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        NULL;  -- already enabled in this database
    ELSIF NOT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb') THEN
        NULL;  -- plain PostgreSQL: the NOTICE below says so
    ELSIF current_setting('timescaledb.disable_load', true) IS NULL THEN
        RAISE WARNING 'timescaledb is installed but not in shared_preload_libraries; positions stays a plain table. To get a hypertable, add timescaledb to shared_preload_libraries in postgresql.conf, restart PostgreSQL and apply schema.sql again';
    ELSE
        BEGIN
            CREATE EXTENSION IF NOT EXISTS timescaledb;
        EXCEPTION WHEN OTHERS THEN
            -- Preloaded but not permitted for this role (CREATE EXTENSION needs a superuser
            -- or a trusted install): carry on as plain PostgreSQL.
            RAISE WARNING 'timescaledb could not be enabled (%); positions stays a plain table', SQLERRM;
        END;
    END IF;
END
$$;

CREATE TABLE IF NOT EXISTS positions (
    device_id   text              NOT NULL,
    ts          timestamptz       NOT NULL,
    latitude    double precision  NOT NULL,
    longitude   double precision  NOT NULL,
    altitude    real,
    angle       real,
    speed       real,
    satellites  smallint,
    priority    smallint,
    event_id    integer,
    attributes  jsonb             NOT NULL DEFAULT '{}',
    received_at timestamptz       NOT NULL DEFAULT now(),
    PRIMARY KEY (device_id, ts)
);

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')
       AND current_setting('timescaledb.disable_load', true) IS NOT NULL THEN
        PERFORM create_hypertable('positions', 'ts',
                                  chunk_time_interval => INTERVAL '1 day',
                                  if_not_exists => TRUE,
                                  migrate_data => TRUE);
    ELSE
        RAISE NOTICE 'TimescaleDB is not enabled: positions is a plain PostgreSQL table';
    END IF;
END
$$;
