"""Preparing a scenario: the stream for a seed, its platform rows, its topics."""

from __future__ import annotations

import asyncpg

from tests.faults.checks import seed as seed_platform
from tests.faults.expectation import prepare
from tests.faults.generator import Stream, generate
from tests.kafka_helpers import create_topics
from worker.config import Settings


async def prepared(db: asyncpg.Connection, settings: Settings, seed: int, *, n_events: int = 1_200) -> Stream:
    stream = generate(seed, n_events=n_events)
    prepare(stream)
    await seed_platform(db, stream)
    await create_topics(settings, partitions=stream.partitions)
    return stream
