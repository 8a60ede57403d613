-- Issue 18 item 6 (budgets at platform scale): the spend aggregate keeps a user's scopes only once a user budget
-- names them, instead of for every user; and reads a period with one index range scan per candidate and level.
--
-- Why: every rollup row a batch changes added its delta to the organization's, the project's, the user's and the
-- user-within-project scopes, hourly and daily (eight aggregate rows). A platform has many users and few user
-- budgets, so the four user-scope rows were mostly never read: in the benchmark's spread drain (1,000
-- organizations, ~5,000 distinct rollup rows per batch) the user-scope trigger took ~215 ms of a ~1,340 ms batch.
-- (Projects stay kept whatever their budgets: registering a project means recomputing its whole history by the
-- rules, provider lines included, which measured ~85 ms per project for a month of hourly data and made the first
-- evaluation of a bulk import of project budgets take tens of seconds; a user's scope is a sum of its rollups.)
--
-- spend_subjects lists the user scopes kept. cost_worker_spend_track registers the scopes of the user budgets it is
-- given (the worker calls it for the budgets it evaluates, a batch's candidates and the sweep's) and builds a newly
-- registered one from the user's rollups in the same transaction. A subject stays registered once it is (a budget
-- deleted or deactivated leaves it: re-activating needs no rebuild).
-- Equal to the full computation at every moment:
-- - a registered subject's rows are added by the user-scope trigger (cost_worker_spend_users_changed), which now
--   takes the organization's shared spend lock before it reads spend_subjects; registration takes the exclusive
--   one before it inserts and builds. So a concurrent batch's delta is either seen committed by the build or
--   added after the registration committed (READ COMMITTED: every statement of these functions takes a new
--   snapshot after the lock), never both and never neither;
-- - an unregistered user scope is computed in full (cost_worker_spend_full) by cost_worker_spend_many: the rows the
--   aggregate holds for it from before this migration are never read, and a registration replaces them.
--
-- Expand (compat.toml): a new table and two functions; the functions replaced keep their signatures and their
-- results. The previous release does not call cost_worker_spend_track: the user budgets registered here (every one
-- that exists now) keep the aggregate, a user budget created later is computed in full until this release
-- evaluates it.

CREATE TABLE spend_subjects (
    organization_id uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    scope           text NOT NULL CHECK (scope IN ('user', 'user_project')),
    subject         uuid NOT NULL,  -- the user
    subject_project uuid NOT NULL DEFAULT '00000000-0000-0000-0000-000000000000',  -- user_project: the project
    registered_at   timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT spend_subjects_key PRIMARY KEY (scope, subject, subject_project)
);
COMMENT ON TABLE spend_subjects IS 'the user scopes the spend aggregate is kept for (a user budget''s)';

-- The scope a user budget's spend is kept under: ('user', user) or ('user_project', user, project).
CREATE FUNCTION cost_worker_spend_subject(
    project uuid, usr uuid, OUT scope text, OUT subject uuid, OUT subject_project uuid
)
LANGUAGE sql IMMUTABLE
AS $$
    SELECT CASE WHEN project IS NULL THEN 'user' ELSE 'user_project' END, usr,
           coalesce(project, '00000000-0000-0000-0000-000000000000'::uuid)
$$;

-- Every user budget that exists now (active or not): their aggregate is up to date (0012 kept every user). The
-- backfill must see every tenant's budgets: the owner lifts FORCE on ai_budgets for the length of this transaction
-- (as 0012 did on its sources; the table is small), and spend_subjects gets its row-level security after it.
ALTER TABLE ai_budgets NO FORCE ROW LEVEL SECURITY;
INSERT INTO spend_subjects (organization_id, scope, subject, subject_project)
SELECT DISTINCT b.organization_id, k.scope, k.subject, k.subject_project
FROM ai_budgets b
CROSS JOIN LATERAL cost_worker_spend_subject(b.project_id, b.user_id) k
ON CONFLICT DO NOTHING;
ALTER TABLE ai_budgets FORCE ROW LEVEL SECURITY;

ALTER TABLE spend_subjects ENABLE ROW LEVEL SECURITY;
ALTER TABLE spend_subjects FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON spend_subjects
    USING (organization_id = ANY ((SELECT cost_worker_tenant_ids())::uuid[]))
    WITH CHECK (organization_id = ANY ((SELECT cost_worker_tenant_ids())::uuid[]));
GRANT SELECT, INSERT ON spend_subjects TO cost_worker_writer;
GRANT SELECT ON spend_subjects TO cost_worker_reader;

-- Register the scopes of the user budgets among those given as (scope, organization, project, user) (other scopes are
-- always kept), and build the aggregate of those not registered before from their rollups: at most max_new of them
-- (NULL: all), so one transaction never builds too many (~10 ms per user for a month of hourly rollups); the others
-- stay computed in full until a later call. Returns how many were registered. Most calls find every subject
-- registered: one index probe each, no lock, nothing written.
CREATE FUNCTION cost_worker_spend_track(
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
                              AND s.subject_project = w.subject_project)
          ORDER BY w.scope, w.subject, w.subject_project
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
        RETURNING scope, subject, subject_project
    )
    SELECT array_agg(scope), array_agg(subject), array_agg(subject_project)
    INTO added_scopes, added_subjects, added_projects
    FROM added;
    IF added_scopes IS NULL THEN
        RETURN 0;
    END IF;
    -- What 0012 kept for them before (or nothing) goes, replaced by their rollups as they are now. Every read is an
    -- index range scan per subject (LATERAL behind OFFSET 0: never a join the planner could answer with a scan of the
    -- whole aggregate or of every rollup).
    DELETE FROM spend_hourly h
    WHERE h.ctid = ANY (ARRAY(
        SELECT x.ctid FROM unnest(added_scopes, added_subjects, added_projects) AS a(scope, subject, subject_project)
        CROSS JOIN LATERAL (
            SELECT v.ctid FROM spend_hourly v
            WHERE v.scope = a.scope AND v.subject = a.subject AND v.subject_project = a.subject_project
            OFFSET 0
        ) x));
    DELETE FROM spend_daily d
    WHERE d.ctid = ANY (ARRAY(
        SELECT x.ctid FROM unnest(added_scopes, added_subjects, added_projects) AS a(scope, subject, subject_project)
        CROSS JOIN LATERAL (
            SELECT v.ctid FROM spend_daily v
            WHERE v.scope = a.scope AND v.subject = a.subject AND v.subject_project = a.subject_project
            OFFSET 0
        ) x));
    -- Their rollups as they are.
    INSERT INTO spend_hourly (organization_id, scope, subject, subject_project, at, rate_day, currency, authority,
                              amount, n_rows, max_scale)
    SELECT m.organization_id, a.scope, a.subject, a.subject_project, m.hour, (m.hour AT TIME ZONE 'UTC')::date, 'USD',
           'estimate', sum(m.estimated_cost_usd), count(*), max(scale(m.estimated_cost_usd))
    FROM unnest(added_scopes, added_subjects, added_projects) AS a(scope, subject, subject_project)
    CROSS JOIN LATERAL (
        SELECT u.organization_id, u.hour, u.estimated_cost_usd FROM user_metrics u
        WHERE u.user_id = a.subject AND (a.scope = 'user' OR u.project_id = a.subject_project)
        OFFSET 0
    ) m
    GROUP BY m.organization_id, a.scope, a.subject, a.subject_project, m.hour;
    INSERT INTO spend_daily (organization_id, scope, subject, subject_project, day, rate_day, currency, authority,
                             amount, n_rows, max_scale)
    SELECT h.organization_id, h.scope, h.subject, h.subject_project, date_trunc('day', h.at, 'UTC'), h.rate_day,
           h.currency, h.authority, sum(h.amount), sum(h.n_rows), max(h.max_scale)
    FROM unnest(added_scopes, added_subjects, added_projects) AS a(scope, subject, subject_project)
    CROSS JOIN LATERAL (
        SELECT v.* FROM spend_hourly v
        WHERE v.scope = a.scope AND v.subject = a.subject AND v.subject_project = a.subject_project
        OFFSET 0
    ) h
    GROUP BY 1, 2, 3, 4, 5, 6, 7, 8;
    RETURN cardinality(added_scopes);
END
$$;
GRANT EXECUTE ON FUNCTION cost_worker_spend_track(text[], uuid[], uuid[], uuid[], integer) TO cost_worker_writer;

-- A user's rollup rows changed: add the net deltas to the user's scopes that are registered.
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
                        AND s.subject_project = '00000000-0000-0000-0000-000000000000')
        UNION ALL
        SELECT organization_id, 'user_project', user_id, project_id, hour, amount, n, max_scale
        FROM d
        WHERE project_id IS NOT NULL
          AND EXISTS (SELECT FROM spend_subjects s
                      WHERE s.scope = 'user_project' AND s.subject = d.user_id AND s.subject_project = d.project_id)
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

-- Rebuild (0012): user scopes of registered subjects only.
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
                    AND s.subject_project = '00000000-0000-0000-0000-000000000000')
    GROUP BY organization_id, user_id, hour
    UNION ALL
    SELECT organization_id, 'user_project', user_id, project_id, hour, (hour AT TIME ZONE 'UTC')::date, 'USD',
           'estimate', sum(estimated_cost_usd), count(*), max(scale(estimated_cost_usd))
    FROM user_metrics m
    WHERE m.project_id IS NOT NULL AND (orgs IS NULL OR m.organization_id = ANY (orgs))
      AND EXISTS (SELECT FROM spend_subjects s
                  WHERE s.scope = 'user_project' AND s.subject = m.user_id AND s.subject_project = m.project_id)
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

-- Spend of many (scope, period) pairs (0012): an unregistered user scope is computed in full.
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
               date_trunc('day', t.period_start - interval '1 microsecond', 'UTC') + interval '1 day' AS d_from,
               date_trunc('day', t.period_end, 'UTC') AS d_until
        FROM unnest(scopes, orgs, projects, users, starts, ends, currencies)
            WITH ORDINALITY AS t(scope, org, project_id, user_id, period_start, period_end, currency, ord)
    ),
    i AS MATERIALIZED (  -- user scopes are kept for the subjects in spend_subjects only (0016)
        SELECT k.*,
               k.k_scope IN ('organization', 'project')
               OR EXISTS (SELECT FROM spend_subjects s
                          WHERE s.scope = k.k_scope AND s.subject = k.k_subject AND s.subject_project = k.k_project)
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
              AND (i.k_scope NOT IN ('organization', 'project') OR v.organization_id = i.org)
            OFFSET 0
        ) d
        WHERE i.tracked AND i.d_from < i.d_until
        UNION ALL
        SELECT i.ord, i.currency, h.currency, h.rate_day, h.amount, h.n_rows, h.max_scale
        FROM i CROSS JOIN LATERAL (
            SELECT v.currency, v.rate_day, v.amount, v.n_rows, v.max_scale FROM spend_hourly v
            WHERE v.scope = i.k_scope AND v.subject = i.k_subject AND v.subject_project = i.k_project
              AND v.at >= i.period_start AND v.at < least(i.period_end, i.d_from) AND v.n_rows <> 0
              AND (i.k_scope NOT IN ('organization', 'project') OR v.organization_id = i.org)
            OFFSET 0
        ) h
        WHERE i.tracked AND i.period_start < least(i.period_end, i.d_from)
        UNION ALL
        SELECT i.ord, i.currency, h.currency, h.rate_day, h.amount, h.n_rows, h.max_scale
        FROM i CROSS JOIN LATERAL (
            SELECT v.currency, v.rate_day, v.amount, v.n_rows, v.max_scale FROM spend_hourly v
            WHERE v.scope = i.k_scope AND v.subject = i.k_subject AND v.subject_project = i.k_project
              AND v.at >= greatest(i.d_until, i.d_from, i.period_start) AND v.at < i.period_end AND v.n_rows <> 0
              AND (i.k_scope NOT IN ('organization', 'project') OR v.organization_id = i.org)
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
