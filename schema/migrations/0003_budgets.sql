-- Budgets along the hierarchy user -> project -> organization, and the alerts they raise.

CREATE TYPE budget_period AS ENUM ('daily', 'weekly', 'monthly', 'quarterly', 'yearly');

-- True when PostgreSQL knows the IANA time zone name.
CREATE FUNCTION cost_worker_is_timezone(name text) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
AS $$
BEGIN
    PERFORM now() AT TIME ZONE name;
    RETURN true;
EXCEPTION WHEN invalid_parameter_value THEN
    RETURN false;
END
$$;

CREATE TABLE ai_organization_budgets (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    organization_id uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    name            varchar(255)  NOT NULL DEFAULT '',
    amount          numeric       NOT NULL CHECK (amount > 0 AND amount < 1e12),
    currency        char(3)       NOT NULL DEFAULT 'USD' CHECK (currency ~ '^[A-Z]{3}$'),
    period          budget_period NOT NULL DEFAULT 'monthly',
    timezone        varchar(64)   NOT NULL DEFAULT 'UTC' CHECK (cost_worker_is_timezone(timezone)),
    thresholds      numeric[]     NOT NULL DEFAULT '{50,80,100}'
                    CHECK (cardinality(thresholds) BETWEEN 1 AND 20 AND 0 < ALL (thresholds)
                           AND 1000 >= ALL (thresholds)),
    is_active       boolean       NOT NULL DEFAULT true,
    created_at      timestamptz   NOT NULL DEFAULT now(),
    updated_at      timestamptz   NOT NULL DEFAULT now()
);
CREATE INDEX ai_organization_budgets_organization_idx ON ai_organization_budgets (organization_id) WHERE is_active;

CREATE TABLE ai_project_budgets (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    organization_id uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    project_id      uuid NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    name            varchar(255)  NOT NULL DEFAULT '',
    amount          numeric       NOT NULL CHECK (amount > 0 AND amount < 1e12),
    currency        char(3)       NOT NULL DEFAULT 'USD' CHECK (currency ~ '^[A-Z]{3}$'),
    period          budget_period NOT NULL DEFAULT 'monthly',
    timezone        varchar(64)   NOT NULL DEFAULT 'UTC' CHECK (cost_worker_is_timezone(timezone)),
    thresholds      numeric[]     NOT NULL DEFAULT '{50,80,100}'
                    CHECK (cardinality(thresholds) BETWEEN 1 AND 20 AND 0 < ALL (thresholds)
                           AND 1000 >= ALL (thresholds)),
    is_active       boolean       NOT NULL DEFAULT true,
    created_at      timestamptz   NOT NULL DEFAULT now(),
    updated_at      timestamptz   NOT NULL DEFAULT now()
);
CREATE INDEX ai_project_budgets_project_idx ON ai_project_budgets (project_id) WHERE is_active;
CREATE INDEX ai_project_budgets_organization_idx ON ai_project_budgets (organization_id);

-- A user's budget, optionally inside one project.
CREATE TABLE ai_budgets (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    organization_id uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    user_id         uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    project_id      uuid REFERENCES projects (id) ON DELETE CASCADE,
    name            varchar(255)  NOT NULL DEFAULT '',
    amount          numeric       NOT NULL CHECK (amount > 0 AND amount < 1e12),
    currency        char(3)       NOT NULL DEFAULT 'USD' CHECK (currency ~ '^[A-Z]{3}$'),
    period          budget_period NOT NULL DEFAULT 'monthly',
    timezone        varchar(64)   NOT NULL DEFAULT 'UTC' CHECK (cost_worker_is_timezone(timezone)),
    thresholds      numeric[]     NOT NULL DEFAULT '{50,80,100}'
                    CHECK (cardinality(thresholds) BETWEEN 1 AND 20 AND 0 < ALL (thresholds)
                           AND 1000 >= ALL (thresholds)),
    is_active       boolean       NOT NULL DEFAULT true,
    created_at      timestamptz   NOT NULL DEFAULT now(),
    updated_at      timestamptz   NOT NULL DEFAULT now()
);
CREATE INDEX ai_budgets_user_idx ON ai_budgets (user_id) WHERE is_active;
CREATE INDEX ai_budgets_project_idx ON ai_budgets (project_id);
CREATE INDEX ai_budgets_organization_idx ON ai_budgets (organization_id);

-- One row per (budget, period start, threshold): the unique key is what makes an alert exactly-once.
CREATE TABLE budget_alerts (
    id              uuid PRIMARY KEY,  -- stable: derived from the key, so consumers can dedupe on it
    scope           varchar(16) NOT NULL CHECK (scope IN ('organization', 'project', 'user')),
    budget_id       uuid        NOT NULL,
    organization_id uuid        NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    project_id      uuid,
    user_id         uuid,
    period_start    timestamptz NOT NULL,
    period_end      timestamptz NOT NULL,
    threshold       numeric     NOT NULL,
    spend           numeric     NOT NULL,
    amount          numeric     NOT NULL,
    currency        char(3)     NOT NULL,
    percent_used    numeric     NOT NULL,
    raised_at       timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT budget_alerts_key UNIQUE (scope, budget_id, period_start, threshold)
);
CREATE INDEX budget_alerts_organization_idx ON budget_alerts (organization_id, raised_at);

DO $rls$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['ai_organization_budgets', 'ai_project_budgets', 'ai_budgets', 'budget_alerts'] LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('ALTER TABLE %I FORCE ROW LEVEL SECURITY', t);
        EXECUTE format(
            'CREATE POLICY tenant_isolation ON %I '
            'USING (organization_id = ANY ((SELECT cost_worker_tenant_ids())::uuid[])) '
            'WITH CHECK (organization_id = ANY ((SELECT cost_worker_tenant_ids())::uuid[]))', t);
    END LOOP;
END
$rls$;

-- The periodic sweep discovers active budgets across tenants; it evaluates them inside each tenant's scope.
CREATE POLICY worker_sweep ON ai_organization_budgets FOR SELECT TO cost_worker_writer USING (true);
CREATE POLICY worker_sweep ON ai_project_budgets FOR SELECT TO cost_worker_writer USING (true);
CREATE POLICY worker_sweep ON ai_budgets FOR SELECT TO cost_worker_writer USING (true);

GRANT SELECT ON ai_organization_budgets, ai_project_budgets, ai_budgets TO cost_worker_writer, cost_worker_reader;
GRANT SELECT, INSERT ON budget_alerts TO cost_worker_writer;
GRANT SELECT ON budget_alerts TO cost_worker_reader;
