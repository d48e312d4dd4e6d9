"""One way to open a Redis client, so that every process rides out a Redis restart the same way.

Redis restarts (a crash, a failover, an upgrade) take seconds; a worker that gave up on the first
refused connection would crash, lose track of its running task and leave its job to the janitor.
Each command is retried with exponential backoff while Redis is unreachable, for about
`retry_seconds`; only then does the error reach the caller.
"""

from __future__ import annotations

from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError, TimeoutError
from redis.retry import Retry

# The longest wait between two tries, and the first one.
BACKOFF_CAP_SECONDS = 1.0
BACKOFF_BASE_SECONDS = 0.05


def retries_for(seconds: float) -> int:
    """How many tries of the backoff below add up to `seconds` of waiting."""
    retries, waited = 0, 0.0
    while waited < seconds:
        waited += min(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS * 2**retries)
        retries += 1
    return retries


def connect_redis(url: str, retry_seconds: float) -> Redis:
    """A client whose commands wait out an unreachable Redis for about `retry_seconds`."""
    return Redis.from_url(
        url,
        retry=Retry(
            ExponentialBackoff(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS), retries_for(retry_seconds)
        ),
        retry_on_error=[ConnectionError, TimeoutError],
        socket_connect_timeout=2,
        health_check_interval=30,
    )


def connect_async_redis(url: str, retry_seconds: float) -> AsyncRedis:
    """The asyncio client with the same backoff, for request handlers that must not block the event loop.
    Its connections belong to the event loop that opened them."""
    return AsyncRedis.from_url(
        url,
        retry=AsyncRetry(
            ExponentialBackoff(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS), retries_for(retry_seconds)
        ),
        retry_on_error=[ConnectionError, TimeoutError],
        socket_connect_timeout=2,
        health_check_interval=30,
    )
