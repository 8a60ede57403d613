-- Demo data for `cost-worker dev`: one organization with three projects on two providers, two users,
-- and budgets. Idempotent (fixed ids); run by the owner/superuser of the dev database.
INSERT INTO organizations (id, name, slug, subscription_tier)
VALUES ('0d3c0000-0000-4000-8000-000000000001', 'Acme AI', 'acme-ai', 'enterprise')
ON CONFLICT (id) DO NOTHING;

INSERT INTO users (id, organization_id, email, username, full_name, role) VALUES
    ('0d3c0000-0000-4000-8000-0000000000a1', '0d3c0000-0000-4000-8000-000000000001', 'alice@acme.example', 'alice', 'Alice Doe', 'admin'),
    ('0d3c0000-0000-4000-8000-0000000000b0', '0d3c0000-0000-4000-8000-000000000001', 'bob@acme.example', 'bob', 'Bob Roe', 'member')
ON CONFLICT (id) DO NOTHING;

INSERT INTO projects (id, organization_id, created_by, name, topic, ai_provider, ai_organization_id, ai_project_id) VALUES
    ('0d3c0000-0000-4000-8000-0000000000f1', '0d3c0000-0000-4000-8000-000000000001', '0d3c0000-0000-4000-8000-0000000000a1',
     'Assistant', 'customer support assistant', 'openai', 'org-acme', 'proj_assistant'),
    ('0d3c0000-0000-4000-8000-0000000000f2', '0d3c0000-0000-4000-8000-000000000001', '0d3c0000-0000-4000-8000-0000000000a1',
     'Search', 'semantic search', 'openai', 'org-acme', 'proj_search'),
    ('0d3c0000-0000-4000-8000-0000000000f3', '0d3c0000-0000-4000-8000-000000000001', '0d3c0000-0000-4000-8000-0000000000b0',
     'Claude Apps', 'internal tools', 'anthropic', 'anthropic-acme', 'wrkspc_claude')
ON CONFLICT (id) DO NOTHING;

-- No model_prices: the genai-prices catalogue prices the demo's models (model_prices holds only overrides).

INSERT INTO ai_organization_budgets (id, organization_id, name, amount, currency, period, timezone, thresholds) VALUES
    ('0d3c0000-0000-4000-8000-0000000000c1', '0d3c0000-0000-4000-8000-000000000001', 'Acme monthly', 500, 'USD', 'monthly', 'Europe/Berlin', '{50,80,100}')
ON CONFLICT (id) DO NOTHING;
INSERT INTO ai_project_budgets (id, organization_id, project_id, name, amount, currency, period, timezone, thresholds) VALUES
    ('0d3c0000-0000-4000-8000-0000000000c2', '0d3c0000-0000-4000-8000-000000000001', '0d3c0000-0000-4000-8000-0000000000f1', 'Assistant monthly', 100, 'USD', 'monthly', 'UTC', '{50,80,100,150}')
ON CONFLICT (id) DO NOTHING;
INSERT INTO ai_budgets (id, organization_id, user_id, project_id, name, amount, currency, period, timezone, thresholds) VALUES
    ('0d3c0000-0000-4000-8000-0000000000c3', '0d3c0000-0000-4000-8000-000000000001', '0d3c0000-0000-4000-8000-0000000000a1', NULL, 'Alice daily', 2, 'USD', 'daily', 'America/New_York', '{50,100}')
ON CONFLICT (id) DO NOTHING;
