"""The collector's pure logic, without servers: windows, Retry-After, key sealing, exact envelopes."""

from __future__ import annotations

import asyncio
import io
import itertools
import json
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import jiter
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from worker.collect import admin
from worker.collect import keys as keystore
from worker.collect.client import ProviderClient, provider_clock, retry_after_seconds
from worker.collect.errors import KeyStoreError, ProviderRejected, ProviderUnavailable
from worker.collect.publisher import dump_exact, envelope
from worker.collect.revisions import revision_after
from worker.collect.sources import ANTHROPIC_ENDPOINTS, ENDPOINTS, OPENAI_ENDPOINTS, Endpoint, headers
from worker.collect.windows import MAX_EMPTY_PAGES, read_window, window_for
from worker.errors import ConfigError
from worker.models import ProviderEnvelope

NOW = datetime(2026, 11, 20, 15, 30, tzinfo=UTC)
TODAY = datetime(2026, 11, 20, tzinfo=UTC)
DAY = timedelta(days=1)


def test_first_poll_backfills_from_the_start_date_to_the_open_bucket() -> None:
    window = window_for(
        NOW, collected_through=None, trailing_days=3, backfill_start=date(2026, 10, 1), backfill_days=30
    )
    assert window.start == datetime(2026, 10, 1, tzinfo=UTC)
    assert window.end == TODAY + DAY


def test_first_poll_without_a_start_date_reads_the_backfill_days() -> None:
    window = window_for(NOW, collected_through=None, trailing_days=3, backfill_start=None, backfill_days=30)
    assert (window.start, window.end) == (TODAY - 30 * DAY, TODAY + DAY)


def test_later_polls_reread_the_trailing_window_plus_the_open_bucket() -> None:
    window = window_for(NOW, collected_through=TODAY + DAY, trailing_days=3, backfill_start=None, backfill_days=30)
    assert (window.start, window.end) == (TODAY - 3 * DAY, TODAY + DAY)


def test_after_an_outage_the_poll_resumes_where_the_last_one_stopped() -> None:
    stopped = TODAY - 9 * DAY  # the last poll's open bucket was the day before this
    window = window_for(NOW, collected_through=stopped, trailing_days=3, backfill_start=None, backfill_days=30)
    assert window.start == stopped - DAY


def test_a_poll_revision_is_later_than_the_last_one_unless_the_worker_would_refuse_that() -> None:
    assert revision_after(NOW, None) == NOW  # the first poll
    assert revision_after(NOW, NOW - DAY) == NOW  # the clock moved on
    # The clock is behind the last poll's (stepped back, or the previous replica's was ahead): just after it.
    assert revision_after(NOW, NOW + timedelta(hours=3)) == NOW + timedelta(hours=3, milliseconds=1)
    assert revision_after(NOW, NOW) == NOW + timedelta(milliseconds=1)
    # Beyond what the worker accepts (2 days ahead, quarantined, never a revision): the clock again, so that a
    # clock that was once far ahead does not make every later poll a quarantined one.
    assert revision_after(NOW, NOW + timedelta(days=2)) == NOW
    assert revision_after(NOW, NOW + timedelta(days=400)) == NOW


@pytest.mark.parametrize(
    ("header", "expected"),
    [("7", 7.0), ("0", 0.0), ("", None), (None, None), ("soon", None), ("Fri, 20 Nov 2026 15:30:09 GMT", 9.0)],
)
def test_retry_after_reads_seconds_and_http_dates(header: str | None, expected: float | None) -> None:
    assert retry_after_seconds(header, now=NOW.timestamp()) == expected


FAR_YEAR = "Mon, 01 Jan 99999999999 00:00:00 GMT"  # a date no clock can hold (OverflowError)


@pytest.mark.parametrize("header", ["\u00b2", "\u00b9\u00b2", FAR_YEAR, "Mon, 01 Jan 2026 99:00:00 GMT"])
def test_an_unreadable_retry_after_or_date_is_no_header_never_an_error(header: str) -> None:
    """A superscript digit passes ``str.isdigit`` but not ``float``; a year beyond any clock overflows. Either
    raised out of the client (ValueError, OverflowError: no collector error), ending the whole collector with an
    internal error on one response header of one provider (a 200's too: every response's headers are read)."""
    assert retry_after_seconds(header, now=NOW.timestamp()) is None
    assert retry_after_seconds(header) is None
    assert provider_clock(header) is None


def test_sealed_keys_open_only_with_their_kek_and_their_account(tmp_path: Path) -> None:
    kek_file = tmp_path / "kek"
    kek_file.write_text("ab" * 32)
    kek = keystore.load_kek(kek_file)
    sealed = keystore.seal(kek, "openai", "org-a", "sk-admin-secret")
    assert b"sk-admin-secret" not in sealed.ciphertext + sealed.wrapped_key
    assert keystore.unseal(kek, "openai", "org-a", sealed).reveal() == "sk-admin-secret"
    with pytest.raises(KeyStoreError, match="does not decrypt") as moved:
        keystore.unseal(kek, "openai", "org-b", sealed)  # a row copied onto another account
    with pytest.raises(KeyStoreError, match="another key-encryption key"):
        keystore.unseal(bytes(32), "openai", "org-a", sealed)
    assert "sk-admin-secret" not in str(moved.value)
    assert "sk-admin" not in repr(keystore.AdminKey("sk-admin-secret"))


def test_a_rewrapped_key_opens_with_the_new_kek_only_and_keeps_its_admin_key() -> None:
    old, new, other = bytes(range(32)), bytes(range(1, 33)), bytes(32)
    sealed = keystore.seal(old, "anthropic", "org-a", "sk-ant-admin-secret")
    # While the KEK rotates, a keyring with the retiring one as previous opens what it sealed.
    rotating = keystore.Keyring(new, previous=old)
    assert keystore.unseal(rotating, "anthropic", "org-a", sealed).reveal() == "sk-ant-admin-secret"
    again = keystore.rewrap(rotating, "anthropic", "org-a", sealed)
    assert again.kek_id == keystore.kek_id(new) != sealed.kek_id
    assert again.ciphertext == sealed.ciphertext  # the admin key is not touched, only its data key's wrapping
    assert keystore.unseal(new, "anthropic", "org-a", again).reveal() == "sk-ant-admin-secret"
    with pytest.raises(KeyStoreError, match="another key-encryption key"):
        keystore.unseal(old, "anthropic", "org-a", again)
    # Neither KEK of the keyring: named, not rewrapped; nor a row moved to another account.
    with pytest.raises(KeyStoreError, match="another key-encryption key"):
        keystore.rewrap(keystore.Keyring(new, previous=other), "anthropic", "org-a", sealed)
    with pytest.raises(KeyStoreError, match="does not decrypt"):
        keystore.rewrap(rotating, "anthropic", "org-b", sealed)


BAD_KEYS = [
    "sk-admin-first-line\nsk-admin-second-line",  # a secret file with a second line
    "sk-admin-abc def",
    "sk-admin-\u00e9\u2019abc",  # not ASCII: no HTTP header can carry it
    "sk-admin-" + "x" * 4096,
]


@pytest.mark.parametrize("key", BAD_KEYS, ids=["newline", "space", "non-ascii", "too-long"])
def test_a_key_that_is_not_one_token_is_refused_on_every_path(tmp_path: Path, key: str) -> None:
    secret = tmp_path / "key"
    secret.write_text(f"\n {key}\n", encoding="utf-8")
    with pytest.raises(KeyStoreError, match="not a single token") as from_file:
        keystore.read_secret_file(secret, "anthropic", "org-a")
    stdin_line = key.replace("\n", " ")  # standard input is read one line at a time
    with pytest.raises(ConfigError, match="not a single token") as from_stdin:
        admin.read_key(io.StringIO(stdin_line + "\n"))
    kek = bytes(range(32))
    legacy = keystore.seal(kek, "anthropic", "org-a", key)  # sealed before keys were checked
    with pytest.raises(KeyStoreError, match="not a single token") as from_store:
        keystore.unseal(kek, "anthropic", "org-a", legacy)
    for error in (from_file, from_stdin, from_store):
        assert key[:12] not in str(error.value)


def test_a_key_input_larger_than_the_limit_is_refused_without_reading_it_whole(tmp_path: Path) -> None:
    """README: a key file or standard input past the limit is refused, not read whole (`/dev/zero` named by
    mistake filled the memory: MemoryError, exit 1). A valid key padded past the limit is no key either."""
    limit = keystore.MAX_KEY_FILE_BYTES
    secret = tmp_path / "key"
    secret.write_bytes(b"sk-ant-admin01-abc_DEF-123" + b" " * limit)
    with pytest.raises(KeyStoreError, match=f"larger than {limit // 1024} KiB"):
        keystore.read_secret_file(secret, "anthropic", "org-a")
    stdin = io.StringIO("x" * (limit * 4))  # no line break: an endless stream looks like this
    with pytest.raises(ConfigError, match=f"more than {limit // 1024} KiB"):
        admin.read_key(stdin)
    assert stdin.tell() <= limit + 1
    exactly = "sk-admin-" + "x" * (4096 - len("sk-admin-"))
    assert admin.read_key(io.StringIO(exactly + "\n")) == exactly
    kek_file = tmp_path / "kek"
    kek_file.write_bytes(("cd" * 32).encode() + b"\n" * limit)
    with pytest.raises(KeyStoreError, match=f"larger than {limit // 1024} KiB"):
        keystore.load_kek(kek_file)


def test_a_key_file_may_end_with_a_newline(tmp_path: Path) -> None:
    secret = tmp_path / "key"
    secret.write_text("  sk-ant-admin01-abc_DEF-123\n\n")
    assert keystore.read_secret_file(secret, "anthropic", "org-a").reveal() == "sk-ant-admin01-abc_DEF-123"


@pytest.mark.parametrize(
    "content", [b"x" * 32, ("cd" * 32).encode(), b"q83vEjRWeJCrze8SNFZ4kKvN7xI0VniQq83vEjRWeJA=\n"]
)
def test_kek_files_raw_hex_or_base64(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "kek").write_bytes(content)
    assert len(keystore.load_kek(tmp_path / "kek")) == 32


def test_a_short_kek_is_refused(tmp_path: Path) -> None:
    (tmp_path / "kek").write_text("too short")
    with pytest.raises(KeyStoreError, match="32 bytes"):
        keystore.load_kek(tmp_path / "kek")


def test_numbers_pass_through_with_every_digit() -> None:
    raw = b'{"value": 0.000123456789012345678901, "n": 12, "s": "x\\"y", "z": null, "b": true, "e": 1E-7}'
    text = dump_exact(jiter.from_json(raw, float_mode="decimal"))
    parsed = json.loads(text, parse_float=Decimal)
    assert parsed["value"] == Decimal("0.000123456789012345678901")
    assert parsed["e"] == Decimal("1E-7")
    assert parsed["s"] == 'x"y'


def test_envelopes_follow_the_contract_and_openai_usage_names_its_endpoint() -> None:
    bucket = {
        "object": "bucket",
        "start_time": int(TODAY.timestamp()),
        "end_time": int((TODAY + DAY).timestamp()),
        "results": [],
    }
    for endpoint in OPENAI_ENDPOINTS:
        key, value = envelope(endpoint, "org-a", bucket, NOW, max_bytes=1_000_000)
        assert key == b"org-a"
        message = ProviderEnvelope.model_validate_json(value)
        assert (message.provider, message.api_version, message.collected_at) == ("openai", endpoint.api_version, NOW)
        body = json.loads(value)
        assert body.get("endpoint") == endpoint.usage_endpoint
        if endpoint.report.startswith("openai.usage."):
            assert body["endpoint"] == endpoint.report.removeprefix("openai.usage.")


def test_a_bucket_too_large_for_one_message_is_refused_not_split() -> None:
    bucket = {
        "starting_at": "2026-11-20T00:00:00Z",
        "ending_at": "2026-11-21T00:00:00Z",
        "results": [{"a": "b" * 2000}],
    }
    with pytest.raises(ProviderRejected, match="never split"):
        envelope(ANTHROPIC_ENDPOINTS[0], "org-a", bucket, NOW, max_bytes=1024)


def test_every_endpoint_groups_by_project_and_the_price_dimensions() -> None:
    reports = {e.report: e.group_by for e in OPENAI_ENDPOINTS + ANTHROPIC_ENDPOINTS}
    assert reports["openai.costs"] == ("project_id", "line_item")
    assert reports["openai.usage.completions"] == ("project_id", "model", "batch", "service_tier")
    assert reports["openai.usage.images"] == ("project_id", "model", "size", "source")
    assert reports["openai.usage.web_search_calls"] == ("project_id", "model", "context_level")
    assert reports["openai.usage.file_search_calls"] == ("project_id", "vector_store_id")
    assert reports["anthropic.cost_report"] == ("workspace_id", "description")
    assert set(reports["anthropic.usage_report.messages"]) >= {
        "workspace_id",
        "model",
        "service_tier",
        "context_window",
    }
    assert {r.removeprefix("openai.usage.") for r in reports if r.startswith("openai.usage.")} == {
        "completions",
        "embeddings",
        "moderations",
        "images",
        "audio_speeches",
        "audio_transcriptions",
        "vector_stores",
        "code_interpreter_sessions",
        "file_search_calls",
        "web_search_calls",
    }
    assert set(ENDPOINTS) == {"openai", "anthropic"}


def test_request_parameters_per_provider() -> None:
    openai_params = OPENAI_ENDPOINTS[0].params(TODAY - DAY, TODAY + DAY, "cursor")
    assert ("start_time", str(int((TODAY - DAY).timestamp()))) in openai_params
    assert ("bucket_width", "1d") in openai_params
    assert ("group_by", "line_item") in openai_params
    assert ("page", "cursor") in openai_params
    assert "end_time" not in dict(openai_params)  # in the future (the next midnight) it is refused: up to now
    anthropic_params = ANTHROPIC_ENDPOINTS[0].params(TODAY - DAY, TODAY + DAY, None)
    assert ("starting_at", "2026-11-19T00:00:00Z") in anthropic_params
    assert ("group_by[]", "workspace_id") in anthropic_params
    assert "ending_at" not in dict(anthropic_params)  # up to now: the open bucket included
    assert all(name != "page" for name, _ in anthropic_params)
    assert headers("anthropic", "k")["anthropic-version"] == "2023-06-01"


def test_anthropic_usage_is_grouped_by_speed_with_the_beta_header_it_requires() -> None:
    """Fast mode bills at its own rates: ungrouped, its tokens would be estimated at standard prices. The
    messages usage page documents that grouping by ``speed`` requires the ``fast-mode-2026-02-01`` beta."""
    cost_report, messages = ANTHROPIC_ENDPOINTS
    assert ("group_by[]", "speed") in messages.params(TODAY - DAY, TODAY + DAY, None)
    auth = headers("anthropic", "k")
    assert messages.headers(auth) == {**auth, "anthropic-beta": "fast-mode-2026-02-01"}
    assert cost_report.headers(auth) == auth  # no beta where no grouping needs one
    assert all(endpoint.headers({"a": "b"}) == {"a": "b"} for endpoint in OPENAI_ENDPOINTS)


def test_check_config_redacts_credentials_in_the_collector_base_urls() -> None:
    from worker.config import Settings  # noqa: PLC0415

    settings = Settings(collect_openai_base_url="https://user:hunter2@egress.example:8443")
    assert settings.redacted()["COST_WORKER_COLLECT_OPENAI_BASE_URL"] == "https://user:***@egress.example:8443"
    assert "hunter2" in settings.secrets()  # so the log redactor masks it too
    assert "hunter2" not in repr(settings.redacted())


def test_check_config_reports_bad_collector_settings_together(tmp_path: Path) -> None:
    from worker.config import Settings  # noqa: PLC0415

    problems = Settings(
        collect_anthropic_base_url="ftp://x", collect_key_encryption_key_file=tmp_path / "missing"
    ).problems()
    assert any("COLLECT_ANTHROPIC_BASE_URL" in p for p in problems)
    assert any("COLLECT_KEY_ENCRYPTION_KEY_FILE" in p for p in problems)
    backwards = Settings(collect_retry_initial_backoff=10, collect_retry_max_backoff=5).problems()
    assert any("COLLECT_RETRY_INITIAL_BACKOFF: larger than" in p for p in backwards)


class _ScriptedClient(ProviderClient):
    """Pages in order, as a provider would send them (no HTTP)."""

    def __init__(self, pages: list[dict[str, Any]]) -> None:
        self.pages = pages
        self.cursors: list[str | None] = []

    async def get_page(
        self, base_url: str, endpoint: Endpoint, account: str, headers: dict[str, str], params: list[tuple[str, str]]
    ) -> dict[str, Any]:
        self.cursors.append(dict(params).get("page"))
        # Asked again after its last page (the window's newest bucket ended before today's): nothing more.
        return self.pages.pop(0) if self.pages else {"object": "page", "data": [], "has_more": False}


def _bucket(day: datetime, *results: str) -> dict[str, Any]:
    start = int(day.timestamp())
    return {
        "object": "bucket",
        "start_time": start,
        "end_time": start + 86_400,
        # One result per group (costs are grouped by project and line item), as a grouped report has.
        "results": [{"id": r, "project_id": "proj", "line_item": r} for r in results],
    }


async def test_a_bucket_continued_on_the_next_page_is_merged_into_one() -> None:
    client = _ScriptedClient(
        [
            {"object": "page", "data": [_bucket(TODAY - DAY, "a")], "has_more": True, "next_page": "c1"},
            {"object": "page", "data": [_bucket(TODAY - DAY, "b"), _bucket(TODAY, "c")], "has_more": False},
        ]
    )
    window = window_for(NOW, collected_through=None, trailing_days=1, backfill_start=None, backfill_days=1)
    got = await read_window(client, OPENAI_ENDPOINTS[0], window, base_url="http://x", account="org", headers={})
    assert got.pages == 2
    assert client.cursors == [None, "c1"]
    assert [[r["id"] for r in b["results"]] for b in got.buckets] == [["a", "b"], ["c"]]


async def test_a_cursor_that_repeats_or_is_missing_fails_the_window() -> None:
    page = {"object": "page", "data": [], "has_more": True, "next_page": "same"}
    window = window_for(NOW, collected_through=None, trailing_days=1, backfill_start=None, backfill_days=1)
    for pages in ([page, dict(page)], [{**page, "next_page": None}]):
        with pytest.raises(ProviderRejected, match="next_page"):
            await read_window(
                _ScriptedClient(pages), OPENAI_ENDPOINTS[0], window, base_url="http://x", account="org", headers={}
            )


async def test_a_bucket_served_again_on_the_next_page_is_taken_once_and_a_changed_one_fails() -> None:
    """A cursor that points at the last bucket served, not past it, serves that bucket again whole on the next
    page (and may add the results the first page left out). Appended again, each of its lines was in the message
    twice and the worker summed them: the day counted double. A repeated group with other figures is refused."""
    again = [
        {"object": "page", "data": [_bucket(TODAY - DAY, "a", "b")], "has_more": True, "next_page": "c1"},
        {"object": "page", "data": [_bucket(TODAY - DAY, "a", "b", "c"), _bucket(TODAY, "d")], "has_more": False},
    ]
    window = window_for(NOW, collected_through=None, trailing_days=1, backfill_start=None, backfill_days=1)
    got = await read_window(
        _ScriptedClient(again), OPENAI_ENDPOINTS[0], window, base_url="http://x", account="org", headers={}
    )
    assert [[r["id"] for r in b["results"]] for b in got.buckets] == [["a", "b", "c"], ["d"]]
    assert got.repeated == 2

    changed = _bucket(TODAY - DAY, "a")
    changed["results"][0]["amount"] = "2"  # group (proj, a) again, with another figure
    pages = [
        {"object": "page", "data": [_bucket(TODAY - DAY, "a")], "has_more": True, "next_page": "c1"},
        {"object": "page", "data": [changed], "has_more": False},
    ]
    with pytest.raises(ProviderRejected, match="other figures"):
        await read_window(
            _ScriptedClient(pages), OPENAI_ENDPOINTS[0], window, base_url="http://x", account="o", headers={}
        )


async def test_empty_pages_that_say_has_more_end_the_window_after_a_few() -> None:
    """An empty page with has_more and a fresh cursor brings nothing; a provider bug answering that for ever made
    10 000 requests for one window of one endpoint (hours, with Retry-After waits, while every other account of
    the round waited). A few in a row are followed (then the data came), more fail the window."""
    window = window_for(NOW, collected_through=None, trailing_days=1, backfill_start=None, backfill_days=1)
    endless = [{"object": "page", "data": [], "has_more": True, "next_page": f"c{n}"} for n in range(10_000)]
    client = _ScriptedClient(endless)
    with pytest.raises(ProviderRejected, match="empty pages"):
        await read_window(client, OPENAI_ENDPOINTS[0], window, base_url="http://x", account="o", headers={})
    assert len(client.cursors) == MAX_EMPTY_PAGES + 1

    late = [*endless[:MAX_EMPTY_PAGES], {"object": "page", "data": [_bucket(TODAY, "a")], "has_more": False}]
    got = await read_window(
        _ScriptedClient(late), OPENAI_ENDPOINTS[0], window, base_url="http://x", account="o", headers={}
    )
    assert [[r["id"] for r in b["results"]] for b in got.buckets] == [["a"]]


@hypothesis_settings(max_examples=150, deadline=None)
@given(
    days=st.lists(st.lists(st.integers(0, 999), max_size=6, unique=True), min_size=0, max_size=8),
    cuts=st.lists(st.integers(0, 60), max_size=10),
    overlaps=st.lists(st.integers(0, 4), max_size=10),
)
def test_any_split_of_buckets_over_pages_gives_each_bucket_whole_once(
    days: list[list[int]], cuts: list[int], overlaps: list[int]
) -> None:
    """A provider may cut its pages anywhere, even inside a bucket's results, and may start a page with results
    the page before already served (a cursor pointing at the last result served, not past it): the window still
    has each bucket once, with each of its results once, in order (a bucket is never split across messages). (A
    grouped bucket has one result per group: a result served twice is a repeat.)"""
    truth = [_bucket(TODAY - (len(days) - i) * DAY, *(str(r) for r in results)) for i, results in enumerate(days)]
    flat = [(b, r) for b in truth for r in b["results"]] or []
    positions = sorted({min(c, len(flat)) for c in cuts} | {0, len(flat)})
    pages: list[dict[str, Any]] = []
    for n, (lo, hi) in enumerate(itertools.pairwise(positions)):
        chunk: list[dict[str, Any]] = []
        again = overlaps[n] if n < len(overlaps) else 0
        for bucket, result in flat[max(0, lo - again) : hi]:
            if chunk and chunk[-1]["start_time"] == bucket["start_time"]:
                chunk[-1]["results"].append(result)
            else:
                chunk.append({**bucket, "results": [result]})
        pages.append({"object": "page", "data": chunk, "has_more": True, "next_page": f"c{n}"})
    empty = [b for b in truth if not b["results"]]  # buckets without results come on the last page
    pages.append({"object": "page", "data": [{**b, "results": []} for b in empty], "has_more": False})
    window = window_for(NOW, collected_through=None, trailing_days=1, backfill_start=None, backfill_days=10)
    got = asyncio.run(
        read_window(_ScriptedClient(pages), OPENAI_ENDPOINTS[0], window, base_url="http://x", account="o", headers={})
    )
    by_start = {b["start_time"]: b["results"] for b in got.buckets}
    assert len(by_start) == len(got.buckets)  # each bucket once
    assert by_start == {b["start_time"]: b["results"] for b in truth}


class _TruncatingProvider(ProviderClient):
    """A provider of one bucket per day up to today: from the request's start, ``covers`` days at most when set
    (a report asked without an end that stops 31 days on), ``size`` buckets a page, each page starting ``overlap``
    buckets before where the last one stopped (an inclusive cursor)."""

    def __init__(self, first: datetime, covers: int | None, size: int, overlap: int) -> None:
        self.days = [first + n * DAY for n in range((TODAY - first) // DAY + 1)]
        self.covers, self.size, self.overlap = covers, size, overlap

    async def get_page(
        self, base_url: str, endpoint: Endpoint, account: str, headers: dict[str, str], params: list[tuple[str, str]]
    ) -> dict[str, Any]:
        query = dict(params)
        assert "end_time" not in query
        start = datetime.fromtimestamp(int(query["start_time"]), tz=UTC)
        end = start + self.covers * DAY if self.covers is not None else TODAY + DAY
        chosen = [day for day in self.days if start <= day < end]
        offset = int(query.get("page", "0"))
        page = chosen[offset : offset + self.size]
        more = offset + self.size < len(chosen)
        return {
            "object": "page",
            "data": [_bucket(day, f"r{int(day.timestamp())}") for day in page],
            "has_more": more,
            "next_page": str(offset + self.size - self.overlap) if more else None,
        }


@hypothesis_settings(max_examples=100, deadline=None)
@given(
    days=st.integers(0, 120),
    covers=st.sampled_from([None, 7, 31, 40]),
    size=st.integers(1, 40),
    overlap=st.integers(0, 3),
)
def test_any_window_length_truncation_and_page_cut_gives_every_day_once(
    days: int, covers: int | None, size: int, overlap: int
) -> None:
    """Whatever the window's length (a first poll, an outage of months), however far a report asked without an
    end reaches (31 days or more, or up to now) and however it cuts and repeats its pages, every day of the
    window arrives, each once with its result once."""
    first = TODAY - days * DAY
    provider = _TruncatingProvider(first, covers, size, min(overlap, size - 1))
    window = window_for(NOW, collected_through=None, trailing_days=3, backfill_start=first.date(), backfill_days=30)
    got = asyncio.run(read_window(provider, OPENAI_ENDPOINTS[0], window, base_url="http://x", account="o", headers={}))
    assert sorted(b["start_time"] for b in got.buckets) == [int(day.timestamp()) for day in provider.days]
    assert all(len(b["results"]) == 1 for b in got.buckets)


# --- the HTTP boundary: every aiohttp error comes out typed, redirects are not followed ----------------------


async def _raw_server(answer: bytes) -> tuple[asyncio.AbstractServer, str, list[bytes]]:
    """A server that answers every request with ``answer``, byte for byte (e.g. not valid HTTP)."""
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", seen


async def _no_wait(_seconds: float) -> None:
    return None


async def _get(client: ProviderClient, base_url: str, endpoint: Endpoint, key: str) -> dict[str, Any]:
    return await client.get_page(
        base_url, endpoint, "org-1", headers(endpoint.provider, key), endpoint.params(TODAY - DAY, TODAY + DAY, None)
    )


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: not-a-number\r\n\r\n{}",
        b"HTTP/1.1 two hundred OK\r\nContent-Length: 2\r\n\r\n{}",
    ],
)
async def test_a_response_that_is_not_valid_http_is_retried_as_unavailable(answer: bytes) -> None:
    server, url, seen = await _raw_server(answer)
    try:
        async with aiohttp.ClientSession() as session:
            client = ProviderClient(session, max_attempts=3, max_retry_after=5.0, sleep=_no_wait)
            with pytest.raises(ProviderUnavailable, match="not valid HTTP"):
                await _get(client, url, OPENAI_ENDPOINTS[0], "sk-admin-x")
    finally:
        server.close()
        await server.wait_closed()
    assert len(seen) == 3  # retried like a 5xx


async def test_a_page_that_repeats_a_key_is_rejected_not_guessed() -> None:
    """Two amounts for one result: which one the provider meant is not ours to guess (the worker quarantines
    such a message; the collector must not hide the repetition by re-serialising the page). The message
    names the position, never the body's text."""
    body = (
        b'{"object":"page","has_more":false,"next_page":null,"data":[{"object":"bucket","start_time":1,'
        b'"end_time":2,"results":[{"amount":{"value":1.5,"value":150,"currency":"usd"},"secret-ish":1}]}]}'
    )
    answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )
    server, url, seen = await _raw_server(answer)
    try:
        async with aiohttp.ClientSession() as session:
            client = ProviderClient(session, max_attempts=3, max_retry_after=5.0, sleep=_no_wait)
            with pytest.raises(ProviderRejected, match=r"repeats a key in one object \(line 1 column \d+\)") as info:
                await _get(client, url, OPENAI_ENDPOINTS[0], "sk-admin-x")
    finally:
        server.close()
        await server.wait_closed()
    assert "value" not in str(info.value)
    assert len(seen) == 1  # refused, not retried


@pytest.mark.parametrize("base_url", ["ftp://127.0.0.1:1", "http://[::1"])
async def test_an_invalid_base_url_is_rejected_without_retrying(base_url: str) -> None:
    waits: list[float] = []

    async def record(seconds: float) -> None:
        waits.append(seconds)

    async with aiohttp.ClientSession() as session:
        client = ProviderClient(session, max_attempts=3, max_retry_after=5.0, sleep=record)
        with pytest.raises(ProviderRejected, match="not a valid URL") as refused:
            await _get(client, base_url, OPENAI_ENDPOINTS[0], "sk-admin-x")
    assert waits == []
    assert base_url not in str(refused.value)


@pytest.mark.parametrize("endpoint", [OPENAI_ENDPOINTS[0], ANTHROPIC_ENDPOINTS[0]], ids=lambda e: e.provider)
@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_a_redirect_is_rejected_and_the_admin_key_never_reaches_the_other_host(
    endpoint: Endpoint, status: int
) -> None:
    other, other_url, reached = await _raw_server(
        b"HTTP/1.1 200 OK\r\nContent-Length: 27\r\n\r\n" + b'{"data": [], "has_more": 0}'
    )

    async def redirect(request: web.Request) -> web.Response:
        return web.Response(status=status, headers={"Location": f"{other_url}/collect"})

    app = web.Application()
    app.router.add_get("/{tail:.*}", redirect)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    key = "sk-admin-SECRET-0123456789"
    try:
        async with aiohttp.ClientSession() as session:
            client = ProviderClient(session, max_attempts=3, max_retry_after=5.0, sleep=_no_wait)
            with pytest.raises(ProviderRejected, match=f"HTTP {status}, a redirect") as refused:
                await _get(client, f"http://127.0.0.1:{port}", endpoint, key)
    finally:
        await runner.cleanup()
        other.close()
        await other.wait_closed()
    assert reached == []
    assert key not in str(refused.value)
    assert other_url not in str(refused.value)


@pytest.mark.parametrize("key", [BAD_KEYS[0], BAD_KEYS[2], "sk-admin-\x00"], ids=["newline", "non-ascii", "nul"])
async def test_a_header_http_cannot_carry_is_rejected_before_anything_is_sent(key: str) -> None:
    server, url, seen = await _raw_server(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n")
    try:
        async with aiohttp.ClientSession() as session:
            client = ProviderClient(session, max_attempts=3, max_retry_after=5.0, sleep=_no_wait)
            for endpoint in (OPENAI_ENDPOINTS[0], ANTHROPIC_ENDPOINTS[0]):
                with pytest.raises(ProviderRejected, match="HTTP cannot carry") as refused:
                    await _get(client, url, endpoint, key)
                assert key[:12] not in str(refused.value)
    finally:
        server.close()
        await server.wait_closed()
    assert seen == []


async def test_the_collector_rides_out_a_provider_outage_of_half_a_minute_with_its_defaults() -> None:
    """The production retry budget for a 5xx, timeout or unreachable provider: 1, 2, 4, 8, 16 s (plus up to 1 s
    of jitter each) between the 6 attempts, not the database batch's 0.1 s start (which gave up after ~3 s)."""
    from worker.config import Settings  # noqa: PLC0415

    settings = Settings(retry_initial_backoff=0.1, retry_max_backoff=30.0)  # the batch retry: not used here
    server, url, seen = await _raw_server(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
    waits: list[float] = []

    async def record(seconds: float) -> None:
        waits.append(seconds)

    try:
        async with aiohttp.ClientSession() as session:
            client = ProviderClient.from_settings(session, settings, sleep=record)
            with pytest.raises(ProviderUnavailable, match="HTTP 503"):
                await _get(client, url, OPENAI_ENDPOINTS[0], "sk-admin-x")
    finally:
        server.close()
        await server.wait_closed()
    assert len(seen) == settings.collect_max_attempts == 6
    assert [int(w) for w in waits] == [1, 2, 4, 8, 16]
    assert 31 <= sum(waits) < 36
    tuned = Settings(collect_retry_initial_backoff=0.5, collect_retry_max_backoff=1.5)
    async with aiohttp.ClientSession() as session:
        client = ProviderClient.from_settings(session, tuned)
        assert (client.backoff_initial, client.backoff_max) == (0.5, 1.5)


async def test_delivery_retries_a_lost_database_and_readiness_fails_while_it_lasts() -> None:
    """The publisher's connection cannot be reopened for a while: delivery retries with backoff (it neither
    gives up nor re-polls), /readyz says so after ready_max_retrying, and is ready again once it went out."""
    from worker.collect.runner import Collector  # noqa: PLC0415
    from worker.collect.store import OutboxConnection  # noqa: PLC0415
    from worker.config import Settings  # noqa: PLC0415
    from worker.errors import DatabaseUnavailable  # noqa: PLC0415

    opened: list[int] = []

    async def refused() -> Any:
        opened.append(1)
        raise ConnectionRefusedError("connection refused")

    outbox = OutboxConnection(refused)
    with pytest.raises(DatabaseUnavailable):  # typed at the PostgreSQL boundary, never the driver's error
        await outbox.connect()

    collector = Collector(Settings(retry_initial_backoff=0.01, retry_max_backoff=0.02, ready_max_retrying=0.03))
    collector.health.database_ok = collector.health.active = True
    seen: list[tuple[bool, str]] = []

    class Publisher:
        async def drain(self) -> None:
            seen.append(collector.health.readiness())
            if len(seen) < 6:
                await outbox.connect()

    await collector._deliver(Publisher())  # type: ignore[arg-type]
    assert len(opened) == 6
    assert seen[0] == (True, "ok: active poller")
    assert any(not ready and "publishing staged buckets has failed" in why for ready, why in seen)
    assert collector.health.readiness() == (True, "ok: active poller")


@pytest.mark.parametrize(
    ("value", "reason"),
    [("-0.0", "invalid_number"), ("1e400", "invalid_number")],
)
def test_a_bucket_the_worker_would_quarantine_is_refused_so_its_window_waits(value: str, reason: str) -> None:
    """Published, the worker would quarantine the whole bucket for good (a 12.50 line beside a negative zero
    with it) while the collector's state moved on: once the day left the trailing re-read, never collected."""
    start, end = int(TODAY.timestamp()), int((TODAY + DAY).timestamp())
    page = (
        f'{{"object": "bucket", "start_time": {start}, "end_time": {end}, "results": ['
        f'{{"object": "organization.costs.result", "amount": {{"value": {value}, "currency": "usd"}}, '
        '"line_item": "Input tokens", "project_id": "proj_a"}, '
        '{"object": "organization.costs.result", "amount": {"value": 12.50, "currency": "usd"}, '
        '"line_item": "Output tokens", "project_id": "proj_a"}]}'
    )
    bucket = jiter.from_json(page.encode(), float_mode="decimal", allow_inf_nan=True)
    with pytest.raises(ProviderRejected, match=rf"worker would quarantine a bucket \({reason}: .*this window waits"):
        envelope(OPENAI_ENDPOINTS[0], "org-a", bucket, NOW, max_bytes=1_000_000)
    good = jiter.from_json(page.replace(value, "0", 1).encode(), float_mode="decimal")
    assert envelope(OPENAI_ENDPOINTS[0], "org-a", good, NOW, max_bytes=1_000_000)[0] == b"org-a"
