-- Money rules (a user moved to another organization): a user's scope is its rollups that name the organization, in
-- the full computation and in the aggregate alike, as a project's is since 0037; a user scope is registered in the
-- aggregate per organization.
--
-- Why: every ledger line and rollup row names its organization, and counts there (README "What counts as spend",
-- rule 4). A user moved to another organization (users.organization_id) keeps the rollups it had in the one it left
-- (user_metrics rows naming it). The full computation (cost_worker_spend_rows) read a user's rollups whatever
-- organization they name: a user budget of A, 5 USD of A's rollups, read 8 once the user had 3 USD of rollups in B
-- (tests/test_spend_moves.py::test_a_user_moved_to_another_organization_keeps_its_rollups_where_they_name), and
-- under row-level security that figure depended on which organizations a transaction named. The aggregate kept one
-- registration per user scope (spend_subjects' key had no organization) and read it without the organization: the
-- same budget read 5 there (B's rollup reached no registered subject of B: 0019's trigger returned early), a budget
-- of B of the same user read 5 from A's registration (its full computation: 8); had B another registered user, B's
-- rollups would have been added under the user's scope, and A's budget would have read 8.
--
-- Changes (same signatures): cost_worker_spend_rows reads a user scope's rollups of the organization only;
-- spend_subjects' key ends with the organization, and cost_worker_spend_track registers and builds a user scope per
-- organization (from that organization's rollups, deleting only that organization's aggregate of it);
-- cost_worker_spend_users_changed and cost_worker_spend_rebuild add a rollup to the user scopes registered in the
-- organization it names; cost_worker_spend_many reads every scope's aggregate rows of the budget's organization and
-- counts a user scope kept only where it is registered in that organization. 0019's early return (no subject
-- registered in the statement's organizations: nothing to add) is now exactly the rule, and stays.
--
-- Existing aggregates: a registered scope's rows of its own organization are already its rollups there (0016 built
-- them per rollup organization, the trigger added deltas under the rollup's organization); rows kept under another
-- organization (a user's rollups elsewhere, added when that organization had another registered user) are no longer
-- read by the new functions, and the rebuild of that organization drops them. Those organizations are queued in
-- spend_rebuilds (0044), not rebuilt here.
CREATE OR REPLACE FUNCTION cost_worker_spend_rows(
    scope text, org uuid, project uuid, usr uuid, period_start timestamptz, period_end timestamptz
)
RETURNS TABLE (currency char(3), rate_at timestamptz, amount numeric, kind text)
LANGUAGE plpgsql STABLE
AS $$
#variable_conflict use_column
DECLARE
    window_max CONSTANT interval := interval '31 days';  -- the longest provider window (decode.py checks it)
    reach CONSTANT interval := interval '62 days';  -- back: counted rows (31 days), the costs they overlap (31)
    ahead CONSTANT interval := interval '31 days';  -- forward: cost rows overlapping a row that counts here
BEGIN
    IF scope = 'user' THEN
        RETURN QUERY
        SELECT 'USD'::char(3), m.hour, m.estimated_cost_usd, 'estimate'::text
        FROM user_metrics m
        WHERE m.user_id = usr AND m.hour >= period_start AND m.hour < period_end
          AND m.organization_id = org  -- 0045: a user's rollups that name the organization
          AND (project IS NULL OR m.project_id = project);
        RETURN;
    END IF;
    IF scope NOT IN ('project', 'organization') THEN
        RAISE EXCEPTION 'unknown budget scope %', scope;
    END IF;

    RETURN QUERY
    WITH near AS MATERIALIZED (  -- current rows of the scope that can matter for the period
        SELECT c.project_id, c.provider, c.ai_organization_id, c.api_version,
               c.bucket_start_time, c.bucket_end_time, c.currency, c.amount, c.quantity, c.outside_cost_report,
               cost_worker_hour_ceil(c.bucket_start_time) AS h_from,
               date_trunc('hour', c.bucket_start_time, 'UTC') AS r_from,  -- 0023: the hour the window starts in
               least(c.bucket_end_time, c.collected_at) AS h_until
        FROM (
            SELECT * FROM cost_data
            WHERE scope = 'project' AND project_id = project AND superseded_at IS NULL
              AND organization_id = org  -- 0037: a project's rows that name the organization
              AND bucket_start_time >= period_start - reach AND bucket_start_time < period_end + ahead
            UNION ALL
            SELECT * FROM cost_data
            WHERE scope = 'organization' AND organization_id = org AND superseded_at IS NULL
              AND bucket_start_time >= period_start - reach AND bucket_start_time < period_end + ahead
        ) c
        WHERE CASE WHEN c.api_version = 'usage_v1' AND c.amount IS NOT NULL
                   -- usage matters when it counts in the period or covers one of its hours (0025: a row
                   -- starting after a period's end not on the hour, 18:40 after Kolkata's 18:30, covers the
                   -- estimate of 18:00, which is the period's)
                   THEN c.bucket_start_time >= period_start - window_max
                        AND c.bucket_start_time < cost_worker_hour_ceil(period_end)
                        AND c.bucket_end_time > period_start
                   -- costs, and unpriced usage (0031), also when they overlap such usage
                   ELSE c.bucket_end_time > period_start - window_max END
    ),
    cost_hours AS MATERIALIZED (  -- (account, project or NULL, hour) a cost row covers
        SELECT DISTINCT w.provider, w.ai_organization_id, w.project_id, h.hour
        FROM (SELECT DISTINCT provider, ai_organization_id, project_id, h_from, h_until
              FROM near WHERE api_version = 'costs_v1') w
        CROSS JOIN LATERAL generate_series(w.h_from, w.h_until - interval '1 microsecond', interval '1 hour') h(hour)
    ),
    usage_windows AS (  -- (0031: also Priority Tier usage, which `counted` never replaces by cost)
        SELECT DISTINCT provider, ai_organization_id, project_id, h_from, h_until, r_from
        FROM near WHERE api_version = 'usage_v1' AND amount IS NOT NULL
    ),
    usage_hours AS MATERIALIZED (  -- expanded first, so that the join below hashes on (account, hour)
        SELECT u.provider, u.ai_organization_id, u.project_id, u.h_from, u.h_until, u.r_from, h.hour
        FROM usage_windows u
        CROSS JOIN LATERAL generate_series(u.r_from, u.h_until - interval '1 microsecond', interval '1 hour') h(hour)
    ),
    replaced AS (  -- usage windows a cost row of their account covers for at least one hour: same project, or
                   -- either without one (three joins on equalities alone, so that each one hashes on every key)
        SELECT u.provider, u.ai_organization_id, u.project_id, u.h_from, u.h_until, u.r_from
        FROM usage_hours u
        JOIN cost_hours k ON k.provider = u.provider AND k.ai_organization_id = u.ai_organization_id
                         AND k.hour = u.hour AND k.project_id = u.project_id
        UNION
        SELECT u.provider, u.ai_organization_id, u.project_id, u.h_from, u.h_until, u.r_from
        FROM usage_hours u
        JOIN (SELECT * FROM cost_hours WHERE project_id IS NULL) k
          ON k.provider = u.provider AND k.ai_organization_id = u.ai_organization_id AND k.hour = u.hour
        UNION
        SELECT u.provider, u.ai_organization_id, u.project_id, u.h_from, u.h_until, u.r_from
        FROM (SELECT * FROM usage_hours WHERE project_id IS NULL) u
        JOIN cost_hours k ON k.provider = u.provider AND k.ai_organization_id = u.ai_organization_id
                         AND k.hour = u.hour
    ),
    unpriced_hours AS MATERIALIZED (  -- 0031: (account, project or NULL, hour) an unpriced usage line of nonzero
                                      -- quantity overlaps, up to its collection (the overlap rule of 0025)
        SELECT DISTINCT w.provider, w.ai_organization_id, w.project_id, h.hour
        FROM (SELECT DISTINCT provider, ai_organization_id, project_id, r_from, h_until FROM near
              WHERE api_version = 'usage_v1' AND amount IS NULL AND (quantity IS NULL OR quantity <> 0)) w
        CROSS JOIN LATERAL generate_series(w.r_from, w.h_until - interval '1 microsecond', interval '1 hour') h(hour)
    ),
    unpriced_beside AS (  -- usage hours an unpriced line of their account overlaps: same project, or either
                          -- without one (as `replaced`)
        SELECT u.provider, u.ai_organization_id, u.project_id, u.h_from, u.h_until, u.r_from, u.hour
        FROM usage_hours u
        JOIN unpriced_hours k ON k.provider = u.provider AND k.ai_organization_id = u.ai_organization_id
                             AND k.hour = u.hour AND k.project_id = u.project_id
        UNION
        SELECT u.provider, u.ai_organization_id, u.project_id, u.h_from, u.h_until, u.r_from, u.hour
        FROM usage_hours u
        JOIN (SELECT * FROM unpriced_hours WHERE project_id IS NULL) k
          ON k.provider = u.provider AND k.ai_organization_id = u.ai_organization_id AND k.hour = u.hour
        UNION
        SELECT u.provider, u.ai_organization_id, u.project_id, u.h_from, u.h_until, u.r_from, u.hour
        FROM (SELECT * FROM usage_hours WHERE project_id IS NULL) u
        JOIN unpriced_hours k ON k.provider = u.provider AND k.ai_organization_id = u.ai_organization_id
                             AND k.hour = u.hour
    ),
    spoiled AS (  -- 0031: usage windows with such an hour that no cost row of theirs covers (there the cost row
                  -- beats both, as before): they neither count nor cover, the estimate of the hour counts
        SELECT DISTINCT b.provider, b.ai_organization_id, b.project_id, b.h_from, b.h_until, b.r_from
        FROM unpriced_beside b
        WHERE NOT EXISTS (SELECT FROM cost_hours k
                          WHERE k.provider = b.provider AND k.ai_organization_id = b.ai_organization_id
                            AND k.hour = b.hour AND k.project_id = b.project_id)
          AND NOT EXISTS (SELECT FROM cost_hours k
                          WHERE k.project_id IS NULL AND k.provider = b.provider
                            AND k.ai_organization_id = b.ai_organization_id AND k.hour = b.hour)
          AND NOT (b.project_id IS NULL AND EXISTS (
                    SELECT FROM cost_hours k
                    WHERE k.provider = b.provider AND k.ai_organization_id = b.ai_organization_id
                      AND k.hour = b.hour))
    ),
    counted AS MATERIALIZED (  -- (every join below compares with `=` only, so it can hash: no quadratic scans)
        SELECT n.* FROM near n
        WHERE n.amount IS NOT NULL
          AND (n.api_version = 'costs_v1' OR n.outside_cost_report OR NOT EXISTS (
                SELECT FROM replaced r
                WHERE r.provider = n.provider AND r.ai_organization_id = n.ai_organization_id
                  AND coalesce(r.project_id, '00000000-0000-0000-0000-000000000000')
                      = coalesce(n.project_id, '00000000-0000-0000-0000-000000000000')
                  AND r.h_from = n.h_from AND r.h_until = n.h_until AND r.r_from = n.r_from))
          AND (n.api_version = 'costs_v1' OR NOT EXISTS (
                SELECT FROM spoiled s
                WHERE s.provider = n.provider AND s.ai_organization_id = n.ai_organization_id
                  AND coalesce(s.project_id, '00000000-0000-0000-0000-000000000000')
                      = coalesce(n.project_id, '00000000-0000-0000-0000-000000000000')
                  AND s.h_from = n.h_from AND s.h_until = n.h_until AND s.r_from = n.r_from))
    ),
    covered AS MATERIALIZED (  -- (provider, account, project or NULL, hour) a counted row covers: every hour its
                               -- window overlaps, up to its collection (0025; usage of zero quantity reports
                               -- nothing, so it covers nothing)
        SELECT DISTINCT w.provider, w.ai_organization_id, w.project_id, h.hour
        FROM (SELECT DISTINCT provider, ai_organization_id, project_id, r_from, h_until FROM counted
              WHERE api_version = 'costs_v1' OR quantity IS NULL OR quantity <> 0) w
        CROSS JOIN LATERAL generate_series(w.r_from, w.h_until - interval '1 microsecond', interval '1 hour') h(hour)
        WHERE w.h_until > period_start AND w.r_from < period_end
    ),
    estimates AS (
        SELECT m.project_id, m.hour, m.provider, m.estimated_cost_usd,
               p.ai_provider AS project_provider, p.ai_organization_id AS project_ai_org
        FROM project_metrics m
        LEFT JOIN projects p ON p.id = m.project_id
        WHERE m.organization_id = org AND m.hour >= period_start AND m.hour < period_end
          AND (scope = 'organization' OR m.project_id = project)
    )
    SELECT c.currency, c.bucket_start_time, c.amount,
           CASE WHEN c.api_version = 'costs_v1' THEN 'cost' ELSE 'usage' END
    FROM counted c
    WHERE c.project_id IS NOT DISTINCT FROM CASE WHEN scope = 'project' THEN project ELSE c.project_id END
      AND cost_worker_midpoint(c.bucket_start_time, c.bucket_end_time) >= period_start
      AND cost_worker_midpoint(c.bucket_start_time, c.bucket_end_time) < period_end
    UNION ALL
    SELECT 'USD'::char(3), e.hour, e.estimated_cost_usd, 'estimate'
    FROM estimates e
    WHERE NOT EXISTS (  -- a row of its project covers the hour
        SELECT FROM covered v WHERE v.provider = e.provider AND v.hour = e.hour AND v.project_id = e.project_id)
      AND NOT EXISTS (  -- an ungrouped row of the account its project is mapped to does
        SELECT FROM covered v
        WHERE v.project_id IS NULL AND v.provider = e.provider AND v.hour = e.hour
          AND v.provider = e.project_provider AND v.ai_organization_id = e.project_ai_org);
END
$$;


CREATE OR REPLACE FUNCTION cost_worker_spend_many(
    scopes text[], orgs uuid[], projects uuid[], users uuid[], starts timestamptz[], ends timestamptz[],
    currencies text[]
) RETURNS TABLE (ord bigint, spend numeric, foreign_rows jsonb, missing_rates jsonb)
LANGUAGE sql STABLE
AS $$
    WITH k AS (
        SELECT t.*,
               CASE WHEN t.scope IN ('organization', 'project') THEN t.scope
                    WHEN t.scope = 'user' AND t.project_id IS NULL THEN 'user'
                    WHEN t.scope = 'user' THEN 'user_project' END AS k_scope,
               CASE t.scope WHEN 'organization' THEN t.org WHEN 'project' THEN t.project_id ELSE t.user_id END
                   AS k_subject,
               CASE WHEN t.scope = 'user' AND t.project_id IS NOT NULL THEN t.project_id
                    ELSE '00000000-0000-0000-0000-000000000000'::uuid END AS k_project,
               date_trunc('day', t.period_start - interval '1 microsecond', 'UTC') + interval '24 hours' AS d_from,
               date_trunc('day', t.period_end, 'UTC') AS d_until
        FROM unnest(scopes, orgs, projects, users, starts, ends, currencies)
            WITH ORDINALITY AS t(scope, org, project_id, user_id, period_start, period_end, currency, ord)
    ),
    i AS MATERIALIZED (  -- user scopes are kept for the subjects in spend_subjects only (0016)
        SELECT k.*,
               k.k_scope IN ('organization', 'project')
               OR EXISTS (SELECT FROM spend_subjects s
                          WHERE s.scope = k.k_scope AND s.subject = k.k_subject AND s.subject_project = k.k_project
                            AND s.organization_id = k.org)  -- 0045: registered in the budget's organization
                   AS tracked
        FROM k
    ),
    -- One index range scan per candidate and level (LATERAL behind OFFSET 0), and none for an edge that is empty (a
    -- period starting and ending at UTC midnights has none). 0012 joined the candidates to spend_hourly and
    -- spend_daily, and with many candidates the planner chose to sort all of spend_hourly for a merge join (0.8 s per
    -- edge for 3,000 candidates on 336,000 hourly rows, and growing with the table).
    parts AS (
        SELECT i.ord, i.currency AS to_code, d.currency, d.rate_day, d.amount, d.n_rows, d.max_scale
        FROM i CROSS JOIN LATERAL (
            SELECT v.currency, v.rate_day, v.amount, v.n_rows, v.max_scale FROM spend_daily v
            WHERE v.scope = i.k_scope AND v.subject = i.k_subject AND v.subject_project = i.k_project
              AND v.day >= i.d_from AND v.day < i.d_until AND v.n_rows <> 0
              AND v.organization_id = i.org  -- 0045: every scope's rows of the organization
            OFFSET 0
        ) d
        WHERE i.tracked AND i.d_from < i.d_until
        UNION ALL
        SELECT i.ord, i.currency, h.currency, h.rate_day, h.amount, h.n_rows, h.max_scale
        FROM i CROSS JOIN LATERAL (
            SELECT v.currency, v.rate_day, v.amount, v.n_rows, v.max_scale FROM spend_hourly v
            WHERE v.scope = i.k_scope AND v.subject = i.k_subject AND v.subject_project = i.k_project
              AND v.at >= i.period_start AND v.at < least(i.period_end, i.d_from) AND v.n_rows <> 0
              AND v.organization_id = i.org  -- 0045: every scope's rows of the organization
            OFFSET 0
        ) h
        WHERE i.tracked AND i.period_start < least(i.period_end, i.d_from)
        UNION ALL
        SELECT i.ord, i.currency, h.currency, h.rate_day, h.amount, h.n_rows, h.max_scale
        FROM i CROSS JOIN LATERAL (
            SELECT v.currency, v.rate_day, v.amount, v.n_rows, v.max_scale FROM spend_hourly v
            WHERE v.scope = i.k_scope AND v.subject = i.k_subject AND v.subject_project = i.k_project
              AND v.at >= greatest(i.d_until, i.d_from, i.period_start) AND v.at < i.period_end AND v.n_rows <> 0
              AND v.organization_id = i.org  -- 0045: every scope's rows of the organization
            OFFSET 0
        ) h
        WHERE i.tracked AND greatest(i.d_until, i.d_from, i.period_start) < i.period_end
    ),
    p AS MATERIALIZED (SELECT * FROM parts),
    same AS (  -- rows in the budget's currency: summed as they are
        SELECT p.ord, sum(p.amount) AS amount FROM p WHERE p.currency = p.to_code GROUP BY p.ord
    ),
    g AS MATERIALIZED (  -- rows in another currency, per (currency, rate date): what a rate converts
        SELECT p.ord, p.to_code, p.currency::text AS currency, p.rate_day AS day, sum(p.amount) AS amount,
               sum(p.n_rows) AS n, max(p.max_scale) AS max_scale
        FROM p WHERE p.currency <> p.to_code
        GROUP BY 1, 2, 3, 4
    ),
    factors AS MATERIALIZED (  -- one rate lookup per (row currency, day, budget currency)
        SELECT pairs.*, f.num, f.den
        FROM (SELECT DISTINCT g.currency, g.day, g.to_code FROM g) pairs
        LEFT JOIN LATERAL cost_worker_rate_factor(pairs.currency, pairs.to_code, pairs.day) f ON true
    ),
    gf AS MATERIALIZED (
        SELECT g.*, f.num, f.den
        FROM g LEFT JOIN factors f ON f.currency = g.currency AND f.day = g.day AND f.to_code = g.to_code
    ),
    conv AS (
        SELECT gf.ord, bool_or(gf.num IS NULL) AS missing,
               bool_or(gf.num IS NOT NULL AND (gf.den <> 1 OR gf.max_scale + scale(gf.num) > 20)) AS by_row,
               sum(cost_worker_convert(gf.amount, gf.num, gf.den)) AS total
        FROM gf GROUP BY gf.ord
    ),
    foreign_counts AS (
        SELECT c.ord, jsonb_object_agg(c.currency, c.n) AS rows
        FROM (SELECT gf.ord, gf.currency, sum(gf.n) AS n FROM gf GROUP BY 1, 2) c
        GROUP BY c.ord
    ),
    missing AS (
        SELECT m.ord, jsonb_object_agg(m.currency, jsonb_build_object('rows', m.n, 'first', m.first, 'last', m.last))
                   AS rates
        FROM (SELECT gf.ord, gf.currency, sum(gf.n) AS n, min(gf.day) AS first, max(gf.day) AS last
              FROM gf WHERE gf.num IS NULL GROUP BY 1, 2) m
        GROUP BY m.ord
    ),
    result AS (
        SELECT i.ord, NOT i.tracked OR coalesce(c.by_row AND NOT c.missing, false) AS by_row,
               CASE WHEN c.missing THEN NULL
                    WHEN c.ord IS NULL THEN coalesce(sm.amount, 0)
                    ELSE trim_scale(coalesce(sm.amount, 0) + c.total) END AS spend,
               coalesce(fc.rows, '{}') AS foreign_rows,
               coalesce(m.rates, '{}') AS missing_rates,
               i.scope, i.org, i.project_id, i.user_id, i.period_start, i.period_end, i.currency
        FROM i
        LEFT JOIN same sm ON sm.ord = i.ord
        LEFT JOIN conv c ON c.ord = i.ord
        LEFT JOIN foreign_counts fc ON fc.ord = i.ord
        LEFT JOIN missing m ON m.ord = i.ord
    )
    SELECT r.ord,
           CASE WHEN r.by_row THEN f.spend ELSE r.spend END,
           CASE WHEN r.by_row THEN f.foreign_rows ELSE r.foreign_rows END,
           CASE WHEN r.by_row THEN f.missing_rates ELSE r.missing_rates END
    FROM result r
    LEFT JOIN LATERAL (  -- only where a conversion truncates row by row, or the scope is not kept (untracked)
        SELECT * FROM cost_worker_spend_full(r.scope, r.org, r.project_id, r.user_id, r.period_start, r.period_end,
                                             r.currency)
        WHERE r.by_row
        OFFSET 0  -- not pulled up into the join, so the filter gates the call
    ) f ON true
$$;


CREATE OR REPLACE FUNCTION cost_worker_spend_track(
    scopes text[], orgs uuid[], projects uuid[], users uuid[], max_new integer DEFAULT NULL
) RETURNS integer
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    m_orgs uuid[];
    m_scopes text[];
    m_subjects uuid[];
    m_projects uuid[];
    added_scopes text[];
    added_subjects uuid[];
    added_projects uuid[];
    added_orgs uuid[];
BEGIN
    SELECT array_agg(m.o), array_agg(m.scope), array_agg(m.subject), array_agg(m.subject_project)
    INTO m_orgs, m_scopes, m_subjects, m_projects
    FROM (SELECT w.*
          FROM (SELECT DISTINCT t.o, k.scope, k.subject, k.subject_project
                FROM unnest(scopes, orgs, projects, users) AS t(scope, o, p, u)
                CROSS JOIN LATERAL cost_worker_spend_subject(t.p, t.u) k
                WHERE t.scope = 'user' AND t.u IS NOT NULL) w
          WHERE NOT EXISTS (SELECT FROM spend_subjects s
                            WHERE s.scope = w.scope AND s.subject = w.subject
                              AND s.subject_project = w.subject_project
                              AND s.organization_id = w.o)  -- 0045: a subject is registered per organization
          ORDER BY w.scope, w.subject, w.subject_project, w.o
          LIMIT max_new) m;
    IF m_orgs IS NULL THEN
        RETURN 0;
    END IF;
    -- Exclusive: no rollup delta of these organizations is in flight while the new subjects are built.
    PERFORM cost_worker_spend_lock(m_orgs, true);
    WITH added AS (
        INSERT INTO spend_subjects (organization_id, scope, subject, subject_project)
        SELECT t.o, t.scope, t.subject, t.subject_project
        FROM unnest(m_orgs, m_scopes, m_subjects, m_projects) AS t(o, scope, subject, subject_project)
        JOIN organizations o ON o.id = t.o  -- only existing organizations
        ON CONFLICT DO NOTHING
        RETURNING scope, subject, subject_project, organization_id
    )
    SELECT array_agg(scope), array_agg(subject), array_agg(subject_project), array_agg(organization_id)
    INTO added_scopes, added_subjects, added_projects, added_orgs
    FROM added;
    IF added_scopes IS NULL THEN
        RETURN 0;
    END IF;
    -- What 0012 kept for them before (or nothing) goes, replaced by their rollups as they are now. Every read is an
    -- index range scan per subject (LATERAL behind OFFSET 0: never a join the planner could answer with a scan of the
    -- whole aggregate or of every rollup).
    DELETE FROM spend_hourly h
    WHERE h.ctid = ANY (ARRAY(
        SELECT x.ctid FROM unnest(added_scopes, added_subjects, added_projects, added_orgs)
            AS a(scope, subject, subject_project, organization_id)
        CROSS JOIN LATERAL (
            SELECT v.ctid FROM spend_hourly v
            WHERE v.scope = a.scope AND v.subject = a.subject AND v.subject_project = a.subject_project
              AND v.organization_id = a.organization_id  -- 0045: its rows of the organization only
            OFFSET 0
        ) x));
    DELETE FROM spend_daily d
    WHERE d.ctid = ANY (ARRAY(
        SELECT x.ctid FROM unnest(added_scopes, added_subjects, added_projects, added_orgs)
            AS a(scope, subject, subject_project, organization_id)
        CROSS JOIN LATERAL (
            SELECT v.ctid FROM spend_daily v
            WHERE v.scope = a.scope AND v.subject = a.subject AND v.subject_project = a.subject_project
              AND v.organization_id = a.organization_id  -- 0045: its rows of the organization only
            OFFSET 0
        ) x));
    -- Their rollups as they are.
    INSERT INTO spend_hourly (organization_id, scope, subject, subject_project, at, rate_day, currency, authority,
                              amount, n_rows, max_scale)
    SELECT m.organization_id, a.scope, a.subject, a.subject_project, m.hour, (m.hour AT TIME ZONE 'UTC')::date, 'USD',
           'estimate', sum(m.estimated_cost_usd), count(*), max(scale(m.estimated_cost_usd))
    FROM unnest(added_scopes, added_subjects, added_projects, added_orgs)
            AS a(scope, subject, subject_project, organization_id)
    CROSS JOIN LATERAL (
        SELECT u.organization_id, u.hour, u.estimated_cost_usd FROM user_metrics u
        WHERE u.user_id = a.subject AND (a.scope = 'user' OR u.project_id = a.subject_project)
          AND u.organization_id = a.organization_id  -- 0045: the user's rollups that name the organization
        OFFSET 0
    ) m
    GROUP BY m.organization_id, a.scope, a.subject, a.subject_project, m.hour;
    INSERT INTO spend_daily (organization_id, scope, subject, subject_project, day, rate_day, currency, authority,
                             amount, n_rows, max_scale)
    SELECT h.organization_id, h.scope, h.subject, h.subject_project, date_trunc('day', h.at, 'UTC'), h.rate_day,
           h.currency, h.authority, sum(h.amount), sum(h.n_rows), max(h.max_scale)
    FROM unnest(added_scopes, added_subjects, added_projects, added_orgs)
            AS a(scope, subject, subject_project, organization_id)
    CROSS JOIN LATERAL (
        SELECT v.* FROM spend_hourly v
        WHERE v.scope = a.scope AND v.subject = a.subject AND v.subject_project = a.subject_project
          AND v.organization_id = a.organization_id
        OFFSET 0
    ) h
    GROUP BY 1, 2, 3, 4, 5, 6, 7, 8;
    RETURN cardinality(added_scopes);
END
$$;


CREATE OR REPLACE FUNCTION cost_worker_spend_users_changed(delta cost_worker_spend_user[]) RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    IF cardinality(delta) = 0 THEN
        RETURN;
    END IF;
    -- Shared: a registration (cost_worker_spend_track, exclusive) and its rebuild see this delta committed, or
    -- this statement sees the registration committed (READ COMMITTED: a new snapshot after the lock).
    PERFORM cost_worker_spend_lock(ARRAY(SELECT x.organization_id FROM unnest(delta) AS x), false);
    WITH d AS (
        SELECT x.organization_id, x.user_id, x.project_id, x.hour, sum(x.amount) AS amount, sum(x.n) AS n,
               max(scale(x.amount)) AS max_scale
        FROM unnest(delta) AS x
        JOIN organizations o ON o.id = x.organization_id
        GROUP BY 1, 2, 3, 4
        HAVING sum(x.amount) <> 0 OR sum(x.n) <> 0
    ),
    scoped AS MATERIALIZED (
        SELECT organization_id, 'user' AS scope, user_id AS subject,
               '00000000-0000-0000-0000-000000000000'::uuid AS subject_project, hour, amount, n, max_scale
        FROM d
        WHERE EXISTS (SELECT FROM spend_subjects s
                      WHERE s.scope = 'user' AND s.subject = d.user_id
                        AND s.subject_project = '00000000-0000-0000-0000-000000000000'
                        AND s.organization_id = d.organization_id)  -- 0045: registered in the row's organization
        UNION ALL
        SELECT organization_id, 'user_project', user_id, project_id, hour, amount, n, max_scale
        FROM d
        WHERE project_id IS NOT NULL
          AND EXISTS (SELECT FROM spend_subjects s
                      WHERE s.scope = 'user_project' AND s.subject = d.user_id AND s.subject_project = d.project_id
                        AND s.organization_id = d.organization_id)  -- 0045
    ),
    hourly AS (
        INSERT INTO spend_hourly AS s (organization_id, scope, subject, subject_project, at, rate_day, currency,
                                       authority, amount, n_rows, max_scale)
        SELECT organization_id, scope, subject, subject_project, hour, (hour AT TIME ZONE 'UTC')::date, 'USD',
               'estimate', sum(amount), sum(n), max(max_scale)
        FROM scoped
        GROUP BY organization_id, scope, subject, subject_project, hour
        ORDER BY scope, subject, subject_project, hour
        ON CONFLICT ON CONSTRAINT spend_hourly_key DO UPDATE SET
            amount = s.amount + EXCLUDED.amount,
            n_rows = s.n_rows + EXCLUDED.n_rows,
            max_scale = greatest(s.max_scale, EXCLUDED.max_scale)
    )
    INSERT INTO spend_daily AS s (organization_id, scope, subject, subject_project, day, rate_day, currency,
                                  authority, amount, n_rows, max_scale)
    SELECT organization_id, scope, subject, subject_project, date_trunc('day', hour, 'UTC'),
           (hour AT TIME ZONE 'UTC')::date, 'USD', 'estimate', sum(amount), sum(n), max(max_scale)
    FROM scoped
    GROUP BY organization_id, scope, subject, subject_project, date_trunc('day', hour, 'UTC'),
             (hour AT TIME ZONE 'UTC')::date
    ORDER BY scope, subject, subject_project, 5
    ON CONFLICT ON CONSTRAINT spend_daily_key DO UPDATE SET
        amount = s.amount + EXCLUDED.amount,
        n_rows = s.n_rows + EXCLUDED.n_rows,
        max_scale = greatest(s.max_scale, EXCLUDED.max_scale);
END
$$;


CREATE OR REPLACE FUNCTION cost_worker_spend_rebuild(orgs uuid[] DEFAULT NULL) RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    areas cost_worker_spend_area[];
BEGIN
    IF orgs IS NULL THEN
        DELETE FROM spend_hourly;
        DELETE FROM spend_daily;
        DELETE FROM spend_cover;
        DELETE FROM spend_reach;
    ELSE
        PERFORM cost_worker_spend_lock(orgs, true);
        DELETE FROM spend_hourly WHERE organization_id = ANY (orgs);
        DELETE FROM spend_daily WHERE organization_id = ANY (orgs);
        DELETE FROM spend_cover WHERE organization_id = ANY (orgs);
        DELETE FROM spend_reach WHERE organization_id = ANY (orgs);
    END IF;
    INSERT INTO spend_reach (organization_id, window_max)
    SELECT c.organization_id, max(c.bucket_end_time - c.bucket_start_time)
    FROM cost_data c
    WHERE orgs IS NULL OR c.organization_id = ANY (orgs)
    GROUP BY c.organization_id;
    -- Organization and project scopes: the whole span of their rows, by the rules.
    WITH spans AS (
        SELECT organization_id, project_id, min(bucket_start_time) AS s, max(bucket_end_time) AS e
        FROM cost_data WHERE orgs IS NULL OR organization_id = ANY (orgs) GROUP BY 1, 2
        UNION ALL
        SELECT organization_id, project_id, min(hour), max(hour) + interval '1 hour'
        FROM project_metrics WHERE orgs IS NULL OR organization_id = ANY (orgs) GROUP BY 1, 2
    ),
    whole AS (
        SELECT 'organization' AS scope, organization_id AS subject, organization_id, min(s) AS s, max(e) AS e
        FROM spans GROUP BY organization_id
        UNION ALL
        SELECT 'project', project_id, organization_id, min(s), max(e)
        FROM spans WHERE project_id IS NOT NULL GROUP BY organization_id, project_id
    )
    SELECT coalesce(array_agg(ROW(w.scope, w.subject, w.organization_id, date_trunc('hour', w.s, 'UTC'),
                                  cost_worker_hour_ceil(w.e))::cost_worker_spend_area), '{}')
    INTO areas
    FROM whole w;
    PERFORM cost_worker_spend_recompute(areas);
    -- User scopes: their rollups as they are.
    INSERT INTO spend_hourly (organization_id, scope, subject, subject_project, at, rate_day, currency, authority,
                              amount, n_rows, max_scale)
    SELECT organization_id, 'user', user_id, '00000000-0000-0000-0000-000000000000', hour,
           (hour AT TIME ZONE 'UTC')::date, 'USD', 'estimate', sum(estimated_cost_usd), count(*),
           max(scale(estimated_cost_usd))
    FROM user_metrics m
    WHERE (orgs IS NULL OR m.organization_id = ANY (orgs))
      AND EXISTS (SELECT FROM spend_subjects s
                  WHERE s.scope = 'user' AND s.subject = m.user_id
                    AND s.subject_project = '00000000-0000-0000-0000-000000000000'
                    AND s.organization_id = m.organization_id)  -- 0045: registered in the row's organization
    GROUP BY organization_id, user_id, hour
    UNION ALL
    SELECT organization_id, 'user_project', user_id, project_id, hour, (hour AT TIME ZONE 'UTC')::date, 'USD',
           'estimate', sum(estimated_cost_usd), count(*), max(scale(estimated_cost_usd))
    FROM user_metrics m
    WHERE m.project_id IS NOT NULL AND (orgs IS NULL OR m.organization_id = ANY (orgs))
      AND EXISTS (SELECT FROM spend_subjects s
                  WHERE s.scope = 'user_project' AND s.subject = m.user_id AND s.subject_project = m.project_id
                    AND s.organization_id = m.organization_id)  -- 0045
    GROUP BY organization_id, user_id, project_id, hour;
    INSERT INTO spend_daily (organization_id, scope, subject, subject_project, day, rate_day, currency, authority,
                             amount, n_rows, max_scale)
    SELECT h.organization_id, h.scope, h.subject, h.subject_project, date_trunc('day', h.at, 'UTC'), h.rate_day,
           h.currency, h.authority, sum(h.amount), sum(h.n_rows), max(h.max_scale)
    FROM spend_hourly h
    WHERE h.scope IN ('user', 'user_project') AND (orgs IS NULL OR h.organization_id = ANY (orgs))
    GROUP BY 1, 2, 3, 4, 5, 6, 7, 8;
END
$$;


ALTER TABLE spend_subjects DROP CONSTRAINT spend_subjects_key,
    ADD CONSTRAINT spend_subjects_key PRIMARY KEY (scope, subject, subject_project, organization_id);

-- The organizations whose aggregate holds user-scope rows of a subject not registered in them (see above). The
-- owner lifts FORCE for the length of this transaction to see every tenant (as 0044 did).
ALTER TABLE organizations NO FORCE ROW LEVEL SECURITY;
ALTER TABLE spend_hourly NO FORCE ROW LEVEL SECURITY;
ALTER TABLE spend_daily NO FORCE ROW LEVEL SECURITY;
ALTER TABLE spend_subjects NO FORCE ROW LEVEL SECURITY;
ALTER TABLE spend_rebuilds NO FORCE ROW LEVEL SECURITY;
INSERT INTO spend_rebuilds (organization_id, reason)
SELECT DISTINCT x.organization_id, 'migration 0045: user scopes per organization'
FROM (SELECT h.organization_id, h.scope, h.subject, h.subject_project FROM spend_hourly h
      WHERE h.scope IN ('user', 'user_project')
      UNION
      SELECT d.organization_id, d.scope, d.subject, d.subject_project FROM spend_daily d
      WHERE d.scope IN ('user', 'user_project')) x
JOIN organizations o ON o.id = x.organization_id
WHERE NOT EXISTS (SELECT FROM spend_subjects s
                  WHERE s.scope = x.scope AND s.subject = x.subject AND s.subject_project = x.subject_project
                    AND s.organization_id = x.organization_id)
ON CONFLICT DO NOTHING;
ALTER TABLE organizations FORCE ROW LEVEL SECURITY;
ALTER TABLE spend_hourly FORCE ROW LEVEL SECURITY;
ALTER TABLE spend_daily FORCE ROW LEVEL SECURITY;
ALTER TABLE spend_subjects FORCE ROW LEVEL SECURITY;
ALTER TABLE spend_rebuilds FORCE ROW LEVEL SECURITY;
