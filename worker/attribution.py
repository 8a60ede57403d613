"""Attribution: provider ids (provider, provider organization, provider project) -> our (organization, project).

Pure: built from the ``projects`` rows a batch needs (``Tx.lookup_provider_projects``). A line that maps to no
project, or to several, is not attributed: its message is quarantined (``unattributed``, ``ambiguous_attribution``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from uuid import UUID

from worker.providers import LedgerLine
from worker.quarantine import Reason
from worker.rows import ProjectLink


@dataclass(frozen=True, slots=True)
class Owner:
    organization_id: UUID
    project_id: UUID | None  # None: the line has no provider project (it belongs to the organization)


@dataclass(frozen=True, slots=True)
class Unattributed:
    reason: Reason
    detail: str


class Attribution:
    """Provider ids -> (organization, project), from the projects table rows a batch needs."""

    def __init__(self, links: Iterable[ProjectLink]) -> None:
        self.projects: dict[tuple[str, str, str], set[tuple[UUID, UUID]]] = defaultdict(set)
        self.legacy: dict[str, tuple[UUID, UUID]] = {}
        self.organizations: dict[tuple[str, str], set[UUID]] = defaultdict(set)
        for link in links:
            target = (link.organization_id, link.project_id)
            if link.ai_provider and link.ai_organization_id:
                self.organizations[(link.ai_provider, link.ai_organization_id)].add(link.organization_id)
                if link.ai_project_id:
                    self.projects[(link.ai_provider, link.ai_organization_id, link.ai_project_id)].add(target)
            if link.openai_project_id:
                self.legacy[link.openai_project_id] = target

    def owners(self, provider: str, ai_organization_id: str) -> set[UUID]:
        """The organizations that own a provider account."""
        return self.organizations.get((provider, ai_organization_id), set())

    def resolve(self, line: LedgerLine) -> Owner | Unattributed:
        owners = self.owners(line.provider, line.ai_organization_id)
        if line.ai_project_id is None:
            if len(owners) == 1:
                return Owner(next(iter(owners)), None)
            if not owners:
                return Unattributed(
                    Reason.UNATTRIBUTED,
                    f"{line.provider} organization {line.ai_organization_id!r} maps to no organization",
                )
            return Unattributed(
                Reason.AMBIGUOUS_ATTRIBUTION,
                f"{line.provider} organization {line.ai_organization_id!r} maps to {len(owners)} organizations",
            )
        candidates = set(self.projects.get((line.provider, line.ai_organization_id, line.ai_project_id), set()))
        if line.provider == "openai" and line.ai_project_id in self.legacy:
            legacy = self.legacy[line.ai_project_id]
            if owners and legacy[0] not in owners:
                return Unattributed(
                    Reason.AMBIGUOUS_ATTRIBUTION,
                    f"legacy project {line.ai_project_id!r} belongs to another organization than "
                    f"{line.ai_organization_id!r}",
                )
            candidates.add(legacy)
        if len(candidates) == 1:
            organization, project = next(iter(candidates))
            return Owner(organization, project)
        if not candidates:
            return Unattributed(
                Reason.UNATTRIBUTED,
                f"{line.provider} project {line.ai_project_id!r} of {line.ai_organization_id!r} maps to no project",
            )
        return Unattributed(
            Reason.AMBIGUOUS_ATTRIBUTION, f"{line.provider} project {line.ai_project_id!r} maps to several projects"
        )


def accounts(lines: Iterable[LedgerLine]) -> tuple[set[tuple[str, str]], set[str]]:
    """What a batch's lines need looked up: provider accounts, and legacy OpenAI project ids."""
    provider_orgs: set[tuple[str, str]] = set()
    legacy: set[str] = set()
    for line in lines:
        provider_orgs.add((line.provider, line.ai_organization_id))
        if line.provider == "openai" and line.ai_project_id:
            legacy.add(line.ai_project_id)
    return provider_orgs, legacy
