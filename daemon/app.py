"""The aiohttp application: routes, and the daemon's resources in dependency order.

cleanup_ctx runs set-up top to bottom and teardown bottom to top:
disk space -> event log -> claims (with other daemons on the database) -> downloaded bodies (the working folder)
-> process pool -> the process's tuning (daemon.tuning) -> HTTP clients (downloads, webhooks) -> consumers -> inbox
-> retention.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator

import aiohttp
import structlog
from aiohttp import web

from daemon.cluster import Leadership, adopt_checkpoint, node_of, per_node
from daemon.config import Settings
from daemon.control import commands
from daemon.control import http as control_http
from daemon.control.cancellations import Cancellations, CancellationsFollower
from daemon.control.retention import Retention
from daemon.diskspace import DiskSpace, settings_places
from daemon.eventlog.claims import Claims
from daemon.eventlog.follower import Follower
from daemon.eventlog.store import EventLog, open_store
from daemon.http_api import (
    CANCELLATIONS,
    COMPLETE_STAGE,
    DELETE_STAGE,
    DISK_SPACE,
    EVENTLOG,
    IMAGE_STORE,
    SETTINGS,
    STATUS_VIEW,
    add_routes,
    bearer_auth,
    json_errors,
)
from daemon.ingest import http as ingest_http
from daemon.ingest.inbox import Inbox
from daemon.instance import without_password
from daemon.metrics import METRICS, Metrics, counting
from daemon.metrics import add_routes as metrics_routes
from daemon.network import AddressPolicy, GuardedConnector
from daemon.openapi import add_routes as openapi_routes
from daemon.stages import requantize, similarity
from daemon.stages.bodies import Bodies
from daemon.stages.complete import CompleteStage
from daemon.stages.compress import CompressStage
from daemon.stages.delete import DeleteStage
from daemon.stages.download import DownloadStage
from daemon.stages.pool import CodecPool
from daemon.storage import image_store
from daemon.tuning import tuned
from daemon.views.export import OutboxWriter
from daemon.views.status import STATUS_TABLES, StatusView
from daemon.web import before, guard, listing, page
from daemon.webhooks import deliver, receive
from daemon.webhooks.deliver import WebhookDelivery

log = structlog.get_logger("daemon")

FOLLOWERS = web.AppKey("followers", list[Follower])
FOLLOW = web.AppKey("follow", bool)
INBOX = web.AppKey("inbox", Inbox)
POOL = web.AppKey("pool", CodecPool)
CLIENT = web.AppKey("client", aiohttp.ClientSession)  # downloads
WEBHOOK_CLIENT = web.AppKey("webhook_client", aiohttp.ClientSession)
WEBHOOK_CONNECTIONS = 64
BODIES = web.AppKey("bodies", Bodies)
DAEMON_CPU: web.AppKey[int | None] = web.AppKey("daemon_cpu")
CLAIMS = web.AppKey("claims", Claims)  # only with a database other daemons may share (daemon.cluster)
VIEW_TABLES = (*STATUS_TABLES,)
# Run once per database, by the leader, when several daemons share it (daemon.cluster); the rest run in each.
LEADER_ROLES = (StatusView, CompleteStage, WebhookDelivery)


async def open_eventlog(settings: Settings, space: DiskSpace | None = None) -> EventLog:
    for name in ("inbox", "outbox", "images"):
        settings.path(name).mkdir(parents=True, exist_ok=True)
    eventlog = open_store(settings.database_url, space, settings.paths.sqlite_synchronous)
    await eventlog.open(VIEW_TABLES)
    return eventlog


def view_followers(eventlog: EventLog) -> list[Follower]:
    """The side-effect-free consumers that `imgpipe replay` rebuilds; the status view first."""
    return [StatusView(eventlog)]


def build_followers(app: web.Application) -> list[Follower]:
    """Every consumer of the log, in data-flow order: views, stages, outbox, webhooks."""
    settings, eventlog = app[SETTINGS], app[EVENTLOG]
    views = view_followers(eventlog)
    status_view = views[0]
    assert isinstance(status_view, StatusView)
    app[STATUS_VIEW] = status_view
    bodies, cancellations = app[BODIES], app[CANCELLATIONS]
    claims, node = app.get(CLAIMS), node_of(settings)
    complete = app[COMPLETE_STAGE] = CompleteStage(eventlog, bodies)
    delete = app[DELETE_STAGE] = DeleteStage(eventlog, bodies, cancellations, app[IMAGE_STORE],
                                             settings.path("outbox"), settings.path("inbox"))
    followers = [
        *views,
        DownloadStage(eventlog, app[CLIENT], bodies, settings.download, cancellations, app[METRICS], claims),
        CompressStage(eventlog, app[POOL], bodies, app[IMAGE_STORE], settings.compress, cancellations, app[METRICS],
                      claims),
        complete,
        OutboxWriter(eventlog, settings.path("outbox"), settings.images_url, node),
        WebhookDelivery(eventlog, app[WEBHOOK_CLIENT], settings, app[METRICS], status_view),
        delete,
    ]
    if node is not None:
        followers.append(CancellationsFollower(eventlog, cancellations))
        for follower in followers:
            if not isinstance(follower, LEADER_ROLES):
                per_node(follower, node)
    return followers


async def diskspace_ctx(app: web.Application) -> AsyncIterator[None]:
    space = app[DISK_SPACE] = DiskSpace(settings_places(app[SETTINGS]))
    yield
    await space.close()


async def eventlog_ctx(app: web.Application) -> AsyncIterator[None]:
    eventlog = app[EVENTLOG] = await open_eventlog(app[SETTINGS], app[DISK_SPACE])
    app[CANCELLATIONS] = Cancellations(await commands.cancelled_request_ids(eventlog))
    yield
    await app[EVENTLOG].close()


async def claims_ctx(app: web.Application) -> AsyncIterator[None]:
    """With a database other daemons may share: this daemon's claims on images (daemon.eventlog.claims)."""
    settings = app[SETTINGS]
    node = node_of(settings)
    if node is None:
        yield
        return
    claims = app[CLAIMS] = Claims(app[EVENTLOG], node, settings.cluster.lease_seconds)
    await claims.open()
    yield
    try:
        await claims.release()
    except Exception:  # the database gone as the daemon stops: the leases run out by themselves
        log.warning("claims_not_released", node=node)
    if latencies := sorted(claims.latencies):
        log.info("claim_latency", node=node, claims=len(latencies), p50_ms=latencies[len(latencies) // 2],
                 p99_ms=latencies[min(len(latencies) - 1, len(latencies) * 99 // 100)], samples_ms=list(claims.latencies))


async def bodies_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    download = settings.download
    bodies = app[BODIES] = Bodies(settings.path("work") / "bodies", download.backlog, download.backlog_bytes)
    # Where earlier versions kept bodies, inside the served images folder; they are downloaded again.
    await asyncio.to_thread(shutil.rmtree, settings.path("images") / ".incoming", True)
    await asyncio.to_thread(bodies.load)
    yield
    # Teardown runs after the consumers have stopped. Emptying is safe: the compress stage appends
    # ImageRequeued for an image whose body is gone, and the image is downloaded again.
    await asyncio.to_thread(bodies.empty)


async def pool_ctx(app: web.Application) -> AsyncIterator[None]:
    app[POOL] = CodecPool(app[SETTINGS].compress)
    await app[POOL].start()
    yield
    await app[POOL].shutdown()


async def tuning_ctx(app: web.Application) -> AsyncIterator[None]:
    """After the pool: its forkserver and workers keep every CPU while the daemon's threads share one."""
    with tuned(app[SETTINGS].compress.pin_daemon) as cpu:
        app[DAEMON_CPU] = cpu
        yield


async def client_ctx(app: web.Application) -> AsyncIterator[None]:
    """Two HTTP clients, each with its own connections: listeners that hang on webhook deliveries must not hold
    the connections downloads wait for (aiohttp counts that wait in the connect timeout)."""
    settings = app[SETTINGS]
    policy = AddressPolicy(settings.network)
    downloads = GuardedConnector(policy, limit=settings.download.concurrency * 2,
                                 limit_per_host=settings.download.concurrency)
    listeners = GuardedConnector(policy, limit=WEBHOOK_CONNECTIONS, limit_per_host=WEBHOOK_CONNECTIONS // 4)
    headers = {"User-Agent": "imgpipe/0.1"}
    # read_bufsize: aiohttp pauses a socket once twice this much is buffered; at the 64 KiB default a
    # photo's body pauses and resumes its socket at every read. 16 downloads x 512 KiB stay small.
    async with (aiohttp.ClientSession(connector=downloads, headers=headers, read_bufsize=256 * 1024) as client,
                aiohttp.ClientSession(connector=listeners, headers=headers) as webhook_client):
        app[CLIENT], app[WEBHOOK_CLIENT] = client, webhook_client
        yield


async def followers_ctx(app: web.Application) -> AsyncIterator[None]:
    followers = app[FOLLOWERS] = build_followers(app)
    settings, claims = app[SETTINGS], app.get(CLAIMS)  # claims: with a database other daemons may share
    app[METRICS].watch(app[EVENTLOG], app[BODIES], followers)
    tasks: list[asyncio.Task[None]] = []
    if app[FOLLOW] and claims is None:
        tasks = [asyncio.create_task(f.run(), name=f"follower:{f.name}") for f in followers]
    elif app[FOLLOW] and claims is not None:
        leaders = [f for f in followers if isinstance(f, LEADER_ROLES)]
        leadership = Leadership(settings.database_url, claims.node, leaders)
        for follower in followers:
            if follower not in leaders:
                await adopt_checkpoint(app[EVENTLOG], follower)
                tasks.append(asyncio.create_task(follower.run(), name=f"follower:{follower.name}"))
        tasks += [asyncio.create_task(leadership.run(), name="leadership"),
                  asyncio.create_task(claims.run(), name="claims")]
    yield
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def inbox_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    if not settings.inbox.enabled:
        yield
        return
    inbox = app[INBOX] = Inbox(settings.path("inbox"), app[EVENTLOG], settings.limits, settings.inbox.settle_seconds,
                               node_of(settings) or "")
    await inbox.start()
    yield
    await inbox.stop()


async def retention_ctx(app: web.Application) -> AsyncIterator[None]:
    followers: list[Follower] = app[FOLLOWERS]
    retention = Retention(app[EVENTLOG], app[SETTINGS].retention, app[SETTINGS].path("inbox"), followers)
    task = asyncio.create_task(retention.run(), name="retention") if app[FOLLOW] else None
    yield
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def announce_ctx(app: web.Application) -> AsyncIterator[None]:
    """Last of the set-up; `imgpipe run` listens before any of it (daemon.listen), so this is true when logged."""
    settings = app[SETTINGS]
    log.info("daemon_started", url=settings.public_url, database=without_password(settings.database_url),
             inbox=str(settings.path("inbox")) if settings.inbox.enabled else None, daemon_cpu=app[DAEMON_CPU],
             jpeg_fast_path=settings.compress.jpeg_fast_path and requantize.available(),
             ssim=("compiled" if similarity.compiled() else "numpy") if settings.compress.ssim else "off")
    yield
    log.info("daemon_stopped")


def build_app(settings: Settings, follow: bool = True) -> web.Application:
    """The daemon; with follow=False the consumers are built but not started (tests drive them in bursts)."""
    metrics = Metrics()
    app = web.Application(middlewares=[counting(metrics), json_errors, bearer_auth(settings.server.tokens),
                                       guard.request_guard(settings.public_url)],
                          client_max_size=settings.limits.max_upload_bytes + 1024 * 1024)
    app[SETTINGS] = settings
    app[METRICS] = metrics
    app[IMAGE_STORE] = image_store(settings)  # a plain value: the clients it opens live as long as the process
    app[FOLLOW] = follow
    app.cleanup_ctx.extend([diskspace_ctx, eventlog_ctx, claims_ctx, bodies_ctx, pool_ctx, tuning_ctx, client_ctx,
                            followers_ctx, inbox_ctx, retention_ctx, announce_ctx])
    add_routes(app)
    ingest_http.add_routes(app)
    control_http.add_routes(app)
    receive.add_routes(app)
    deliver.add_routes(app)
    metrics_routes(app)
    openapi_routes(app)
    page.add_routes(app)
    listing.add_routes(app)
    app.router.add_routes([before.original_route(CLIENT)])
    guard.add_security_headers(app)
    return app
