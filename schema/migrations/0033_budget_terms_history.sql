-- Money rules (alerts): a period that has ended is judged by the budget as it was when the period ended (amount,
-- currency, thresholds), not as it is today.
--
-- Why: the budget tables hold only today's terms, so late provider data for an ended period was judged at today's
-- amount. A monthly budget of 1000 USD with 400 USD spent last month, lowered to 100 this month: last month's late
-- 100 USD raised 50, 80 and 100 % alerts for last month against 100 (500 % of it), where 500 is 50 % of the 1000 in
-- force then; raised from 100 to 1000, last month's 85 USD (85 % of 100) alerted nothing (8.5 % of 1000)
-- (tests/test_alert_lifecycle_worker.py::test_late_data_of_an_ended_month_*).
--
-- budget_terms keeps every version of each budget's terms (amount, currency, thresholds, period kind, time zone)
-- since when it holds. Triggers on the three budget tables write it in the transaction that changes them, whoever
-- writes (the platform, an operator's psql): a budget created holds since -infinity (its first terms also judge the
-- periods before it existed, as before), an update of any of those five columns since now() (several in one
-- transaction: the last one), a budget deleted takes its versions with it. The budgets that exist now are seeded
-- as holding since -infinity. Nothing else about a budget is kept (name, is_active: an inactive or deleted budget
-- is not evaluated, as before).
--
-- cost_worker_budget_terms_at() gives the version in force when a period ended (the newest that holds from before
-- its end): one index probe (the primary key), only for periods that have ended (an open period is judged by
-- today's terms, as before). The worker computes a budget's periods with today's kind and zone; where the version
-- at an ended period's end has another kind or zone, that period was no period of the budget then: it evaluates
-- instead the periods the touched data had under that kind and zone, judged by the versions at their ends when
-- those have that kind and zone (a daily budget made monthly today: late data of 10 November is judged as that
-- day, at the daily amount). Where they do not either (changed back and forth), today's terms judge the period
-- computed today, as before.
--
-- The trigger function runs as the owner (SECURITY DEFINER: the platform's role needs no right on budget_terms)
-- and widens the transaction's tenants to the rows' organizations for its own work (0028's pair: a cascade from a
-- deleted project or organization names no tenant), so budget_terms keeps FORCE row-level security.
--
-- Expand (compat.toml): a new table, two functions and nine triggers; nothing the previous release reads or
-- writes changes (it keeps judging every period by today's terms).

CREATE TABLE budget_terms (
    scope           text          NOT NULL CHECK (scope IN ('organization', 'project', 'user')),
    budget_id       uuid          NOT NULL,
    valid_from      timestamptz   NOT NULL,
    organization_id uuid          NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    amount          numeric       NOT NULL,
    currency        char(3)       NOT NULL,
    period          budget_period NOT NULL,
    timezone        varchar(64)   NOT NULL,
    thresholds      numeric[]     NOT NULL,
    CONSTRAINT budget_terms_key PRIMARY KEY (scope, budget_id, valid_from)
);
COMMENT ON TABLE budget_terms IS 'every version of each budget''s terms, since when it holds (migration 0033)';

INSERT INTO budget_terms (scope, budget_id, valid_from, organization_id, amount, currency, period, timezone,
                          thresholds)
SELECT 'organization', id, '-infinity'::timestamptz, organization_id, amount, currency, period, timezone, thresholds
FROM ai_organization_budgets
UNION ALL
SELECT 'project', id, '-infinity', organization_id, amount, currency, period, timezone, thresholds
FROM ai_project_budgets
UNION ALL
SELECT 'user', id, '-infinity', organization_id, amount, currency, period, timezone, thresholds
FROM ai_budgets;

ALTER TABLE budget_terms ENABLE ROW LEVEL SECURITY;
ALTER TABLE budget_terms FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON budget_terms
    USING (organization_id = ANY ((SELECT cost_worker_tenant_ids())::uuid[]))
    WITH CHECK (organization_id = ANY ((SELECT cost_worker_tenant_ids())::uuid[]));
GRANT SELECT ON budget_terms TO cost_worker_writer, cost_worker_reader;

-- The three tables' statement-level triggers (one function: the scope is the table's).
CREATE FUNCTION cost_worker_budget_terms_changed() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
DECLARE
    kind text := CASE TG_TABLE_NAME WHEN 'ai_organization_budgets' THEN 'organization'
                                    WHEN 'ai_project_budgets' THEN 'project' ELSE 'user' END;
    orgs uuid[];
    saved text;
BEGIN
    IF TG_OP = 'INSERT' THEN
        SELECT array_agg(DISTINCT organization_id) INTO orgs FROM new_rows;
        saved := cost_worker_spend_tenants_widen(orgs);
        INSERT INTO budget_terms (scope, budget_id, valid_from, organization_id, amount, currency, period, timezone,
                                  thresholds)
        SELECT kind, n.id, '-infinity'::timestamptz, n.organization_id, n.amount, n.currency, n.period, n.timezone,
               n.thresholds
        FROM new_rows n
        ON CONFLICT ON CONSTRAINT budget_terms_key DO NOTHING;
    ELSIF TG_OP = 'UPDATE' THEN
        SELECT array_agg(DISTINCT x) INTO orgs
        FROM (SELECT organization_id FROM new_rows UNION ALL SELECT organization_id FROM old_rows) AS o(x);
        saved := cost_worker_spend_tenants_widen(orgs);
        INSERT INTO budget_terms AS t (scope, budget_id, valid_from, organization_id, amount, currency, period,
                                       timezone, thresholds)
        SELECT kind, n.id, now(), n.organization_id, n.amount, n.currency, n.period, n.timezone, n.thresholds
        FROM new_rows n
        JOIN old_rows o ON o.id = n.id
        WHERE (n.amount, n.currency, n.period, n.timezone, n.thresholds)
              IS DISTINCT FROM (o.amount, o.currency, o.period, o.timezone, o.thresholds)
        ON CONFLICT ON CONSTRAINT budget_terms_key DO UPDATE
        SET organization_id = excluded.organization_id, amount = excluded.amount, currency = excluded.currency,
            period = excluded.period, timezone = excluded.timezone, thresholds = excluded.thresholds;
        -- A budget moved to another organization: its versions follow it (row-level security reads them there).
        UPDATE budget_terms t SET organization_id = n.organization_id
        FROM new_rows n JOIN old_rows o ON o.id = n.id
        WHERE o.organization_id <> n.organization_id AND t.scope = kind AND t.budget_id = n.id
          AND t.organization_id <> n.organization_id;
    ELSE
        SELECT array_agg(DISTINCT organization_id) INTO orgs FROM old_rows;
        saved := cost_worker_spend_tenants_widen(orgs);
        DELETE FROM budget_terms t USING old_rows o WHERE t.scope = kind AND t.budget_id = o.id;
    END IF;
    PERFORM cost_worker_spend_tenants_restore(saved);
    RETURN NULL;
END
$$;

CREATE TRIGGER budget_terms_inserted AFTER INSERT ON ai_organization_budgets
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION cost_worker_budget_terms_changed();
CREATE TRIGGER budget_terms_updated AFTER UPDATE ON ai_organization_budgets
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION cost_worker_budget_terms_changed();
CREATE TRIGGER budget_terms_deleted AFTER DELETE ON ai_organization_budgets
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION cost_worker_budget_terms_changed();
CREATE TRIGGER budget_terms_inserted AFTER INSERT ON ai_project_budgets
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION cost_worker_budget_terms_changed();
CREATE TRIGGER budget_terms_updated AFTER UPDATE ON ai_project_budgets
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION cost_worker_budget_terms_changed();
CREATE TRIGGER budget_terms_deleted AFTER DELETE ON ai_project_budgets
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION cost_worker_budget_terms_changed();
CREATE TRIGGER budget_terms_inserted AFTER INSERT ON ai_budgets
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION cost_worker_budget_terms_changed();
CREATE TRIGGER budget_terms_updated AFTER UPDATE ON ai_budgets
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION cost_worker_budget_terms_changed();
CREATE TRIGGER budget_terms_deleted AFTER DELETE ON ai_budgets
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION cost_worker_budget_terms_changed();

-- The version of a budget's terms in force when a period ending at period_end ended (the newest that holds from
-- before its end), if it has ended: one primary-key probe. No row for an open period, or a budget without versions.
CREATE FUNCTION cost_worker_budget_terms_at(
    scope text, budget uuid, period_end timestamptz,
    OUT amount numeric, OUT currency text, OUT thresholds numeric[], OUT period text, OUT timezone text
) RETURNS SETOF record
LANGUAGE sql STABLE
AS $$
    SELECT t.amount, t.currency::text, t.thresholds, t.period::text, t.timezone::text
    FROM budget_terms t
    WHERE $3 <= now() AND t.scope = $1 AND t.budget_id = $2 AND t.valid_from < $3
    ORDER BY t.valid_from DESC
    LIMIT 1
$$;

GRANT EXECUTE ON FUNCTION cost_worker_budget_terms_at(text, uuid, timestamptz)
    TO cost_worker_writer, cost_worker_reader;
