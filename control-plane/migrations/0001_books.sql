-- The books of stockplane: the catalog, the stock each location holds, every intended
-- change of stock, every sale the data plane committed, and how far each shard's
-- journal has been drained. See src/db.rs for what is stored and why.

CREATE TABLE locations (
    id          BIGINT PRIMARY KEY CHECK (id BETWEEN 0 AND 4294967295),
    name        TEXT NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE skus (
    sku              BIGINT PRIMARY KEY CHECK (sku >= 0),
    name             TEXT NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    backorder_limit  BIGINT NOT NULL DEFAULT 0 CHECK (backorder_limit BETWEEN 0 AND 4294967295),
    -- Bumped on every change (its stock rows are then queued for a push again).
    version          BIGINT NOT NULL DEFAULT 1,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at       TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The order in which the data plane must be told of things: every stock row and every
-- adjustment to push takes the next value when it is made, and again whenever it must
-- be told anew (its SKU changed, or the shard forgot it). Each shard's pusher tells its
-- shard everything above the shard's pushed_seq in this order (adjustments already
-- drained excepted), and moves pushed_seq past what the shard acknowledged: one cursor
-- per shard instead of a flag per row, so acknowledging a batch costs one row update,
-- not one per stock row. A shard that restarted empty gets its cursor set back to 0.
CREATE SEQUENCE push_seq;

-- One row per SKU and location that the data plane should know.
CREATE TABLE stock_levels (
    sku              BIGINT NOT NULL REFERENCES skus (sku),
    location         BIGINT NOT NULL REFERENCES locations (id),
    -- The shard that owns the SKU (the engine's shard_for), fixed when the row is made.
    shard            INTEGER NOT NULL CHECK (shard >= 0),
    -- The books: every adjustment the data plane applied, minus every drained sale.
    on_hand          BIGINT NOT NULL DEFAULT 0,
    -- Units sold here, as drained.
    sold             BIGINT NOT NULL DEFAULT 0,
    -- The SKU's backorder limit, copied here (under the SKU row's lock) when the row is
    -- made and whenever the SKU changes, so that the pusher reads rows alone.
    backorder_limit  BIGINT NOT NULL DEFAULT 0,
    -- Where the row stands in the order of pushes: the shard has been told of the row
    -- as it is now once its pushed_seq reaches this.
    push_seq         BIGINT NOT NULL DEFAULT nextval('push_seq'),
    PRIMARY KEY (sku, location)
)
-- The drain rewrites on_hand and sold of many rows per batch; room on each page lets
-- PostgreSQL update them in place (HOT: no index entry per update).
WITH (fillfactor = 50);
CREATE INDEX stock_levels_push ON stock_levels (shard, push_seq);
CREATE INDEX stock_levels_by_shard ON stock_levels (shard);

-- Every intended change of on_hand. The id is the data plane's adjustment id (a u128).
CREATE TABLE adjustments (
    id               UUID PRIMARY KEY,
    -- The back office's idempotency key; NULL for changes the control plane made itself.
    idempotency_key  TEXT,
    sku              BIGINT NOT NULL,
    location         BIGINT NOT NULL,
    shard            INTEGER NOT NULL,
    delta            BIGINT NOT NULL CHECK (delta <> 0),
    -- adjust: a delta from the back office; set: "on hand is N", turned into a delta;
    -- bootstrap: the books' on_hand given to a shard that restarted empty (the books
    -- already hold it, so draining it changes nothing); foreign: seen in a journal
    -- without being asked for here.
    kind             TEXT NOT NULL CHECK (kind IN ('adjust', 'set', 'bootstrap', 'foreign')),
    set_to           BIGINT,
    reason           TEXT NOT NULL DEFAULT '',
    -- pending: not yet seen in the shard's journal; applied: the drain found it there;
    -- rejected: the shard refused it (status says why) and it never changes the books.
    state            TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'applied', 'rejected')),
    status           TEXT,
    -- The shard's epoch when it was recorded or last queued again.
    epoch            BIGINT NOT NULL,
    -- Where it stands in the order of pushes (see push_seq); NULL: never pushed from
    -- here (foreign: seen in a journal without being asked for here).
    push_seq         BIGINT DEFAULT nextval('push_seq'),
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    applied_at       TIMESTAMPTZ,
    -- Where the drain found it in the shard's journal; NULL until drained.
    journal_epoch    BIGINT,
    journal_position BIGINT
);
CREATE INDEX adjustments_push ON adjustments (shard, push_seq) WHERE push_seq IS NOT NULL;
-- Only the back office's adjustments have keys: the index leaves out the rest (a
-- bootstrap makes one adjustment per stock row, a million at a time).
CREATE UNIQUE INDEX adjustments_by_key ON adjustments (idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX adjustments_by_row ON adjustments (sku, location);

-- The sales ledger: one row per committed line, exactly once.
CREATE TABLE sales (
    shard            INTEGER NOT NULL,
    epoch            BIGINT NOT NULL,
    -- The entry's position in the shard's journal (one per committed line).
    position         BIGINT NOT NULL,
    hold_id          UUID NOT NULL,
    sku              BIGINT NOT NULL,
    location         BIGINT NOT NULL,
    qty              BIGINT NOT NULL CHECK (qty > 0),
    -- When the shard committed the sale (its clock), and when the drain wrote it here.
    committed_at     TIMESTAMPTZ NOT NULL,
    drained_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (shard, epoch, position)
);
-- No index but the key: every index costs the drain, which writes hundreds of thousands
-- of rows a second (an index on hold_id, random UUIDs, took 43% of the insert's time on
-- a 2-million-row ledger). The per-SKU totals are in stock_levels.sold; listing the
-- sales of one SKU or one hold scans the ledger, within the statement timeout. A shop
-- that looks carts up often can add `CREATE INDEX ON sales (hold_id)` and pay for it in
-- drain throughput.

-- How far each shard's journal is in the books. A shard that restarted without its
-- state starts a new epoch, whose positions start again at 1.
CREATE TABLE shard_positions (
    shard       INTEGER PRIMARY KEY CHECK (shard >= 0),
    epoch       BIGINT NOT NULL DEFAULT 1,
    -- The next journal position to drain: every entry below it is in the books.
    drained     BIGINT NOT NULL DEFAULT 1 CHECK (drained >= 1),
    -- The shard's incarnation this epoch drains (NULL until first seen): a shard that
    -- answers journal reads with another one started without its data.
    incarnation BIGINT,
    -- The pusher's cursor: the shard has acknowledged every stock row and adjustment of
    -- its own whose push_seq is at most this (rejected ones excepted).
    pushed_seq  BIGINT NOT NULL DEFAULT 0,
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The data plane's shape, learnt from it; one row.
CREATE TABLE dataplane (
    id          BOOLEAN PRIMARY KEY DEFAULT true CHECK (id),
    shards      INTEGER NOT NULL CHECK (shards > 0),
    seen_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);
