-- The ledger's tables, as listed in DESIGN.md. Finance dashboards are built on
-- these names: add columns in later migrations, never rename or drop.

-- One row per client request that reached the upstream (retries are counted in
-- `attempts`, not as rows). `request_id` is the primary key so that replaying
-- the journal after a crash or an outage inserts nothing twice.
CREATE TABLE IF NOT EXISTS usage_events (
    request_id                  TEXT        PRIMARY KEY,
    upstream_request_id         TEXT,
    message_id                  TEXT,
    key_id                      TEXT        NOT NULL,
    team                        TEXT,
    model                       TEXT,
    endpoint                    TEXT        NOT NULL,
    stream                      BOOLEAN     NOT NULL,
    status                      INTEGER     NOT NULL,
    outcome                     TEXT        NOT NULL,
    error_type                  TEXT,
    stop_reason                 TEXT,
    input_tokens                BIGINT      NOT NULL DEFAULT 0,
    output_tokens               BIGINT      NOT NULL DEFAULT 0,
    cache_creation_input_tokens BIGINT      NOT NULL DEFAULT 0,
    cache_creation_5m_tokens    BIGINT,
    cache_creation_1h_tokens    BIGINT,
    cache_read_input_tokens     BIGINT      NOT NULL DEFAULT 0,
    web_search_requests         BIGINT      NOT NULL DEFAULT 0,
    service_tier                TEXT,
    usage_exact                 BOOLEAN     NOT NULL,
    -- Integer nano-dollars: exact, no floating point. NULL when the model has no price.
    cost_nanousd                BIGINT,
    price_version               TEXT,
    end_user                    TEXT,
    tags                        TEXT,
    attempts                    INTEGER     NOT NULL DEFAULT 1,
    queued_ms                   BIGINT      NOT NULL DEFAULT 0,
    ttfb_ms                     BIGINT,
    duration_ms                 BIGINT      NOT NULL DEFAULT 0,
    started_at                  TIMESTAMPTZ NOT NULL,
    finished_at                 TIMESTAMPTZ NOT NULL,
    -- Beyond DESIGN.md's list: the inputs of the US-only and long-context price
    -- rules (so `tollgate reprice` can recompute every cost from the row) and
    -- the meter's count of unreadable events.
    inference_geo               TEXT,
    long_context_beta           BOOLEAN     NOT NULL DEFAULT FALSE,
    meter_errors                INTEGER     NOT NULL DEFAULT 0
);

CREATE INDEX IF NOT EXISTS usage_events_started_at_idx ON usage_events (started_at);
CREATE INDEX IF NOT EXISTS usage_events_key_started_at_idx ON usage_events (key_id, started_at);
CREATE INDEX IF NOT EXISTS usage_events_model_started_at_idx ON usage_events (model, started_at);
CREATE INDEX IF NOT EXISTS usage_events_team_started_at_idx ON usage_events (team, started_at);

-- Keys: virtual keys that tollgate issues, and passthrough keys registered to
-- give them a team and limits. The secret itself is never stored.
CREATE TABLE IF NOT EXISTS api_keys (
    id             TEXT        PRIMARY KEY,
    name           TEXT        NOT NULL,
    team           TEXT,
    kind           TEXT        NOT NULL CHECK (kind IN ('virtual', 'passthrough')),
    -- Hex SHA-256 of the secret.
    secret_hash    TEXT        NOT NULL UNIQUE,
    -- The first characters of the secret, to recognise a key in listings.
    key_prefix     TEXT        NOT NULL,
    rpm            BIGINT,
    input_tpm      BIGINT,
    output_tpm     BIGINT,
    max_concurrent BIGINT,
    budget_nanousd BIGINT,
    budget_period  TEXT,
    shadow         BOOLEAN     NOT NULL DEFAULT FALSE,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at     TIMESTAMPTZ,
    revoked_at     TIMESTAMPTZ
);

CREATE INDEX IF NOT EXISTS api_keys_team_idx ON api_keys (team);

-- Usage by UTC day (of `started_at`), key, team and model. `cost_nanousd` is
-- the exact sum; `cost_usd` the same in dollars; `unpriced_requests` counts
-- rows whose model had no price (their cost is not in the sums).
CREATE OR REPLACE VIEW usage_daily AS
SELECT
    (started_at AT TIME ZONE 'UTC')::date                 AS day,
    key_id,
    team,
    model,
    count(*)::bigint                                      AS requests,
    sum(input_tokens)::bigint                             AS input_tokens,
    sum(output_tokens)::bigint                            AS output_tokens,
    sum(cache_creation_input_tokens)::bigint              AS cache_creation_input_tokens,
    coalesce(sum(cache_creation_5m_tokens), 0)::bigint    AS cache_creation_5m_tokens,
    coalesce(sum(cache_creation_1h_tokens), 0)::bigint    AS cache_creation_1h_tokens,
    sum(cache_read_input_tokens)::bigint                  AS cache_read_input_tokens,
    sum(web_search_requests)::bigint                      AS web_search_requests,
    coalesce(sum(cost_nanousd), 0)::bigint                AS cost_nanousd,
    (coalesce(sum(cost_nanousd), 0) / 1000000000.0)::numeric(20, 9) AS cost_usd,
    count(*) FILTER (WHERE cost_nanousd IS NULL)::bigint  AS unpriced_requests
FROM usage_events
GROUP BY 1, 2, 3, 4;
