"""Retry policy and rate limiting: the pure decision logic, no processes."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

RetryOn = tuple[type[BaseException], ...] | Callable[[BaseException], bool]


@dataclass(frozen=True)
class RetryPolicy:
    """When and how often a failed task runs again.

    The k-th retry waits min(initial_delay * multiplier ** (k - 1),
    max_delay) seconds, scaled by a random factor in [1 - jitter,
    1 + jitter].  retry_on is a tuple of exception types or a predicate; it
    sees the task's own exception, or WorkerCrashedError / TaskTimeoutError
    when the worker died or the task overran.
    """

    max_attempts: int = 1
    initial_delay: float = 0.1
    max_delay: float = 30.0
    multiplier: float = 2.0
    jitter: float = 0.0
    retry_on: RetryOn = (Exception,)

    def __post_init__(self) -> None:
        check_int("max_attempts", self.max_attempts, minimum=1)
        check_number("initial_delay", self.initial_delay, minimum=0.0)
        check_number("max_delay", self.max_delay, minimum=0.0)
        check_number("multiplier", self.multiplier, minimum=1.0)
        check_number("jitter", self.jitter, minimum=0.0)
        if self.jitter > 1:
            raise ValueError(f"jitter must be between 0 and 1, got {self.jitter!r}")
        if not callable(self.retry_on) and not (
            isinstance(self.retry_on, tuple)
            and all(isinstance(t, type) and issubclass(t, BaseException) for t in self.retry_on)
        ):
            raise TypeError(
                "retry_on must be a tuple of exception types or a predicate, "
                f"got {self.retry_on!r}")

    def should_retry(self, exc: BaseException, attempts: int) -> bool:
        """True if a task that failed with exc after attempts runs goes again."""
        if attempts >= self.max_attempts:
            return False
        if isinstance(self.retry_on, tuple):
            return isinstance(exc, self.retry_on)
        return bool(self.retry_on(exc))

    def delay(self, retry_number: int) -> float:
        """Seconds to wait before the retry_number-th retry (1-based)."""
        base = min(self.initial_delay * self.multiplier ** (retry_number - 1), self.max_delay)
        if self.jitter:
            base *= random.uniform(1 - self.jitter, 1 + self.jitter)
        return max(base, 0.0)


@runtime_checkable
class RateLimiter(Protocol):
    """What a pool needs of a rate limiter; share one object between pools
    to limit them together.

    try_acquire() is called each time a task is about to be released to a
    worker.  It returns 0.0 and takes a permit when the task may start now,
    or the number of seconds after which a permit may be available (taking
    nothing).  It must be thread-safe and must not block.
    """

    def try_acquire(self) -> float: ...


def pool_retry_policy(retry: RetryPolicy | None, max_attempts: int, initial_delay: float,
                      max_delay: float, multiplier: float, jitter: float,
                      retry_on: RetryOn) -> RetryPolicy:
    """A pool's retry policy: retry= if given, else one made of the
    separate retry options (which are then checked)."""
    if retry is None:
        return RetryPolicy(max_attempts, initial_delay, max_delay, multiplier, jitter, retry_on)
    if not isinstance(retry, RetryPolicy):
        raise TypeError(f"retry must be a RetryPolicy, got {retry!r}")
    return retry


class TokenBucket:
    """rate permits per second, with up to burst granted at once.

    It keeps a schedule rather than a count: each permit is due one period
    (1 / rate) after the previous one.  A caller that comes back a little
    late (a timer never fires exactly on time) gets the permit it was due,
    and the next one is due on schedule, so late wake-ups do not lower the
    rate.  Lateness is only credited up to half a period, which keeps any
    one-second window within rate + burst permits.
    """

    def __init__(self, rate: float, burst: int = 1) -> None:
        check_number("rate", rate, minimum=0.0)
        if rate <= 0:
            raise ValueError(f"rate must be positive, got {rate!r}")
        check_int("burst", burst, minimum=1)
        self.rate = float(rate)
        self.burst = burst
        self._period = 1.0 / self.rate
        # When the next permit is due; burst permits may be granted ahead
        # of it.  Starts full: a fresh bucket grants a burst at once.
        self._due = time.monotonic()
        # Several pools (each with its own engine thread) may share one
        # bucket, so the check-and-take must be atomic.
        self._lock = threading.Lock()

    def try_acquire(self) -> float:
        with self._lock:
            now = time.monotonic()
            ahead = (self.burst - 1) * self._period
            wait = self._due - ahead - now
            if wait > 0:
                return wait
            self._due = max(self._due, now - self._period / 2) + self._period
            return 0.0


def check_int(name: str, value: object, *, minimum: int) -> None:
    """Raise a TypeError/ValueError naming the argument when value is bad."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value!r}")


def check_number(name: str, value: object, *, minimum: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if value != value or value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value!r}")
