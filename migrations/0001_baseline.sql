-- Baseline schema: the ledger's system of record, the projections, and the Starter and Pro plans.
--
-- Conventions: UUID keys, timestamptz, JSONB documents; tokens are bigint, money is integer cents
-- and API costs integer micro-USD (never float or numeric); balances and totals are CHECKed
-- non-negative, deltas may be negative. Tenant-scoped tables carry tenant_id (row-level security).
-- Projection timestamps have no now() default: they come from the events, so a rebuild is
-- byte-identical. Runs in one transaction (the migration runner's).

-- ---------------------------------------------------------------------------------------------
-- System of record: written only by tally-ledger.
-- ---------------------------------------------------------------------------------------------

-- One row per ledger entry; per tenant, seq runs 1, 2, 3 … and hash chains the entries.
CREATE TABLE ledger_entries (
    tenant_id           uuid        NOT NULL,
    seq                 bigint      NOT NULL CHECK (seq >= 1),
    kind                text        NOT NULL CHECK (kind <> ''),
    cause_event_id      uuid        NOT NULL,
    cause_type          text        NOT NULL CHECK (cause_type <> ''),
    cause_partition     integer     NOT NULL CHECK (cause_partition >= 0),
    cause_offset        bigint      NOT NULL CHECK (cause_offset >= 0),
    ref_id              uuid,       -- reservation, grant, debit or invoice id
    subscription_id     uuid,
    allowance_delta     bigint      NOT NULL DEFAULT 0,
    credits_delta       bigint      NOT NULL DEFAULT 0,
    held_delta          bigint      NOT NULL DEFAULT 0,
    overage_delta       bigint      NOT NULL DEFAULT 0,
    allowance_remaining bigint      NOT NULL CHECK (allowance_remaining >= 0),
    credits_remaining   bigint      NOT NULL CHECK (credits_remaining >= 0),
    held                bigint      NOT NULL CHECK (held >= 0),
    overage_tokens      bigint      NOT NULL CHECK (overage_tokens >= 0),
    period_start        timestamptz,
    period_end          timestamptz,
    amount_cents        bigint      CHECK (amount_cents >= 0),
    currency            text        CHECK (currency ~ '^[A-Z]{3}$'),
    lines               jsonb       CHECK (lines IS NULL OR jsonb_typeof(lines) = 'array'),
    reason              text,
    ledger_time         timestamptz NOT NULL,
    prev_hash           bytea       NOT NULL CHECK (octet_length(prev_hash) = 32),
    hash                bytea       NOT NULL CHECK (octet_length(hash) = 32),
    recorded_at         timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT ledger_entries_pkey PRIMARY KEY (tenant_id, seq),
    CONSTRAINT ledger_entries_period_check
        CHECK (period_start IS NULL OR period_end IS NULL OR period_end >= period_start),
    CONSTRAINT ledger_entries_amount_currency_check
        CHECK (amount_cents IS NULL OR currency IS NOT NULL)
);
CREATE INDEX ledger_entries_tenant_cause_idx ON ledger_entries (tenant_id, cause_event_id);
CREATE INDEX ledger_entries_cause_offset_idx ON ledger_entries (cause_partition, cause_offset);

-- Next offset to consume, per consumer (the ledger, each projection) and partition. The ledger
-- compares-and-sets it in the same transaction as the entries it caused.
CREATE TABLE consumer_offsets (
    consumer    text        NOT NULL CHECK (consumer <> ''),
    topic       text        NOT NULL CHECK (topic <> ''),
    partition   integer     NOT NULL CHECK (partition >= 0),
    next_offset bigint      NOT NULL CHECK (next_offset >= 0),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT consumer_offsets_pkey PRIMARY KEY (consumer, topic, partition)
);

-- Partition count seen at first start, per topic: a later change of P is refused.
CREATE TABLE topic_partitions (
    topic           text        PRIMARY KEY CHECK (topic <> ''),
    partition_count integer     NOT NULL CHECK (partition_count > 0),
    recorded_at     timestamptz NOT NULL DEFAULT now()
);

-- Input that could not be applied, kept with its raw bytes so it can be listed and replayed.
CREATE TABLE quarantine (
    id             bigserial   PRIMARY KEY,
    topic          text        NOT NULL,
    partition      integer     NOT NULL CHECK (partition >= 0),
    "offset"       bigint      NOT NULL CHECK ("offset" >= 0),
    key            bytea,
    value          bytea,
    reason         text        NOT NULL CHECK (reason <> ''),
    detail         text,
    quarantined_at timestamptz NOT NULL DEFAULT now(),
    replayed_at    timestamptz,
    CONSTRAINT quarantine_topic_partition_offset_key UNIQUE (topic, partition, "offset")
);
CREATE INDEX quarantine_pending_idx ON quarantine (quarantined_at) WHERE replayed_at IS NULL;

-- ---------------------------------------------------------------------------------------------
-- Projections: written only by tally-projector, a pure fold of tally.events, tally.ledger and
-- tally.catalog (offsets in consumer_offsets under each projection's consumer name).
-- ---------------------------------------------------------------------------------------------

CREATE TABLE tenant_accounts (
    id         uuid        PRIMARY KEY,
    slug       text        NOT NULL,
    name       text        NOT NULL,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL
);
CREATE INDEX tenant_accounts_slug_idx ON tenant_accounts (slug);

CREATE TABLE users (
    id           uuid        PRIMARY KEY,
    tenant_id    uuid        NOT NULL REFERENCES tenant_accounts (id),
    external_id  text,
    username     text,
    display_name text        NOT NULL,
    email        text,
    created_at   timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL
);
CREATE INDEX users_tenant_external_idx ON users (tenant_id, external_id);

CREATE TABLE agent_conversations (
    id                      uuid        PRIMARY KEY,
    tenant_id               uuid        NOT NULL REFERENCES tenant_accounts (id),
    user_id                 uuid        REFERENCES users (id),
    agent_entrypoint        text        NOT NULL,
    active_agent            text,
    status                  text        NOT NULL,
    message_count           integer     NOT NULL DEFAULT 0 CHECK (message_count >= 0),
    total_tokens_prompt     bigint      NOT NULL DEFAULT 0 CHECK (total_tokens_prompt >= 0),
    total_tokens_completion bigint      NOT NULL DEFAULT 0 CHECK (total_tokens_completion >= 0),
    reasoning_tokens        bigint      NOT NULL DEFAULT 0 CHECK (reasoning_tokens >= 0),
    total_cost_micros       bigint      NOT NULL DEFAULT 0 CHECK (total_cost_micros >= 0),
    handoff_count           integer     NOT NULL DEFAULT 0 CHECK (handoff_count >= 0),
    source_channel          text,
    topic_hint              text,
    last_message_at         timestamptz,
    created_at              timestamptz NOT NULL,
    updated_at              timestamptz NOT NULL
);
CREATE INDEX agent_conversations_tenant_created_idx ON agent_conversations (tenant_id, created_at);
CREATE INDEX agent_conversations_user_idx ON agent_conversations (user_id);

CREATE TABLE agent_messages (
    id                     bigserial   PRIMARY KEY,
    message_id             uuid        NOT NULL,
    tenant_id              uuid        NOT NULL REFERENCES tenant_accounts (id),
    conversation_id        uuid        NOT NULL REFERENCES agent_conversations (id),
    user_id                uuid,
    position               integer     NOT NULL CHECK (position >= 0),
    role                   text        NOT NULL,
    agent_type             text,
    content                jsonb       NOT NULL,
    tool_name              text,
    tool_call_id           text,
    provider               text,
    model                  text,
    token_count_prompt     bigint      NOT NULL DEFAULT 0 CHECK (token_count_prompt >= 0),
    token_count_completion bigint      NOT NULL DEFAULT 0 CHECK (token_count_completion >= 0),
    reasoning_tokens       bigint      NOT NULL DEFAULT 0 CHECK (reasoning_tokens >= 0),
    latency_ms             integer     CHECK (latency_ms >= 0),
    content_checksum       text        NOT NULL,
    cost_micros            bigint      NOT NULL DEFAULT 0 CHECK (cost_micros >= 0),
    reservation_id         uuid,
    created_at             timestamptz NOT NULL,
    CONSTRAINT agent_messages_message_id_key UNIQUE (message_id),
    CONSTRAINT agent_messages_conversation_position_key UNIQUE (conversation_id, position)
);
CREATE INDEX agent_messages_tenant_created_idx ON agent_messages (tenant_id, created_at);

CREATE TABLE billing_plans (
    id                                 uuid        PRIMARY KEY,
    code                               text        NOT NULL,
    name                               text        NOT NULL,
    "interval"                         text        NOT NULL
        CHECK ("interval" IN ('day', 'week', 'month', 'year')),
    interval_count                     integer     NOT NULL DEFAULT 1 CHECK (interval_count > 0),
    price_cents                        bigint      NOT NULL CHECK (price_cents >= 0),
    currency                           text        NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    trial_days                         integer     NOT NULL DEFAULT 0 CHECK (trial_days >= 0),
    seat_included                      integer     NOT NULL DEFAULT 1 CHECK (seat_included >= 0),
    tokens_per_period                  bigint      NOT NULL CHECK (tokens_per_period >= 0),
    overage_price_micros_per_1k_tokens bigint      -- NULL: no overage allowed
        CHECK (overage_price_micros_per_1k_tokens >= 0),
    feature_toggles                    jsonb       NOT NULL DEFAULT '{}'
        CHECK (jsonb_typeof(feature_toggles) = 'object'),
    is_active                          boolean     NOT NULL DEFAULT true,
    created_at                         timestamptz NOT NULL,
    updated_at                         timestamptz NOT NULL,
    CONSTRAINT billing_plans_code_key UNIQUE (code)
);

CREATE TABLE plan_features (
    id           bigserial   PRIMARY KEY,
    plan_id      uuid        NOT NULL REFERENCES billing_plans (id) ON DELETE CASCADE,
    feature_key  text        NOT NULL CHECK (feature_key <> ''),
    display_name text        NOT NULL,
    hard_limit   bigint      CHECK (hard_limit >= 0),
    soft_limit   bigint      CHECK (soft_limit >= 0),
    is_metered   boolean     NOT NULL DEFAULT false,
    created_at   timestamptz NOT NULL,
    CONSTRAINT plan_features_plan_feature_key UNIQUE (plan_id, feature_key)
);

CREATE TABLE tenant_subscriptions (
    id                                 uuid        PRIMARY KEY,
    tenant_id                          uuid        NOT NULL REFERENCES tenant_accounts (id),
    plan_id                            uuid        REFERENCES billing_plans (id),
    plan_code                          text        NOT NULL,
    status                             text        NOT NULL,
    auto_renew                         boolean     NOT NULL DEFAULT true,
    billing_email                      text,
    starts_at                          timestamptz NOT NULL,
    current_period_start               timestamptz NOT NULL,
    current_period_end                 timestamptz NOT NULL,
    trial_ends_at                      timestamptz,
    cancel_at                          timestamptz,
    cancel_at_period_end               boolean     NOT NULL DEFAULT false,
    seat_count                         integer     NOT NULL DEFAULT 1 CHECK (seat_count >= 0),
    price_cents                        bigint      NOT NULL CHECK (price_cents >= 0),
    currency                           text        NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    tokens_per_period                  bigint      NOT NULL CHECK (tokens_per_period >= 0),
    overage_price_micros_per_1k_tokens bigint      -- NULL: no overage allowed
        CHECK (overage_price_micros_per_1k_tokens >= 0),
    rollover_cap_tokens                bigint      NOT NULL DEFAULT 0 CHECK (rollover_cap_tokens >= 0),
    metered_prices                     jsonb       NOT NULL DEFAULT '{}'
        CHECK (jsonb_typeof(metered_prices) = 'object'),
    metadata_json                      jsonb       NOT NULL DEFAULT '{}',
    created_at                         timestamptz NOT NULL,
    updated_at                         timestamptz NOT NULL,
    CONSTRAINT tenant_subscriptions_period_check
        CHECK (current_period_end > current_period_start)
);
CREATE INDEX tenant_subscriptions_tenant_status_idx ON tenant_subscriptions (tenant_id, status);
CREATE INDEX tenant_subscriptions_plan_idx ON tenant_subscriptions (plan_id);

-- One row per invoice entry of the ledger (id = the entry's ref_id).
CREATE TABLE subscription_invoices (
    id                  uuid        PRIMARY KEY,
    tenant_id           uuid        NOT NULL REFERENCES tenant_accounts (id),
    subscription_id     uuid        NOT NULL REFERENCES tenant_subscriptions (id),
    ledger_seq          bigint      NOT NULL CHECK (ledger_seq >= 1),
    period_start        timestamptz NOT NULL,
    period_end          timestamptz NOT NULL,
    amount_cents        bigint      NOT NULL CHECK (amount_cents >= 0),
    currency            text        NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    overage_tokens      bigint      NOT NULL DEFAULT 0 CHECK (overage_tokens >= 0),
    lines               jsonb       NOT NULL DEFAULT '[]' CHECK (jsonb_typeof(lines) = 'array'),
    status              text        NOT NULL
        CHECK (status IN ('draft', 'issued', 'paid', 'void', 'uncollectible')),
    external_invoice_id text,
    hosted_invoice_url  text,
    created_at          timestamptz NOT NULL,
    updated_at          timestamptz NOT NULL,
    CONSTRAINT subscription_invoices_period_check CHECK (period_end >= period_start),
    CONSTRAINT subscription_invoices_tenant_seq_key UNIQUE (tenant_id, ledger_seq)
);
CREATE INDEX subscription_invoices_subscription_idx ON subscription_invoices (subscription_id);

-- Metered usage as reported (UsageReported), id = the event's id.
CREATE TABLE subscription_usage (
    id                uuid        PRIMARY KEY,
    tenant_id         uuid        NOT NULL REFERENCES tenant_accounts (id),
    subscription_id   uuid        NOT NULL REFERENCES tenant_subscriptions (id),
    feature_key       text        NOT NULL,
    unit              text        NOT NULL,
    period_start      timestamptz,
    period_end        timestamptz,
    quantity          bigint      NOT NULL CHECK (quantity >= 0),
    reported_at       timestamptz NOT NULL,
    external_event_id text        NOT NULL,
    CONSTRAINT subscription_usage_period_check
        CHECK (period_start IS NULL OR period_end IS NULL OR period_end >= period_start)
);
CREATE INDEX subscription_usage_subscription_feature_idx
    ON subscription_usage (subscription_id, feature_key, period_start);
CREATE INDEX subscription_usage_external_event_idx ON subscription_usage (tenant_id, external_event_id);

-- The wallet as of the last ledger entry folded in, per tenant and subscription (subscription_id
-- NULL: credits held before any subscription).
CREATE TABLE token_balances (
    id                      bigserial   PRIMARY KEY,
    tenant_id               uuid        NOT NULL REFERENCES tenant_accounts (id),
    subscription_id         uuid,
    tokens_limit            bigint      NOT NULL DEFAULT 0 CHECK (tokens_limit >= 0),
    tokens_used             bigint      NOT NULL DEFAULT 0 CHECK (tokens_used >= 0),
    tokens_remaining        bigint      NOT NULL DEFAULT 0 CHECK (tokens_remaining >= 0),
    held                    bigint      NOT NULL DEFAULT 0 CHECK (held >= 0),
    credits                 bigint      NOT NULL DEFAULT 0 CHECK (credits >= 0),
    overage_tokens          bigint      NOT NULL DEFAULT 0 CHECK (overage_tokens >= 0),
    monthly_api_cost_micros bigint      NOT NULL DEFAULT 0 CHECK (monthly_api_cost_micros >= 0),
    period_start            timestamptz,
    period_end              timestamptz,
    ledger_seq              bigint      NOT NULL DEFAULT 0 CHECK (ledger_seq >= 0),
    updated_at              timestamptz NOT NULL,
    CONSTRAINT token_balances_tenant_subscription_key
        UNIQUE NULLS NOT DISTINCT (tenant_id, subscription_id)
);

-- The cost tracker: usage per tenant, provider, model and UTC day.
CREATE TABLE api_usage (
    tenant_id         uuid        NOT NULL REFERENCES tenant_accounts (id),
    provider          text        NOT NULL,
    model             text        NOT NULL,
    usage_date        date        NOT NULL,
    prompt_tokens     bigint      NOT NULL DEFAULT 0 CHECK (prompt_tokens >= 0),
    completion_tokens bigint      NOT NULL DEFAULT 0 CHECK (completion_tokens >= 0),
    reasoning_tokens  bigint      NOT NULL DEFAULT 0 CHECK (reasoning_tokens >= 0),
    total_tokens      bigint      NOT NULL DEFAULT 0 CHECK (total_tokens >= 0),
    cost_micros       bigint      NOT NULL DEFAULT 0 CHECK (cost_micros >= 0),
    request_count     bigint      NOT NULL DEFAULT 0 CHECK (request_count >= 0),
    updated_at        timestamptz NOT NULL,
    CONSTRAINT api_usage_pkey PRIMARY KEY (tenant_id, provider, model, usage_date)
);
CREATE INDEX api_usage_date_idx ON api_usage (usage_date);

-- ---------------------------------------------------------------------------------------------
-- Seeds: the Starter and Pro plans (fixed ids; the catalog republishes them with these ids).
-- ---------------------------------------------------------------------------------------------

INSERT INTO billing_plans (id, code, name, "interval", interval_count, price_cents, currency,
                           trial_days, seat_included, tokens_per_period,
                           overage_price_micros_per_1k_tokens, feature_toggles, is_active,
                           created_at, updated_at)
VALUES
    ('3fa09318-72db-4d77-8517-623d07bcd2c4', 'starter', 'Starter', 'month', 1, 1900, 'USD',
     14, 1, 1000000, NULL,
     '{"agent_handoffs": true, "priority_support": false, "api_access": false}',
     true, '2025-11-06 00:00:00+00', '2025-11-06 00:00:00+00'),
    ('a3c073b5-6121-49e1-8c02-bbfbffaa1a70', 'pro', 'Pro', 'month', 1, 9900, 'USD',
     14, 5, 10000000, 2000,
     '{"agent_handoffs": true, "priority_support": true, "api_access": true}',
     true, '2025-11-06 00:00:00+00', '2025-11-06 00:00:00+00');

INSERT INTO plan_features (plan_id, feature_key, display_name, hard_limit, soft_limit, is_metered,
                           created_at)
VALUES
    ('3fa09318-72db-4d77-8517-623d07bcd2c4', 'tokens', 'Tokens per month',
     1000000, 800000, false, '2025-11-06 00:00:00+00'),
    ('3fa09318-72db-4d77-8517-623d07bcd2c4', 'seats', 'Seats',
     1, NULL, false, '2025-11-06 00:00:00+00'),
    ('3fa09318-72db-4d77-8517-623d07bcd2c4', 'conversations', 'Conversations per month',
     NULL, 1000, false, '2025-11-06 00:00:00+00'),
    ('a3c073b5-6121-49e1-8c02-bbfbffaa1a70', 'tokens', 'Tokens per month',
     NULL, 10000000, false, '2025-11-06 00:00:00+00'),
    ('a3c073b5-6121-49e1-8c02-bbfbffaa1a70', 'seats', 'Seats',
     5, NULL, false, '2025-11-06 00:00:00+00'),
    ('a3c073b5-6121-49e1-8c02-bbfbffaa1a70', 'conversations', 'Conversations per month',
     NULL, NULL, false, '2025-11-06 00:00:00+00'),
    ('a3c073b5-6121-49e1-8c02-bbfbffaa1a70', 'api_calls', 'API calls',
     NULL, NULL, true, '2025-11-06 00:00:00+00');
