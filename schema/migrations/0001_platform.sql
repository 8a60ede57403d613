-- The platform's tenancy tables, as the platform defines them. The worker only reads them, to attribute data.

-- Row-level security reads the organizations a transaction may see from one transaction-scoped setting:
--   SELECT set_config('cost_worker.organization_ids', '<uuid>[,<uuid>...]', true);
-- Unset or empty means no organization: every policy fails closed.
CREATE FUNCTION cost_worker_tenant_ids() RETURNS uuid[]
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    SELECT string_to_array(nullif(current_setting('cost_worker.organization_ids', true), ''), ',')::uuid[]
$$;

CREATE TABLE organizations (
    id                uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name              varchar(255) NOT NULL,
    slug              varchar(100) NOT NULL UNIQUE,
    subscription_tier varchar(50)  NOT NULL DEFAULT 'free',
    api_quota_limit   integer      NOT NULL DEFAULT 1000,
    api_quota_used    integer      NOT NULL DEFAULT 0,
    settings          jsonb        NOT NULL DEFAULT '{}',
    created_at        timestamptz  NOT NULL DEFAULT now(),
    updated_at        timestamptz  NOT NULL DEFAULT now(),
    deleted_at        timestamptz
);

CREATE TABLE users (
    id                uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    organization_id   uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    email             varchar(255) NOT NULL UNIQUE,
    username          varchar(100) NOT NULL UNIQUE,
    full_name         varchar(255),
    role              varchar(50)  NOT NULL DEFAULT 'member'
                      CHECK (role IN ('admin', 'manager', 'member', 'viewer')),
    permissions       jsonb        NOT NULL DEFAULT '[]',
    preferences       jsonb        NOT NULL DEFAULT '{}',
    last_login_at     timestamptz,
    email_verified_at timestamptz,
    created_at        timestamptz  NOT NULL DEFAULT now(),
    updated_at        timestamptz  NOT NULL DEFAULT now(),
    deleted_at        timestamptz
);
CREATE INDEX users_organization_id_idx ON users (organization_id);

CREATE TABLE projects (
    id                 uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    organization_id    uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    created_by         uuid REFERENCES users (id) ON DELETE SET NULL,
    name               varchar(255) NOT NULL,
    description        text,
    topic              text         NOT NULL DEFAULT '',
    status             varchar(50)  NOT NULL DEFAULT 'active'
                       CHECK (status IN ('active', 'completed', 'archived', 'failed')),
    priority           varchar(20)  NOT NULL DEFAULT 'medium'
                       CHECK (priority IN ('low', 'medium', 'high', 'urgent')),
    metadata           jsonb        NOT NULL DEFAULT '{}',
    settings           jsonb        NOT NULL DEFAULT '{}',
    -- Provider mapping: the provider's organization and project (an Anthropic workspace plays the project).
    ai_provider        varchar(32)  CHECK (ai_provider IN ('openai', 'anthropic')),
    ai_organization_id varchar(255),
    ai_project_id      varchar(255),
    openai_project_id  varchar(255) UNIQUE,  -- legacy mapping, OpenAI only
    created_at         timestamptz  NOT NULL DEFAULT now(),
    updated_at         timestamptz  NOT NULL DEFAULT now(),
    completed_at       timestamptz,
    CONSTRAINT projects_provider_mapping_key UNIQUE (ai_provider, ai_organization_id, ai_project_id)
);
CREATE INDEX projects_organization_id_idx ON projects (organization_id);
-- Results without a project belong to the organization that owns the provider organization.
CREATE INDEX projects_provider_organization_idx ON projects (ai_provider, ai_organization_id);

-- Tenant isolation. FORCE applies the policies to the table owner too; superusers and BYPASSRLS roles are
-- the only exceptions, and none of the worker's roles is either.
ALTER TABLE organizations ENABLE ROW LEVEL SECURITY;
ALTER TABLE organizations FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON organizations
    USING (id = ANY ((SELECT cost_worker_tenant_ids())::uuid[]))
    WITH CHECK (id = ANY ((SELECT cost_worker_tenant_ids())::uuid[]));

ALTER TABLE users ENABLE ROW LEVEL SECURITY;
ALTER TABLE users FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON users
    USING (organization_id = ANY ((SELECT cost_worker_tenant_ids())::uuid[]))
    WITH CHECK (organization_id = ANY ((SELECT cost_worker_tenant_ids())::uuid[]));

ALTER TABLE projects ENABLE ROW LEVEL SECURITY;
ALTER TABLE projects FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON projects
    USING (organization_id = ANY ((SELECT cost_worker_tenant_ids())::uuid[]))
    WITH CHECK (organization_id = ANY ((SELECT cost_worker_tenant_ids())::uuid[]));

-- The worker attributes provider data across tenants, so it reads these three tables whole. It cannot
-- write them (no INSERT/UPDATE/DELETE grant).
CREATE POLICY worker_attribution ON organizations FOR SELECT TO cost_worker_writer USING (true);
CREATE POLICY worker_attribution ON users FOR SELECT TO cost_worker_writer USING (true);
CREATE POLICY worker_attribution ON projects FOR SELECT TO cost_worker_writer USING (true);

GRANT SELECT ON organizations, users, projects TO cost_worker_writer, cost_worker_reader;
GRANT EXECUTE ON FUNCTION cost_worker_tenant_ids() TO cost_worker_writer, cost_worker_reader;
