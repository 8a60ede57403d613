-- Money rules (alerts): a budget's last committed change is always its newest version of terms, and a budget
-- inserted holds only the terms it is inserted with.
--
-- Why: 0033 dated every change of a budget's terms by its transaction's start (now()) and kept the versions a budget
-- table's TRUNCATE leaves behind (no row trigger runs), so budget_terms could disagree with the budget itself:
-- - a transaction that started before another one changed the budget, and changed it after that one committed (an
--   operator's psql session open while the platform edits the budget), wrote the older date: the budget was 100 USD,
--   its newest version 1000, and every period ending after both changes was judged at 1000 once it had ended (90 USD
--   of November alerted nothing where 90 % of 100 is the 80 % alert;
--   tests/test_budgets.py::test_the_last_change_committed_is_the_budgets_newest_terms);
-- - a budget table emptied with TRUNCATE and loaded again with the same ids (a restore) kept the versions of the
--   budget before, and its ended periods were judged by them (the 1000 of a change in November where the budget is
--   100: tests/test_budgets.py::test_a_budget_re_created_with_the_same_id_after_a_truncate_holds_only_its_own_terms).
--
-- Now a change holds from its transaction's start, or from the newest version's start where that is later (the
-- other transaction's version is replaced: it held only until this change committed, which no date records), and an
-- insert replaces whatever versions its budget id still has by its own terms since ever. A row lock orders two
-- changes of one budget; in READ COMMITTED the trigger's query sees the version the first one committed (in
-- REPEATABLE READ the second change fails as a serialization failure, as before).
--
-- Existing budgets whose newest version is not the budget as it is get a version holding their terms from now (and
-- one without any version, since ever), below (tests/test_budgets.py::test_upgrading_gives_a_budget_whose_newest_
-- version_is_not_it_a_version_now).
--
-- Expand (compat.toml): the trigger function is replaced, same signature and triggers, and versions are added; the
-- previous release writes no budget (the platform does) and reads budget_terms as before.

CREATE OR REPLACE FUNCTION cost_worker_budget_terms_changed() RETURNS trigger
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
        -- Versions a TRUNCATE left behind are another budget's: the one inserted holds its own terms since ever.
        DELETE FROM budget_terms t USING new_rows n WHERE t.scope = kind AND t.budget_id = n.id;
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
        -- Since this transaction's start, or since the newest version's where a transaction that started later
        -- committed one (replaced: this change is the budget as it is).
        INSERT INTO budget_terms AS t (scope, budget_id, valid_from, organization_id, amount, currency, period,
                                       timezone, thresholds)
        SELECT kind, n.id,
               greatest(now(), (SELECT max(v.valid_from) FROM budget_terms v
                                WHERE v.scope = kind AND v.budget_id = n.id)),
               n.organization_id, n.amount, n.currency, n.period, n.timezone, n.thresholds
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

-- Budgets whose newest version is not the budget as it is (left by either case above before this migration, or by
-- budget rows written with triggers off) get a version holding their terms from now: periods ending from now on are
-- judged by the budget as it is. Periods that ended before keep the versions recorded then (which of those were
-- stale cannot be told). A budget without any version holds its terms since ever, as 0033 seeded. The owner lifts
-- FORCE on these tables for the length of this transaction to see every tenant (as 0044 did on organizations).
ALTER TABLE budget_terms NO FORCE ROW LEVEL SECURITY;
ALTER TABLE ai_organization_budgets NO FORCE ROW LEVEL SECURITY;
ALTER TABLE ai_project_budgets NO FORCE ROW LEVEL SECURITY;
ALTER TABLE ai_budgets NO FORCE ROW LEVEL SECURITY;
INSERT INTO budget_terms AS t (scope, budget_id, valid_from, organization_id, amount, currency, period, timezone,
                               thresholds)
SELECT b.scope, b.id,
       CASE WHEN v.valid_from IS NULL THEN '-infinity'::timestamptz ELSE greatest(now(), v.valid_from) END,
       b.organization_id, b.amount, b.currency, b.period, b.timezone, b.thresholds
FROM (SELECT 'organization' AS scope, id, organization_id, amount, currency, period, timezone, thresholds
      FROM ai_organization_budgets
      UNION ALL
      SELECT 'project', id, organization_id, amount, currency, period, timezone, thresholds FROM ai_project_budgets
      UNION ALL
      SELECT 'user', id, organization_id, amount, currency, period, timezone, thresholds FROM ai_budgets) b
LEFT JOIN LATERAL (
    SELECT x.valid_from, x.amount, x.currency, x.period, x.timezone, x.thresholds FROM budget_terms x
    WHERE x.scope = b.scope AND x.budget_id = b.id
    ORDER BY x.valid_from DESC
    LIMIT 1
) v ON true
WHERE v.valid_from IS NULL
   OR (v.amount, v.currency, v.period, v.timezone, v.thresholds)
      IS DISTINCT FROM (b.amount, b.currency, b.period, b.timezone, b.thresholds)
ON CONFLICT ON CONSTRAINT budget_terms_key DO UPDATE
SET organization_id = excluded.organization_id, amount = excluded.amount, currency = excluded.currency,
    period = excluded.period, timezone = excluded.timezone, thresholds = excluded.thresholds;
ALTER TABLE budget_terms FORCE ROW LEVEL SECURITY;
ALTER TABLE ai_organization_budgets FORCE ROW LEVEL SECURITY;
ALTER TABLE ai_project_budgets FORCE ROW LEVEL SECURITY;
ALTER TABLE ai_budgets FORCE ROW LEVEL SECURITY;
