"""Rate limits, error classes and the retry policy shared by every backend.

Backends translate their own exceptions into the three classes below; the engine retries
only `TransientError`, with tenacity's full-jitter exponential backoff, never waiting less
than a server's Retry-After.
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import tenacity

T = TypeVar("T")
#: longest Retry-After we honour; a server asking for more is treated as this
MAX_RETRY_AFTER_S = 300.0


class TransientError(Exception):
    """Worth retrying: 408, 409, 429, 5xx, timeouts, dropped connections, garbled bodies."""

    def __init__(self, message: str, retry_after: float | None = None,
                 status: int | None = None, body: str | None = None):
        super().__init__(message)
        self.retry_after = retry_after
        self.status = status
        self.body = body


class AttemptTimeout(TransientError):
    """An attempt that did not finish in its time: retried once, since a generation that was
    too slow once will most likely be too slow again."""


class RequestError(Exception):
    """Fatal for this request only (e.g. 400 context too long): recorded, not retried."""

    def __init__(self, message: str, status: int | None = None, body: str | None = None):
        super().__init__(message)
        self.status = status
        self.body = body


class JobError(Exception):
    """Fatal for the whole job (bad key, unknown model, wrong URL): stop at once."""


def parse_retry_after(headers: Any) -> float | None:
    """Seconds from `retry-after-ms` or `retry-after` (seconds or an HTTP date), capped."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return min(max(float(ms) / 1000.0, 0.0), MAX_RETRY_AFTER_S)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value) if value else None
        if parsed is None:
            return None
        seconds = parsed.timestamp() - time.time()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


class wait_retry_after(tenacity.wait.wait_base):  # noqa: N801 - tenacity's naming style
    """Full-jitter exponential backoff, but never shorter than the server's Retry-After."""

    def __init__(self, initial: float = 0.5, maximum: float = 30.0):
        self.backoff = tenacity.wait_random_exponential(multiplier=initial, max=maximum)

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        wait = self.backoff(retry_state)
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        retry_after = getattr(exc, "retry_after", None)
        return max(wait, retry_after) if retry_after is not None else wait


async def with_retries(call: Callable[[], Awaitable[T]], attempts: int,
                       initial_wait: float = 0.5, max_wait: float = 30.0,
                       on_attempt: Callable[[], None] | None = None) -> T:
    """Run `call`, retrying TransientError up to `attempts` tries in all; re-raise the last."""
    retrying = tenacity.AsyncRetrying(
        stop=tenacity.stop_after_attempt(max(attempts, 1)),
        wait=wait_retry_after(initial_wait, max_wait),
        retry=tenacity.retry_if_exception_type(TransientError),
        reraise=True,
    )
    async for attempt in retrying:
        with attempt:
            if on_attempt:
                on_attempt()
            return await call()
    raise AssertionError("unreachable: tenacity re-raises the last error")


class RateLimiter:
    """A token bucket refilled at `per_minute`/60 per second, holding up to 10 s of budget.

    `acquire(n)` waits until n units are available (n is capped at the bucket size, so one
    request larger than the bucket waits for a full bucket rather than forever); `adjust`
    charges or refunds the difference once a request's real token count is known.
    """

    def __init__(self, per_minute: float, clock: Callable[[], float] = time.monotonic):
        if per_minute <= 0:
            raise ValueError("a rate limit must be positive")
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate * 10.0)
        self.level = self.capacity
        self.clock = clock
        self.stamp = clock()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    async def acquire(self, amount: float = 1.0) -> None:
        amount = min(float(amount), self.capacity)
        async with self._lock:
            while True:
                self._refill()
                if self.level >= amount:
                    self.level -= amount
                    return
                await asyncio.sleep((amount - self.level) / self.rate)

    def adjust(self, delta: float) -> None:
        """Charge (delta > 0) or refund (delta < 0) units after the fact."""
        self._refill()
        self.level = min(self.capacity, self.level - delta)
