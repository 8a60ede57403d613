-- Issue 18 (budgets at platform scale): the spend aggregate's tables check a row's tenant with one hash probe,
-- not a linear search of the transaction's organizations.
--
-- Why: every tenant policy reads `organization_id = ANY ((SELECT cost_worker_tenant_ids())::uuid[])`. PostgreSQL
-- hashes `= ANY (array)` only for an array known when the statement is planned; this one comes from an InitPlan,
-- so each row read or written compares its organization with the array's elements one by one. A batch spread over
-- 1,000 organizations reads ~2,600 budget periods of the aggregate (a month of daily rows each), and every one of
-- those rows paid ~1,000 comparisons: measured on 100,000 rows with 1,000 organizations in the setting,
-- 187-264 -> 19-20 ms to read them, 137-139 -> 74-76 ms to upsert 10,000 (bench/tenant_policy.py; with 20 or 100
-- organizations, no difference beyond the noise).
-- `organization_id IN (SELECT unnest(...))` is planned as a hashed subplan: built once per statement, one probe
-- per row.
--
-- Only where it costs nothing: on these four tables no index leads with organization_id, so the policy was never
-- an index condition there (it is a filter either way). The other tenant tables keep the array form, which an
-- index leading with organization_id can use (api_usage, cost_data, project_metrics, spend_reach, ...).
-- What a transaction may see and write does not change: the same organizations, none when the setting is unset.

DO $rls$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['spend_hourly', 'spend_daily', 'spend_cover', 'spend_subjects'] LOOP
        EXECUTE format(
            'ALTER POLICY tenant_isolation ON %I '
            'USING (organization_id IN (SELECT unnest(cost_worker_tenant_ids()))) '
            'WITH CHECK (organization_id IN (SELECT unnest(cost_worker_tenant_ids())))', t);
    END LOOP;
END
$rls$;
