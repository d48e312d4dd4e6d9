"""Cursor pagination over a Redis sorted set of ids scored by creation time (OpenAI's `after`)."""

from __future__ import annotations

import time

from redis import Redis


def creation_score() -> int:
    """Index score: microseconds since the epoch, so objects created in one second keep their order."""
    return time.time_ns() // 1000


def page_ids(
    redis: Redis, index_key: str, *, after: str | None, limit: int, newest_first: bool = True
) -> tuple[list[str], bool]:
    """Ids after the cursor `after` (exclusive), at most `limit`, and whether more remain.

    An unknown cursor yields an empty page rather than restarting from the top, so a client
    paging through a list can never loop.
    """
    start = 0
    if after is not None:
        rank = redis.zrevrank(index_key, after) if newest_first else redis.zrank(index_key, after)
        if rank is None:
            return [], False
        start = rank + 1
    end = start + limit  # one extra to learn has_more
    fetch = redis.zrevrange if newest_first else redis.zrange
    ids = [i.decode() if isinstance(i, bytes) else i for i in fetch(index_key, start, end)]
    return ids[:limit], len(ids) > limit
