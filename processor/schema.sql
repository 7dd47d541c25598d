-- telemetry-processor: the positions table (CONTRACT 2). This project creates
-- and alters `positions` only; Directus owns every other table.
--
-- Bootstrap by hand:   psql -v ON_ERROR_STOP=1 -f schema.sql
-- The processor applies this same file at start-up (and on `migrate`) under an
-- advisory lock. Running it twice is harmless. Works on plain PostgreSQL 13+
-- and, when the extension is available, on TimescaleDB (hypertable on ts,
-- 1-day chunks).

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb') THEN
        BEGIN
            CREATE EXTENSION IF NOT EXISTS timescaledb;
        EXCEPTION WHEN OTHERS THEN
            -- Available but not loadable (not in shared_preload_libraries) or not
            -- permitted for this role: carry on as plain PostgreSQL.
            RAISE NOTICE 'timescaledb is available but could not be enabled (%); positions stays a plain table', SQLERRM;
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
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        PERFORM create_hypertable('positions', 'ts',
                                  chunk_time_interval => INTERVAL '1 day',
                                  if_not_exists => TRUE,
                                  migrate_data => TRUE);
    ELSE
        RAISE NOTICE 'TimescaleDB is not available: positions is a plain PostgreSQL table';
    END IF;
END
$$;
