"""Fast unit tests of retry policy, outcome classification and the engine's control flow.

aioresponses stands in for the network here; the integration tests use real TLS servers.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Optional

import aiohttp
import pytest
from mocks import aioresponses

from prestaged.config import BreakerConfig, load_config
from prestaged.errors import PrestagedError
from prestaged.model import (
    ERROR_TEXT_MAX,
    Attempt,
    Failure,
    FileRef,
    Result,
    classify_status,
    error_text,
    redact,
    scrub,
)
from prestaged.net import parse_retry_after
from prestaged.retry import RetryPolicy, retry_reason
from prestaged.storage.http import HttpToucher
from prestaged.warm import PLAIN_HTTP_REFUSED, WarmSettings, touch_url, warm

URL = "https://door.example:2880/pnfs/f1"


async def _refs(urls: Iterable[str]) -> AsyncIterator[FileRef]:
    for u in urls:
        yield FileRef(name=u.rsplit("/", 1)[-1], url=u)


class _Sleeps:
    """Records requested backoff delays instead of sleeping."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


def _settings(**kw: object) -> WarmSettings:
    policy = RetryPolicy(attempts=5, initial=0.0, max=0.0, jitter=0.0, total=60.0)
    base: dict[str, object] = {"concurrency": 4, "retry": policy}
    base.update(kw)
    return WarmSettings(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("status", "result"),
    [(206, Result.WARM), (200, Result.WARM), (416, Result.EMPTY), (404, Result.MISSING),
     (410, Result.MISSING), (401, Result.DENIED), (403, Result.DENIED), (400, Result.FAILED),
     (503, None), (500, None), (429, None), (408, None)],
)
def test_classify_status(status: int, result: Result | None) -> None:
    """Each HTTP status maps to its outcome class; None marks retryable statuses."""
    assert classify_status(status) == result


def test_parse_retry_after() -> None:
    """Retry-After is read as seconds or as an HTTP date; garbage is ignored."""
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    # Digits of other scripts pass str.isdigit() and then float() raised: a traceback from
    # every Tape REST and catalog 429, and door 503s failed as "bad URL".
    for digits in ("\u00b2", "\u0663", "1\u00b2"):
        assert parse_retry_after(digits) is None


def test_backoff_is_exponential_capped_and_jittered() -> None:
    """Backoff doubles from initial, is capped at max, and jitter adds up to the given fraction."""
    p = RetryPolicy(initial=0.5, max=4.0, jitter=0.5)
    assert [p.backoff(k, rand=lambda: 0.0) for k in range(1, 6)] == [0.5, 1.0, 2.0, 4.0, 4.0]
    assert p.backoff(1, rand=lambda: 1.0) == 0.75


def test_next_delay_bounds() -> None:
    """Final answers, spent attempts, spent time and too-long Retry-After stop retrying."""
    p = RetryPolicy(attempts=3, initial=1.0, max=10.0, jitter=0.0, total=5.0, max_retry_after=60)
    busy = Attempt(status=503)
    assert p.next_delay(busy, tries=1, elapsed=0) == 1.0
    assert p.next_delay(busy, tries=3, elapsed=0) is None  # attempts spent
    assert p.next_delay(busy, tries=2, elapsed=4.5) is None  # time budget spent
    assert p.next_delay(Attempt(status=404), tries=1, elapsed=0) is None
    assert p.next_delay(Attempt(status=503, retry_after=3), tries=1, elapsed=0) == 3
    assert p.next_delay(Attempt(status=503, retry_after=120), tries=1, elapsed=0) is None
    # dCache's rate limiter says 0 in the last second of a block: a second, not a burst.
    assert p.next_delay(Attempt(status=429, retry_after=0), tries=1, elapsed=0) == 1.0
    assert p.next_delay(Attempt(failure=Failure.TLS), tries=1, elapsed=0) is None
    assert retry_reason(Attempt(failure=Failure.RESET)) == "reset"


async def test_retries_503_then_warm_with_retry_after() -> None:
    """503, 503 (Retry-After: 2), 206 ends warm after 3 attempts; Retry-After sets the delay."""
    sleeps = _Sleeps()
    with aioresponses() as m:
        m.get(URL, status=503)
        m.get(URL, status=503, headers={"Retry-After": "2"})
        m.get(URL, status=206, body=b"abcd", headers={"Content-Range": "bytes 0-3/100"})
        async with HttpToucher(None) as t:
            report = await warm(_refs([URL]), _settings(), t, sleep=sleeps)
    assert report.tally.results["warm"] == 1
    assert report.tally.retries["503"] == 2
    assert sleeps.delays == [0.0, 2.0]
    assert report.exit_code == 0


async def test_reset_and_timeout_are_retried() -> None:
    """A dropped connection and a timeout are retried; the file still ends warm."""
    with aioresponses() as m:
        m.get(URL, exception=aiohttp.ServerDisconnectedError())
        m.get(URL, exception=asyncio.TimeoutError())  # what aiohttp raises, on 3.9 too
        m.get(URL, status=206, body=b"abcd")
        async with HttpToucher(None) as t:
            report = await warm(_refs([URL]), _settings(), t, sleep=_Sleeps())
    assert report.tally.results["warm"] == 1
    assert dict(report.tally.retries) == {"reset": 1, "timeout": 1}


async def test_final_statuses_are_not_retried() -> None:
    """404 and 416 are final after one attempt; the run exits 1 for the missing file."""
    urls = ["https://d/a", "https://d/b"]
    with aioresponses() as m:
        m.get(urls[0], status=404)
        m.get(urls[1], status=416)
        async with HttpToucher(None) as t:
            report = await warm(_refs(urls), _settings(), t, sleep=_Sleeps())
    assert report.tally.results["missing"] == 1 and report.tally.results["empty"] == 1
    assert not report.tally.retries
    assert [o.attempts for o in report.tally.failures] == [1]
    assert report.exit_code == 1


async def test_exhausted_retries_fail_and_everything_failed_exits_5() -> None:
    """A file that stays 503 fails after `attempts` tries; nothing warm at all means exit 5."""
    with aioresponses() as m:
        m.get(URL, status=503, repeat=True)
        async with HttpToucher(None) as t:
            report = await warm(_refs([URL]), _settings(), t, sleep=_Sleeps())
    [failed] = report.tally.failures
    assert failed.result is Result.FAILED and failed.attempts == 5 and failed.status == 503
    assert report.exit_code == 5


async def test_denials_trip_breaker_early() -> None:
    """Consecutive 403s from one endpoint stop the run with exit 3 long before the end."""
    urls = [f"https://d/f{i}" for i in range(200)]
    with aioresponses() as m:
        m.get(re.compile(r"https://d/.*"), status=403, repeat=True)
        async with HttpToucher(None) as t:
            report = await warm(_refs(urls), _settings(breaker=BreakerConfig(denials=5),
                                concurrency=2), t, sleep=_Sleeps())
    assert report.exit_code == 3
    assert "denied 5 files in a row" in str(report.aborted)
    assert report.tally.done < 10


class _ByName:
    """A toucher answering each file with the status its name ends in (``f3-503``: 503)."""

    async def touch(self, url: str) -> Attempt:
        status = int(url.rsplit("-", 1)[1])
        return Attempt(status=status, error=f"HTTP {status}")


async def test_back_pressure_leaves_the_denial_count_alone() -> None:
    """503s between denials neither reset nor add to the count: three 403s in a row with 503s
    between them trip a limit of 3 (before, every 503 reset the count to zero)."""
    names = ["a-403", "b-503", "c-403", "d-503", "e-403", "f-206", "g-206"]
    report = await warm(_refs(f"https://door:2880/{n}" for n in names),
                        _settings(concurrency=1, breaker=BreakerConfig(denials=3)), _ByName(),
                        sleep=_Sleeps())
    assert report.exit_code == 3
    assert str(report.aborted).startswith("https://door:2880 denied 3 files in a row (HTTP 403")
    assert report.tally.results["warm"] == 0


async def test_a_429_after_repeated_denials_is_the_storage_blocking_us() -> None:
    """dCache blocks a client at its 3rd 401, each within 20 s of the one before (429
    meanwhile): three 401s then a 429 stop the run with exit 3 at once, whatever the denial
    limit; a 429 after fewer is plain back-pressure."""
    names = ["a-401", "b-429", "c-401", "d-401", "e-429", "f-206"]
    report = await warm(_refs(f"https://door:2880/{n}" for n in names),
                        _settings(concurrency=1, breaker=BreakerConfig(denials=20),
                                  retry=RetryPolicy(attempts=1)), _ByName(), sleep=_Sleeps())
    assert report.exit_code == 3
    assert "answered 401 3 times, each within 20 s of the one before (HTTP 401" in str(
        report.aborted)
    assert "now answers 429" in str(report.aborted)
    assert report.tally.results["warm"] == 0


def test_a_429_counts_as_the_block_only_after_3_401s_each_within_20_s_of_the_last() -> None:
    """As dCache's RateLimitedHandlerList counts: 401s at 0, 30 and 35 s then a 429 at 36 s:
    the one at 0 was forgotten after 20 s, so the 429 is back-pressure; a 401 at 40 s is the
    third in the chain (answers between 401s do not reset it), and a 429 at 41 s is the block
    (exit 3). 403s never count; nor do 401s the endpoint answered something after."""
    from prestaged.warm import _Breakers

    def run(steps: list[tuple[float, int]]) -> Optional[PrestagedError]:
        breakers = _Breakers(BreakerConfig(denials=20), "")
        now = [0.0]
        breakers.clock = lambda: now[0]
        for when, status in steps[:-1]:
            now[0] = when
            assert breakers.observe("e", Attempt(status=status)) is None, when
        now[0] = steps[-1][0]
        return breakers.observe("e", Attempt(status=steps[-1][1]))

    assert run([(0, 401), (30, 401), (35, 401), (36, 429)]) is None
    error = run([(0, 401), (30, 401), (35, 401), (36, 429), (38, 206), (40, 401), (41, 429)])
    assert error is not None and "answered 401 3 times" in str(error)
    assert run([(0, 401), (1, 206), (2, 401), (3, 206), (4, 401), (5, 429)]) is not None
    assert run([(0, 403), (1, 403), (2, 403), (3, 429)]) is None  # dCache counts 401s only
    assert run([(0, 401), (1, 401), (2, 401), (3, 206), (4, 429)]) is None  # it did not block
    assert run([(0, 401), (1, 401), (2, 401), (23, 429)]) is None  # too long after


class _BrokenBodies:
    """A toucher whose every answer is a 206 head whose body then broke off (a pool dying
    mid-read, XRootD cutting a short file), or a close before any answer (``silent``)."""

    def __init__(self, *, silent: bool) -> None:
        self.silent = silent

    async def touch(self, url: str) -> Attempt:
        if self.silent:
            return Attempt(failure=Failure.RESET, error="closed")
        return Attempt(status=206, failure=Failure.RESET,
                       error="HTTP 206, then the body broke off: received 0 of 4 bytes")


async def test_a_body_that_breaks_off_after_its_head_is_not_a_refused_connection() -> None:
    """A server that sent its head, then broke the body, did answer: each such file fails on
    its own after its retries (exit 5), and the run goes through the list. It was counted as
    a connection closed without an answer, and five of them stopped the run with exit 3,
    blaming the proxy. A close before any answer still trips that breaker."""
    urls = [f"https://pool:2880/f{i}" for i in range(20)]
    settings = _settings(concurrency=2, retry=RetryPolicy(attempts=2))
    broken = await warm(_refs(urls), settings, _BrokenBodies(silent=False), sleep=_Sleeps())
    assert broken.aborted is None and broken.exit_code == 5
    assert broken.tally.results["failed"] == 20
    assert all(f.status == 206 and "body broke off" in f.error for f in broken.tally.failures)
    silent = await warm(_refs(urls), settings, _BrokenBodies(silent=True), sleep=_Sleeps())
    assert silent.exit_code == 3
    assert "closed the connection without answering" in str(silent.aborted)


async def test_a_list_whose_urls_are_all_malformed_is_exit_1_not_the_storages_5() -> None:
    """Lines whose URL is never sent (plain http, a port out of range): each fails alone, and
    with no good line the run exited 5, "the storage refused everything", sending the user to
    look at the storage. It is 1; a storage that refused what it was sent is still 5."""
    with aioresponses() as m:
        m.get(re.compile(r"https://door/.*"), status=503, repeat=True)
        async with HttpToucher(None) as t:
            bad = await warm(_refs(["http://door/a", "https://door:99999/b", "ftp://door/c"]),
                             _settings(), t, sleep=_Sleeps())
            refused = await warm(_refs(["http://door/a", "https://door/b"]),
                                 _settings(retry=RetryPolicy(attempts=1)), t, sleep=_Sleeps())
    assert bad.tally.results["failed"] == 3 and bad.tally.unsent == 3
    assert bad.exit_code == 1
    assert refused.tally.unsent == 1 and refused.exit_code == 5


async def test_duplicates_touched_once() -> None:
    """A URL listed twice is touched once and counted as a duplicate."""
    with aioresponses() as m:
        m.get(URL, status=206, body=b"abcd")  # a second request would find no mock and fail
        async with HttpToucher(None) as t:
            report = await warm(_refs([URL, URL]), _settings(), t, sleep=_Sleeps())
    assert report.tally.results["warm"] == 1 and report.tally.duplicates == 1
    assert report.exit_code == 0


class _Raising:
    """A toucher that raises what ``errors`` maps a URL's last segment to, else answers 206, and
    records every URL it was given."""

    def __init__(self, errors: dict[str, BaseException]) -> None:
        self.errors = errors
        self.urls: list[str] = []

    async def touch(self, url: str) -> Attempt:
        self.urls.append(url)
        error = self.errors.get(url.rsplit("/", 1)[-1])
        if error is not None:
            raise error
        return Attempt(status=206, data=4, size=100)


class _Weird(Exception):
    """An exception class nobody catches on purpose."""


async def test_any_exception_from_the_toucher_fails_only_that_file() -> None:
    """RuntimeError, KeyError, asyncio.TimeoutError, an unknown Exception subclass from the
    toucher: each fails its own file, once, with a short reason; the run goes on to the end."""
    errors: dict[str, BaseException] = {
        "a": RuntimeError("boom"), "b": KeyError("k"), "c": _Weird("x" * 10_000),
        "d": TimeoutError(),
    }
    toucher = _Raising(errors)
    urls = [f"https://d/{n}" for n in ("a", "b", "c", "d")] + [f"https://d/ok{i}" for i in range(50)]
    report = await warm(_refs(urls), _settings(), toucher, sleep=_Sleeps())
    assert report.aborted is None and report.exit_code == 1
    assert report.tally.done == 54 and report.tally.results["warm"] == 50
    failed = {o.name: o for o in report.tally.failures}
    assert set(failed) == {"a", "b", "c", "d"}
    assert failed["a"].error == "unexpected error: RuntimeError: boom"
    assert failed["b"].error == "unexpected error: KeyError: 'k'"
    assert failed["c"].error.startswith("unexpected error: _Weird: xxx")
    assert len(failed["c"].error) == ERROR_TEXT_MAX
    assert failed["d"].error == "unexpected error: TimeoutError"
    assert all(o.result is Result.FAILED and o.attempts == 1 for o in failed.values())
    assert len(toucher.urls) == 54  # an unexpected error is not retried


async def test_base_exceptions_that_are_not_errors_still_end_the_run() -> None:
    """Only Exception is the file's failure: a BaseException such as KeyboardInterrupt or
    SystemExit (here a subclass of BaseException) still ends the run and propagates."""

    class Stop(BaseException):
        pass

    toucher = _Raising({"f3": Stop()})
    with pytest.raises(Stop):
        await warm(_refs([f"https://d/f{i}" for i in range(100)]), _settings(concurrency=1),
                   toucher, sleep=_Sleeps())


@pytest.mark.parametrize(("url", "touched"), [
    ("https://door:2880/pnfs/f", "https://door:2880/pnfs/f"),
    ("HTTPS://door/f", "https://door/f"),
    ("davs://door:2880/pnfs/f", "https://door:2880/pnfs/f"),
    ("DAVS://door/f", "https://door/f"),
    ("davs://u:p@door/f?x=davs://", "https://u:p@door/f?x=davs://"),
])
def test_touched_schemes(url: str, touched: str) -> None:
    """https as it is, its scheme in lower case; davs is https by another name (same port
    semantics)."""
    assert touch_url(url) == touched


@pytest.mark.parametrize(("url", "error"), [
    ("http://door/f", PLAIN_HTTP_REFUSED),
    ("root://door:1094//pnfs/f", "unsupported scheme root://"),
    ("gsiftp://door/f", "unsupported scheme gsiftp://"),
    ("file:///etc/passwd", "unsupported scheme file://"),
    ("/pnfs/f", "not a URL (no scheme://)"),
])
def test_refused_schemes(url: str, error: str) -> None:
    """http (unless allowed), other schemes and scheme-less lines are refused with a reason."""
    assert touch_url(url) == Attempt(failure=Failure.PROTOCOL, error=error)


async def test_bad_urls_fail_their_file_and_are_never_touched() -> None:
    """A definition mixing https, davs, http, root and a bare path: the refused ones fail
    without a try (attempts 0), davs is touched as https, the run completes."""
    toucher = _Raising({})
    urls = ["https://d/a", "davs://d:2880/b", "http://d/c", "root://d//e", "/pnfs/f"]
    report = await warm(_refs(urls), _settings(), toucher, sleep=_Sleeps())
    assert sorted(toucher.urls) == ["https://d/a", "https://d:2880/b"]
    assert report.tally.results["warm"] == 2 and report.tally.results["failed"] == 3
    errors = {o.url: (o.error, o.attempts) for o in report.tally.failures}
    assert errors == {"http://d/c": (PLAIN_HTTP_REFUSED, 0),
                      "root://d//e": ("unsupported scheme root://", 0),
                      "/pnfs/f": ("not a URL (no scheme://)", 0)}


async def test_allow_plain_http_lets_http_through(tmp_path: Path) -> None:
    """storage.allow_plain_http (default false) reaches the engine through from_config; true
    lets http URLs be touched."""
    cfg = tmp_path / "p.toml"
    cfg.write_text("")
    assert WarmSettings.from_config(load_config(cfg)).allow_plain_http is False
    cfg.write_text("[storage]\nallow_plain_http = true\n")
    settings = WarmSettings.from_config(load_config(cfg))
    assert settings.allow_plain_http is True
    toucher = _Raising({})
    report = await warm(_refs(["http://d/c"]), settings, toucher, sleep=_Sleeps())
    assert toucher.urls == ["http://d/c"] and report.tally.results["warm"] == 1


async def test_url_credentials_stay_out_of_failures_and_breaker_messages() -> None:
    """https://user:pw@host/...: failures list the URL as https://***@host/..., errors quoting
    it are redacted, breaker messages name the endpoint without userinfo."""

    class Quoting:
        async def touch(self, url: str) -> Attempt:
            if url.endswith("/boom"):
                raise RuntimeError(f"cannot handle {url}")
            return Attempt(status=403, error=f"HTTP 403 Forbidden for {url}")

    urls = ["https://user:s3cret@door:2880/boom"] + [
        f"https://user:s3cret@door:2880/f{i}" for i in range(10)]
    report = await warm(_refs(urls), _settings(concurrency=1, breaker=BreakerConfig(denials=3)),
                        Quoting(), sleep=_Sleeps())
    assert report.exit_code == 3
    assert str(report.aborted).startswith("https://door:2880 denied 3 files in a row")
    texts = [str(report.aborted)] + [f"{o.url} {o.error}" for o in report.tally.failures]
    assert len(texts) == 5 and not any("s3cret" in t for t in texts)
    boom = report.tally.failures[0]
    assert boom.url == "https://***@door:2880/boom"
    assert boom.error == "unexpected error: RuntimeError: cannot handle https://***@door:2880/boom"


def test_attempt_error_text_is_bounded_and_redacted() -> None:
    """Whoever builds an Attempt, its error text is folded, cut to ERROR_TEXT_MAX characters and
    free of URL userinfo: a 5 MB reason phrase or a library message quoting the URL."""
    huge = Attempt(status=404, error="HTTP 404 " + "x" * 5_000_000)
    assert len(huge.error) == ERROR_TEXT_MAX and huge.error.startswith("HTTP 404 xxx")
    quoted = Attempt(failure=Failure.PROTOCOL,
                     error="400, message='Bad status line',\n url='https://user:pw@door:2880/f'")
    assert quoted.error == "400, message='Bad status line', url='https://***@door:2880/f'"
    assert Attempt(status=206).error == ""
    assert redact("https://u:p@ss@h:1/f?a=b@c") == "https://***@h:1/f?a=b@c"
    assert redact("davs://a@h/x and root://b:c@h//y") == "davs://***@h/x and root://***@h//y"
    assert redact("https://h/f@x") == "https://h/f@x"  # an "@" in the path is no userinfo
    # Query parameters that carry a secret: every one, whatever its case; the rest kept.
    assert redact("https://h/f?password=QS3cret&token=T0k&x=1") == (
        "https://h/f?password=***&token=***&x=1")
    assert redact("root://h//f?authz=Bearer%20eyJ.x.y and https://h/g?X-Amz-Signature=ab#c") == (
        "root://h//f?authz=*** and https://h/g?X-Amz-Signature=***#c")
    assert redact("https://h/f?tokenizer=a&mytoken=b&x=token=c") == (
        "https://h/f?tokenizer=a&mytoken=b&x=token=c")
    # Also GCS signatures, a token in a fragment, and a server's words quoting one without
    # its URL (the API review found each in the state and a DEBUG line).
    assert redact("https://h/g?X-Goog-Signature=G00g&X-Goog-Credential=c&x=1#access_token=F") \
        == "https://h/g?X-Goog-Signature=***&X-Goog-Credential=***&x=1#access_token=***"
    assert redact("HTTP 404 Missing authz=H1 and token=H2") == (
        "HTTP 404 Missing authz=*** and token=***")
    assert redact("authz=H3 first") == "authz=*** first"
    assert redact("https://h/f?Authorization=Bearer%20A1") == "https://h/f?Authorization=***"
    assert scrub("b'Authorization: Bearer S3cr3tV4lue-0f-a-t0ken\\x00'") == (
        "b'Authorization: Bearer ***\\x00'")
    for prose in ("no bearer token, a Bearer challenge",
                  "WWW-Authenticate: Bearer scope=storage.read:/dune",
                  "the server wants Bearer tokens/credentials for /pnfs/x",
                  "the Bearer /pnfs/dune/persistent/users/x.root was refused"):
        assert scrub(prose) == prose
    assert redact("PWD=/home/u pwd=/tmp sig=abc") == "PWD=/home/u pwd=/tmp sig=abc"
    assert redact("password=hunter2 and ?pwd=x") == "password=*** and ?pwd=***"
    # Redacted before the cut: a password is never half-shown.
    assert "secret" not in error_text("x" * 190 + " https://user:secret@h/f")


def test_backoff_of_any_retry_number_is_the_cap() -> None:
    """Retry 2,000 of a long gate or complete poll waits the cap (2.0 ** 1999 overflowed)."""
    policy = RetryPolicy(initial=10.0, max=600.0, jitter=0.0)
    assert policy.backoff(2000) == 600.0 and policy.backoff(1) == 10.0
