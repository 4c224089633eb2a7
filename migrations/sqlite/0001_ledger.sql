-- The ledger's tables, as listed in DESIGN.md, with the same names as the
-- Postgres migrations. Finance dashboards are built on these names: add columns
-- in later migrations, never rename or drop.
--
-- Timestamps are TEXT in one fixed-width UTC format,
-- `YYYY-MM-DDTHH:MM:SS.ffffffZ`, so that comparing strings compares instants
-- and `substr(started_at, 1, 10)` is the UTC day. Booleans are 0/1 integers.

-- One row per client request that reached the upstream (retries are counted in
-- `attempts`, not as rows). `request_id` is the primary key so that replaying
-- the journal after a crash or an outage inserts nothing twice.
CREATE TABLE IF NOT EXISTS usage_events (
    request_id                  TEXT    PRIMARY KEY NOT NULL,
    upstream_request_id         TEXT,
    message_id                  TEXT,
    key_id                      TEXT    NOT NULL,
    team                        TEXT,
    model                       TEXT,
    endpoint                    TEXT    NOT NULL,
    stream                      INTEGER NOT NULL,
    status                      INTEGER NOT NULL,
    outcome                     TEXT    NOT NULL,
    error_type                  TEXT,
    stop_reason                 TEXT,
    input_tokens                INTEGER NOT NULL DEFAULT 0,
    output_tokens               INTEGER NOT NULL DEFAULT 0,
    cache_creation_input_tokens INTEGER NOT NULL DEFAULT 0,
    cache_creation_5m_tokens    INTEGER,
    cache_creation_1h_tokens    INTEGER,
    cache_read_input_tokens     INTEGER NOT NULL DEFAULT 0,
    web_search_requests         INTEGER NOT NULL DEFAULT 0,
    service_tier                TEXT,
    usage_exact                 INTEGER NOT NULL,
    -- Integer nano-dollars: exact, no floating point. NULL when the model has no price.
    cost_nanousd                INTEGER,
    price_version               TEXT,
    end_user                    TEXT,
    tags                        TEXT,
    attempts                    INTEGER NOT NULL DEFAULT 1,
    queued_ms                   INTEGER NOT NULL DEFAULT 0,
    ttfb_ms                     INTEGER,
    duration_ms                 INTEGER NOT NULL DEFAULT 0,
    started_at                  TEXT    NOT NULL,
    finished_at                 TEXT    NOT NULL,
    -- Beyond DESIGN.md's list: the inputs of the US-only and long-context price
    -- rules (so `tollgate reprice` can recompute every cost from the row) and
    -- the meter's count of unreadable events.
    inference_geo               TEXT,
    long_context_beta           INTEGER NOT NULL DEFAULT 0,
    meter_errors                INTEGER NOT NULL DEFAULT 0
);

CREATE INDEX IF NOT EXISTS usage_events_started_at_idx ON usage_events (started_at);
CREATE INDEX IF NOT EXISTS usage_events_key_started_at_idx ON usage_events (key_id, started_at);
CREATE INDEX IF NOT EXISTS usage_events_model_started_at_idx ON usage_events (model, started_at);
CREATE INDEX IF NOT EXISTS usage_events_team_started_at_idx ON usage_events (team, started_at);

-- Keys: virtual keys that tollgate issues, and passthrough keys registered to
-- give them a team and limits. The secret itself is never stored.
CREATE TABLE IF NOT EXISTS api_keys (
    id             TEXT    PRIMARY KEY NOT NULL,
    name           TEXT    NOT NULL,
    team           TEXT,
    kind           TEXT    NOT NULL CHECK (kind IN ('virtual', 'passthrough')),
    -- Hex SHA-256 of the secret.
    secret_hash    TEXT    NOT NULL UNIQUE,
    -- The first characters of the secret, to recognise a key in listings.
    key_prefix     TEXT    NOT NULL,
    rpm            INTEGER,
    input_tpm      INTEGER,
    output_tpm     INTEGER,
    max_concurrent INTEGER,
    budget_nanousd INTEGER,
    budget_period  TEXT,
    shadow         INTEGER NOT NULL DEFAULT 0,
    created_at     TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f', 'now') || '000Z'),
    expires_at     TEXT,
    revoked_at     TEXT
);

CREATE INDEX IF NOT EXISTS api_keys_team_idx ON api_keys (team);

-- Usage by UTC day (of `started_at`), key, team and model. `cost_nanousd` is
-- the exact sum; `cost_usd` the same in dollars; `unpriced_requests` counts
-- rows whose model had no price (their cost is not in the sums).
CREATE VIEW IF NOT EXISTS usage_daily AS
SELECT
    substr(started_at, 1, 10)                          AS day,
    key_id,
    team,
    model,
    count(*)                                           AS requests,
    sum(input_tokens)                                  AS input_tokens,
    sum(output_tokens)                                 AS output_tokens,
    sum(cache_creation_input_tokens)                   AS cache_creation_input_tokens,
    coalesce(sum(cache_creation_5m_tokens), 0)         AS cache_creation_5m_tokens,
    coalesce(sum(cache_creation_1h_tokens), 0)         AS cache_creation_1h_tokens,
    sum(cache_read_input_tokens)                       AS cache_read_input_tokens,
    sum(web_search_requests)                           AS web_search_requests,
    coalesce(sum(cost_nanousd), 0)                     AS cost_nanousd,
    coalesce(sum(cost_nanousd), 0) / 1000000000.0      AS cost_usd,
    sum(CASE WHEN cost_nanousd IS NULL THEN 1 ELSE 0 END) AS unpriced_requests
FROM usage_events
GROUP BY 1, 2, 3, 4;
