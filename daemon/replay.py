"""Rebuild every view from position 0: drop its tables and its checkpoint, fold the whole log again."""

from __future__ import annotations

from daemon.app import VIEW_TABLES, open_eventlog, view_followers
from daemon.config import Settings
from daemon.eventlog.follower import run_until_idle


async def replay(settings: Settings) -> int:
    eventlog = await open_eventlog(settings)
    try:
        views = view_followers(eventlog)

        def reset() -> None:
            with eventlog.transaction():
                eventlog.db.drop_tables(list(VIEW_TABLES))
                eventlog.db.create_tables(list(VIEW_TABLES))
                for view in views:
                    eventlog.reset_consumer_sync(view.name)

        await eventlog.write(reset)
        return await run_until_idle(views)
    finally:
        await eventlog.close()
