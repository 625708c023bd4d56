"""The aiohttp application: routes, and the daemon's resources in dependency order.

cleanup_ctx runs set-up top to bottom and teardown bottom to top: event log -> consumers -> inbox.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import structlog
from aiohttp import web

from daemon.config import Settings
from daemon.eventlog.follower import Follower
from daemon.eventlog.store import EventLog, open_database
from daemon.ingest import http as ingest_http
from daemon.ingest.inbox import Inbox
from daemon.views.status import STATUS_TABLES, StatusView
from daemon.web import EVENTLOG, SETTINGS, STATUS_VIEW, add_routes, json_errors

log = structlog.get_logger("daemon")

FOLLOWERS = web.AppKey("followers", list[Follower])
INBOX = web.AppKey("inbox", Inbox)
VIEW_TABLES = (*STATUS_TABLES,)


async def open_eventlog(settings: Settings) -> EventLog:
    for name in ("inbox", "outbox", "images"):
        settings.path(name).mkdir(parents=True, exist_ok=True)
    eventlog = EventLog(open_database(settings.database_url))
    await eventlog.open(VIEW_TABLES)
    return eventlog


def view_followers(eventlog: EventLog) -> list[Follower]:
    """The side-effect-free consumers that `imgpipe replay` rebuilds; the status view first."""
    return [StatusView(eventlog)]


def build_followers(app: web.Application) -> list[Follower]:
    """Every consumer of the log: the views, then the stages."""
    views = view_followers(app[EVENTLOG])
    status_view = views[0]
    assert isinstance(status_view, StatusView)
    app[STATUS_VIEW] = status_view
    return views


async def eventlog_ctx(app: web.Application) -> AsyncIterator[None]:
    app[EVENTLOG] = await open_eventlog(app[SETTINGS])
    yield
    await app[EVENTLOG].close()


async def followers_ctx(app: web.Application) -> AsyncIterator[None]:
    followers = app[FOLLOWERS] = build_followers(app)
    tasks = [asyncio.create_task(f.run(), name=f"follower:{f.name}") for f in followers]
    yield
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def inbox_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    if not settings.inbox.enabled:
        yield
        return
    inbox = app[INBOX] = Inbox(settings.path("inbox"), app[EVENTLOG], settings.limits, settings.inbox.settle_seconds)
    await inbox.start()
    log.info("daemon_started", url=settings.public_url, inbox=str(inbox.folder), database=settings.database_url)
    yield
    await inbox.stop()


def build_app(settings: Settings) -> web.Application:
    app = web.Application(middlewares=[json_errors], client_max_size=settings.limits.max_upload_bytes + 1024 * 1024)
    app[SETTINGS] = settings
    app.cleanup_ctx.extend([eventlog_ctx, followers_ctx, inbox_ctx])
    add_routes(app)
    ingest_http.add_routes(app)
    return app
