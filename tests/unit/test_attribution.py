"""Attribution without servers: provider ids -> (organization, project), or the reason a line has no owner."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from worker.attribution import Attribution, Owner, Unattributed, accounts
from worker.providers import LedgerLine
from worker.quarantine import Reason
from worker.rows import ProjectLink

ORG_A, ORG_B = uuid.uuid4(), uuid.uuid4()
P1, P2, LEGACY = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()


def line(ai_org: str, ai_project: str | None, provider: str = "openai") -> LedgerLine:
    start = datetime(2026, 11, 1, tzinfo=UTC)
    return LedgerLine(provider, ai_org, ai_project, "costs_v1", start, start, "all", "USD", None, None, None)


LINKS = [
    ProjectLink(ORG_A, P1, "openai", "org-a", "proj_1", None),
    ProjectLink(ORG_A, LEGACY, None, None, None, "legacy_1"),
    ProjectLink(ORG_B, P2, "openai", "org-shared", "proj_2", None),
    ProjectLink(ORG_A, uuid.uuid4(), "openai", "org-shared", "proj_3", None),
    ProjectLink(ORG_B, uuid.uuid4(), "openai", "org-b", "proj_x", "legacy_b"),
]
BOOK = Attribution(LINKS)


def test_a_project_line_maps_to_its_project() -> None:
    assert BOOK.resolve(line("org-a", "proj_1")) == Owner(ORG_A, P1)


def test_a_line_without_project_belongs_to_the_only_owner_of_its_account() -> None:
    assert BOOK.resolve(line("org-a", None)) == Owner(ORG_A, None)


def test_unknown_and_shared_accounts_are_not_attributed() -> None:
    assert BOOK.resolve(line("org-nobody", None)) == Unattributed(
        Reason.UNATTRIBUTED, "openai organization 'org-nobody' maps to no organization"
    )
    shared = BOOK.resolve(line("org-shared", None))
    assert isinstance(shared, Unattributed)
    assert shared.reason is Reason.AMBIGUOUS_ATTRIBUTION
    assert "2 organizations" in shared.detail
    missing = BOOK.resolve(line("org-a", "proj_9"))
    assert isinstance(missing, Unattributed)
    assert missing.reason is Reason.UNATTRIBUTED


def test_a_legacy_openai_project_id_maps_within_its_organization_only() -> None:
    assert BOOK.resolve(line("org-unmapped", "legacy_1")) == Owner(ORG_A, LEGACY)
    assert BOOK.resolve(line("org-a", "legacy_1")) == Owner(ORG_A, LEGACY)
    other = BOOK.resolve(line("org-a", "legacy_b"))
    assert isinstance(other, Unattributed)
    assert other.reason is Reason.AMBIGUOUS_ATTRIBUTION
    assert BOOK.resolve(line("org-unmapped", "legacy_1", provider="anthropic")) == Unattributed(
        Reason.UNATTRIBUTED, "anthropic project 'legacy_1' of 'org-unmapped' maps to no project"
    )


def test_accounts_name_what_a_batch_needs_looked_up() -> None:
    lines = [line("org-a", "proj_1"), line("org-a", None), line("org-c", "x", provider="anthropic")]
    assert accounts(lines) == ({("openai", "org-a"), ("anthropic", "org-c")}, {"proj_1"})
