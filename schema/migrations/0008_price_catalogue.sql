-- Prices from a maintained catalogue (issue 13).
--
-- Usage lines are priced from the installed genai-prices package's snapshot; model_prices becomes the
-- operator's override table, and the only source of custom or negotiated prices. Its token_type is the line's
-- price key (worker/providers.py): the token type, then every non-default price dimension as /name=value,
-- e.g. 'uncached_input_tokens/service_tier=batch/context_window=200k-1M'. Each priced ledger line names its
-- price's source in cost_data.metadata (price_source: 'override:<model_prices.id>' or
-- 'genai-prices <version>:<provider>/<model>'; unit_price; price_per).
--
-- API-usage events without the platform's cost_usd are estimated from the same catalogue: api_usage keeps the
-- estimate and its source apart from cost_usd (which stays what the platform sent), and the rollups say how
-- much of estimated_cost_usd the platform priced and how much the catalogue did.

ALTER TABLE model_prices ALTER COLUMN token_type TYPE varchar(255);
ALTER TABLE model_prices ADD COLUMN note text CHECK (note IS NULL OR length(note) <= 500);
COMMENT ON TABLE model_prices IS
    'operator overrides of the genai-prices catalogue (custom and negotiated prices); per million units';
COMMENT ON COLUMN model_prices.token_type IS 'the price key: token type, then /name=value per non-default dimension';

ALTER TABLE api_usage
    ADD COLUMN catalogue_cost_usd numeric CHECK (catalogue_cost_usd >= 0 AND catalogue_cost_usd < 1e9),
    ADD COLUMN price_source text CHECK (length(price_source) <= 255);
COMMENT ON COLUMN api_usage.catalogue_cost_usd IS
    'the catalogue''s estimate of an event that came without cost_usd (model and token counts)';

ALTER TABLE project_metrics
    ADD COLUMN platform_cost_usd numeric NOT NULL DEFAULT 0,
    ADD COLUMN catalogue_cost_usd numeric NOT NULL DEFAULT 0;
ALTER TABLE user_metrics
    ADD COLUMN platform_cost_usd numeric NOT NULL DEFAULT 0,
    ADD COLUMN catalogue_cost_usd numeric NOT NULL DEFAULT 0;
COMMENT ON COLUMN project_metrics.platform_cost_usd IS 'the part of estimated_cost_usd the platform priced (cost_usd)';
COMMENT ON COLUMN project_metrics.catalogue_cost_usd IS 'the part of estimated_cost_usd the catalogue priced';

-- Every estimate so far was the platform's. The backfill must see every tenant's rows: the owner lifts FORCE
-- for the length of this transaction.
ALTER TABLE project_metrics NO FORCE ROW LEVEL SECURITY;
ALTER TABLE user_metrics NO FORCE ROW LEVEL SECURITY;
UPDATE project_metrics SET platform_cost_usd = estimated_cost_usd WHERE estimated_cost_usd <> 0;
UPDATE user_metrics SET platform_cost_usd = estimated_cost_usd WHERE estimated_cost_usd <> 0;
ALTER TABLE project_metrics FORCE ROW LEVEL SECURITY;
ALTER TABLE user_metrics FORCE ROW LEVEL SECURITY;
