"""The hostile corpus: ``manifest.json``, its files and generators, with the placeholders filled in.

``World`` creates the organizations, projects, users and provider mappings the placeholders name (see
README.md), in the test's database.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from tests.factories import Org, make_org
from tests.hostile.generate import GENERATORS

HERE = Path(__file__).resolve().parent
TOPICS = ("api_usage", "provider_buckets")
PLACEHOLDER = re.compile(rb"\{\{([A-Z_]+)\}\}")


@dataclass(frozen=True)
class Hostile:
    name: str  # the file, or generate:<generator>@<topic>
    topic: str  # "api_usage" or "provider_buckets"
    value: bytes | None  # None: a tombstone
    key: bytes
    headers: tuple[tuple[str, bytes | None], ...]
    reason: str
    why: str
    original: bytes | None = None  # a good message to publish first (same event id, other content)


def manifest() -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = json.loads((HERE / "manifest.json").read_text(encoding="utf-8"))["messages"]
    return entries


def fill(data: bytes, ids: Mapping[str, str]) -> bytes:
    """Replace every ``{{NAME}}`` with its id; an unknown name is a mistake in the corpus."""

    def one(match: re.Match[bytes]) -> bytes:
        name = match.group(1).decode()
        if name not in ids:
            raise KeyError(f"unknown placeholder {{{{{name}}}}}")
        return ids[name].encode()

    return PLACEHOLDER.sub(one, data)


def load(ids: Mapping[str, str]) -> list[Hostile]:
    """Every hostile message of the manifest, ready to publish."""
    messages = []
    for entry in manifest():
        if "file" in entry:
            name = entry["file"]
            topic = name.split("/", 1)[0]
            value: bytes | None = fill((HERE / name).read_bytes(), ids)
            key = f"hostile:{name}".encode()
        else:
            topic = entry["topic"]
            name = f"generate:{entry['generate']}@{topic}"
            generated = GENERATORS[entry["generate"]]()
            value = None if generated.value is None else fill(generated.value, ids)
            key = generated.key or f"hostile:{name}".encode()
        headers = tuple(
            (h["name"], None if h["value_hex"] is None else bytes.fromhex(h["value_hex"]))
            for h in entry.get("headers", [])
        )
        original = fill((HERE / entry["original"]).read_bytes(), ids) if "original" in entry else None
        messages.append(Hostile(name, topic, value, key, headers, entry["reason"], entry["why"], original))
    return messages


@dataclass
class World:
    """The platform rows the placeholders refer to."""

    org: Org  # OpenAI organization OPENAI_ORG, project proj_a, one user
    anthropic: Org  # Anthropic organization ANTHROPIC_ORG, workspace wrkspc_a
    other: Org  # another organization, with a project and a user
    shared_ai_org: str  # an OpenAI organization that two organizations claim
    missing: dict[str, uuid.UUID] = field(
        default_factory=lambda: {name: uuid.uuid4() for name in ("org", "project", "user")}
    )

    @classmethod
    async def arrange(cls, db: asyncpg.Connection) -> World:
        org = await make_org(db, project_ids=("proj_a",))
        anthropic = await make_org(db, provider="anthropic", project_ids=("wrkspc_a",))
        other = await make_org(db, project_ids=("proj_other",))
        shared = f"org-shared-{uuid.uuid4().hex[:8]}"
        await make_org(db, ai_org=shared, project_ids=("proj_s1",))
        await make_org(db, ai_org=shared, project_ids=("proj_s2",))
        return cls(org=org, anthropic=anthropic, other=other, shared_ai_org=shared)

    @property
    def project(self) -> uuid.UUID:
        return self.org.projects["proj_a"]

    @property
    def user(self) -> uuid.UUID:
        return self.org.users[0]

    def ids(self) -> dict[str, str]:
        return {
            "ORG_ID": str(self.org.id),
            "PROJECT_ID": str(self.project),
            "USER_ID": str(self.user),
            "OTHER_ORG_ID": str(self.other.id),
            "OTHER_PROJECT_ID": str(self.other.projects["proj_other"]),
            "OTHER_USER_ID": str(self.other.users[0]),
            "MISSING_ORG_ID": str(self.missing["org"]),
            "MISSING_PROJECT_ID": str(self.missing["project"]),
            "MISSING_USER_ID": str(self.missing["user"]),
            "OPENAI_ORG": self.org.ai_org,
            "ANTHROPIC_ORG": self.anthropic.ai_org,
            "SHARED_OPENAI_ORG": self.shared_ai_org,
        }
