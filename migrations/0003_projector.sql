-- tally-projector's own state beside the projections, so that the fold is idempotent and the
-- order in which tally.events and tally.ledger are read does not change the result. Written in
-- the same transaction as the projection rows and the projector's consumed offsets.
-- Runs in one transaction (the migration runner's).

-- Every event id folded in, per tenant (the nil UUID for tenant-less catalog events): an event
-- delivered twice (upstream retries) is applied once.
CREATE TABLE projector_seen_events (
    tenant_id uuid NOT NULL,
    event_id  uuid NOT NULL,
    CONSTRAINT projector_seen_events_pkey PRIMARY KEY (tenant_id, event_id)
);

-- The last ledger seq folded in per tenant: tally.ledger is at-least-once, entries at or below it
-- are skipped.
CREATE TABLE projector_ledger_applied (
    tenant_id uuid   PRIMARY KEY,
    seq       bigint NOT NULL CHECK (seq >= 0)
);

-- One row per model call counted in api_usage (the reservation id, or the message id of a
-- message with usage and no reservation): a call reported twice is counted once.
CREATE TABLE projector_api_calls (
    tenant_id uuid NOT NULL,
    call_id   uuid NOT NULL,
    CONSTRAINT projector_api_calls_pkey PRIMARY KEY (tenant_id, call_id)
);

-- The latest InvoiceStatusChanged per invoice, kept even before the ledger's invoice entry is
-- projected; applied to subscription_invoices whenever either side arrives.
CREATE TABLE projector_invoice_status (
    invoice_id          uuid        PRIMARY KEY,
    tenant_id           uuid        NOT NULL,
    status              text        NOT NULL
        CHECK (status IN ('draft', 'issued', 'paid', 'void', 'uncollectible')),
    external_invoice_id text,
    hosted_invoice_url  text,
    changed_at          timestamptz NOT NULL
);

-- The billing period of each metered usage report, from the ledger's usage_recorded entry (its
-- cause is the UsageReported event), kept even before the usage row is projected.
CREATE TABLE projector_usage_periods (
    event_id     uuid        PRIMARY KEY,
    period_start timestamptz NOT NULL,
    period_end   timestamptz NOT NULL
);
