"""Rebuild every view from position 0: drop its tables and its checkpoint, fold the whole log again."""

from __future__ import annotations

from daemon.app import VIEW_TABLES, open_eventlog, view_followers
from daemon.config import Settings
from daemon.eventlog.follower import run_until_idle


async def replay(settings: Settings) -> int:
    eventlog = await open_eventlog(settings)
    try:
        views = view_followers(eventlog)

        await eventlog.reset_views(VIEW_TABLES, [view.name for view in views])
        return await run_until_idle(views)
    finally:
        await eventlog.close()
