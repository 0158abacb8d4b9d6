"""Pure pacing for teacher calls: token buckets (rpm/tpm), retry backoff with Retry-After, and a budget cap."""

from __future__ import annotations

import asyncio
import email.utils
import math
import random
import time
from typing import Callable, Mapping


class TokenBucket:
    """Reservation-style token bucket (as Guava's RateLimiter): `reserve(n)` books n tokens now and returns how
    long the caller must wait before using them. The level may go negative ("debt"), so waiters are served in
    the order they reserved, nobody polls, and a request larger than the burst still passes after its deficit."""

    def __init__(self, rate_per_s: float, burst: float, clock: Callable[[], float] = time.monotonic):
        if rate_per_s <= 0 or burst <= 0:
            raise ValueError(f"rate_per_s and burst must be > 0, got {rate_per_s}, {burst}")
        self.rate, self.burst, self.clock = float(rate_per_s), float(burst), clock
        self._level = float(burst)
        self._t = clock()

    def _refill(self, now: float) -> None:
        if now > self._t:
            self._level = min(self.burst, self._level + (now - self._t) * self.rate)
            self._t = now

    def reserve(self, n: float, now: float | None = None) -> float:
        """Book `n` tokens; returns seconds to wait (0 if available now)."""
        self._refill(self.clock() if now is None else now)
        self._level -= n
        return 0.0 if self._level >= 0 else -self._level / self.rate

    def adjust(self, delta: float, now: float | None = None) -> None:
        """Charge `delta` more tokens (negative: refund), e.g. real usage minus the estimate booked."""
        self._refill(self.clock() if now is None else now)
        self._level = min(self.burst, self._level - delta)


class RateLimiter:
    """Requests-per-minute and tokens-per-minute caps for one client (one event loop).

    Each bucket allows a burst of one second's worth (at least one request / one request's tokens): providers
    enforce per-minute limits at sub-minute granularity, so a full minute's burst would just earn 429s."""

    def __init__(self, rpm: int | None = None, tpm: int | None = None, clock: Callable[[], float] = time.monotonic):
        self.requests = TokenBucket(rpm / 60.0, max(1.0, rpm / 60.0), clock) if rpm else None
        self.tokens = TokenBucket(tpm / 60.0, max(1.0, tpm / 60.0), clock) if tpm else None

    def reserve(self, est_tokens: int) -> float:
        wait = 0.0
        if self.requests is not None:
            wait = max(wait, self.requests.reserve(1))
        if self.tokens is not None:
            wait = max(wait, self.tokens.reserve(est_tokens))
        return wait

    async def acquire(self, est_tokens: int) -> None:
        wait = self.reserve(est_tokens)
        if wait > 0:
            await asyncio.sleep(wait)

    def correct(self, est_tokens: int, actual_tokens: int) -> None:
        if self.tokens is not None:
            self.tokens.adjust(actual_tokens - est_tokens)


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds the server asked us to wait: `retry-after-ms` (OpenAI), `Retry-After` as seconds or HTTP date."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    value = value.strip()
    try:
        secs = float(value)
        return max(0.0, secs) if math.isfinite(secs) else None
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def backoff_delay(attempt: int, base_s: float, max_s: float, retry_after_s: float | None = None,
                  rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter (https://aws.amazon.com/blogs/architecture/exponential-backoff-and-jitter/):
    uniform(0, min(max_s, base_s * 2**attempt)). A server's Retry-After is a floor: never retry earlier than
    it asked (it knows when its window resets), while the jitter still spreads clients that got the same value."""
    cap = min(max_s, base_s * (2.0 ** attempt))
    jitter = (rng or random).uniform(0.0, cap) if cap > 0 else 0.0
    return max(jitter, retry_after_s or 0.0)


class Budget:
    """A per-run cap on teacher calls and tokens; plain and single-threaded (one event loop), the Ray actor in
    `requests_ray` wraps the same object for many workers.

    A request is admitted only if its worst case (estimated prompt + max_tokens) fits beside what was spent and
    what in-flight requests reserved, so the token cap is never exceeded; `settle` replaces the reservation with
    the real usage. Calls are counted at admission (retries of one request are one call)."""

    def __init__(self, max_calls: int | None = None, max_tokens: int | None = None, max_usd: float | None = None,
                 spent_usd: float = 0.0):
        self.max_calls, self.max_tokens, self.max_usd = max_calls, max_tokens, max_usd
        self.calls = 0
        self.tokens_spent = 0
        self.tokens_reserved = 0
        self.usd_spent = float(spent_usd)    # dollars: what earlier runs of this run directory already paid, too
        self.usd_reserved = 0.0
        self.rejected = 0

    def try_acquire(self, est_tokens: int, est_usd: float = 0.0) -> bool:
        if self.max_calls is not None and self.calls >= self.max_calls:
            self.rejected += 1
            return False
        if self.max_tokens is not None and self.tokens_spent + self.tokens_reserved + est_tokens > self.max_tokens:
            self.rejected += 1
            return False
        if self.max_usd is not None and self.usd_spent + self.usd_reserved + est_usd > self.max_usd:
            self.rejected += 1
            return False
        self.calls += 1
        self.tokens_reserved += est_tokens
        self.usd_reserved += est_usd
        return True

    def settle(self, est_tokens: int, actual_tokens: int, est_usd: float = 0.0, actual_usd: float = 0.0) -> None:
        self.tokens_reserved -= est_tokens
        self.tokens_spent += actual_tokens
        self.usd_reserved -= est_usd
        self.usd_spent += actual_usd

    def snapshot(self) -> dict:
        return {"calls": self.calls, "tokens_spent": self.tokens_spent, "tokens_reserved": self.tokens_reserved,
                "usd_spent": self.usd_spent, "usd_reserved": self.usd_reserved, "rejected": self.rejected,
                "max_calls": self.max_calls, "max_tokens": self.max_tokens, "max_usd": self.max_usd}
