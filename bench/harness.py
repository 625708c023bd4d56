"""What both bench scenarios share: generated photos, the daemon as a subprocess, its memory and CPU, uploads."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from types import TracebackType

import aiohttp
import numpy as np
from PIL import Image

from daemon.testing import Origin, free_port, jpeg_bytes, photo

ACTIVE = ("queued", "processing")


# The bench's image sets: a photograph's grain (the standard deviation of luma noise added to daemon.testing's
# photo) decides how many coefficients survive quantisation, so how heavy decoding and encoding it are.
DEFAULT_ROUNDS = 8  # throughput and scale, without --rounds
PHOTO_SETS = {"smooth": 0.0, "grain": 10.0}  # at 2000x2000, quality 90: about 0.9 MB and 1.5 MB


def make_image(seed: int, size: int, grain: float = 0.0) -> bytes:
    image = photo(size, size, seed=seed)
    if grain:
        noise = np.random.default_rng(seed).normal(0, grain, (size, size, 1))
        image = Image.fromarray(np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8))
    return jpeg_bytes(image, quality=90)


def make_photos(count: int, size: int, workers: int, kind: str = "smooth") -> list[bytes]:
    started = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        photos = list(pool.map(make_image, range(count), [size] * count, [PHOTO_SETS[kind]] * count))
    print(f"generated {count} distinct {size}x{size} {kind} photos ({sum(map(len, photos)) / count / 1e6:.2f} MB "
          f"each) in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return photos


# Each daemon's folders stay until the whole bench is over. On ext4 without a journal (as on the VMs this
# was measured on), creating a file walks past every inode of its block group deleted in the last minute,
# or six while the inode table is still unwritten: removing one round's 2,000 outputs made each file the
# next round created cost about 0.24 ms of CPU instead of 0.02, in the codec workers. The ceiling creates
# no files, so the pipeline alone paid for the bench's own clean-up.
@contextlib.contextmanager
def scratch() -> Iterator[Path]:
    """The folder every daemon of this bench run works in, removed after the last measurement."""
    with tempfile.TemporaryDirectory(prefix="imgpipe-bench-") as folder:
        yield Path(folder)


def new_workdir(scratch: Path, name: str) -> Path:
    """A daemon's own folder inside `scratch`, never reused (an earlier run's files must not be in its way)."""
    return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=scratch))


def file_create_ms(folder: Path, files: int = 50) -> float:
    """CPU ms per small file created in `folder` now (kept: deleting them would tax what follows)."""
    probe = Path(tempfile.mkdtemp(prefix="probe-", dir=folder))
    started = time.process_time()
    for i in range(files):
        os.close(os.open(probe / str(i), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    return round(1000 * (time.process_time() - started) / files, 3)


SETTLED_CREATE_MS = 0.05  # what creating a file costs here with no recent deletions: 0.015-0.035 ms


async def settled_filesystem(folder: Path, max_wait: float, every: float = 10.0, calm: int = 3) -> dict[str, float]:
    """Wait (up to `max_wait` s) until creating a file in `folder` has cost what it does with no recent deletions
    `calm` times in a row, `every` s apart. Deleting thousands of files, as a test suite or the previous bench run
    does, makes each file created for the next minutes cost up to 0.9 ms of CPU instead of 0.02, and the codec
    workers create one per image. The tax shows only some seconds after the deletion, hence the repeats."""
    started = time.monotonic()
    costs = [file_create_ms(folder)]
    while time.monotonic() - started < max_wait:
        recent = costs[-calm:]
        if len(recent) == calm and max(recent) <= SETTLED_CREATE_MS:
            break
        if costs[-1] > SETTLED_CREATE_MS:
            print(f"waiting for the filesystem to settle: creating a file costs {costs[-1]:.3f} ms "
                  f"(settled: under {SETTLED_CREATE_MS} ms)", file=sys.stderr)
        await asyncio.sleep(every)
        costs.append(file_create_ms(folder))
    return {"file_create_ms_first": costs[0], "file_create_ms_highest": max(costs), "file_create_ms": costs[-1],
            "settle_wait_s": round(time.monotonic() - started, 1)}


def _serve(conn: Connection) -> None:
    files = conn.recv()

    async def serve() -> None:
        async with Origin(files) as origin:
            conn.send(origin.url)
            await asyncio.Event().wait()

    asyncio.run(serve())


@contextlib.asynccontextmanager
async def origin_process(files: dict[str, bytes]) -> AsyncIterator[str]:
    """An `Origin` in a process of its own, so serving the images leaves the bench's event loop alone."""
    context = multiprocessing.get_context("spawn")
    mine, theirs = context.Pipe()
    process = context.Process(target=_serve, args=(theirs,), daemon=True)
    process.start()
    theirs.close()  # should the child die, send() and recv() here fail instead of waiting forever

    def handshake() -> str:
        mine.send(files)
        return str(mine.recv())

    try:
        yield await asyncio.to_thread(handshake)
    finally:
        process.terminate()
        process.join(10)
        mine.close()




def rss_kb(pid: int, field: str = "VmHWM") -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def descendants(pid: int) -> list[int]:
    """Every process below `pid`: the pool workers are children of the forkserver, not of the daemon."""
    found: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError:
        return found
    for task in tasks:
        try:
            kids = [int(p) for p in (task / "children").read_text().split()]
        except FileNotFoundError:
            continue
        for kid in kids:
            found += [kid, *descendants(kid)]
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def database_server_pids() -> list[int]:
    """The local PostgreSQL server's processes (its backends, WAL writer, checkpointer...), whoever they serve."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == "postgres":
                    pids.append(int(entry.name))
            except (FileNotFoundError, ProcessLookupError):
                continue
    return pids


def cpu_busy() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def csv_body(urls: list[str]) -> bytes:
    return ("S. No.,Product Name,Input Image Urls\n" + "".join(
        f"{i},Product {i},{url}\n" for i, url in enumerate(urls, start=1))).encode()


class Daemon:
    """`python -m daemon run` in `workdir` on a free loopback port; samples its memory until stopped. Its event log is
    `database` (a URL), by default a SQLite file in `workdir`."""

    def __init__(self, workdir: Path, workers: int, quality: int, database: str = "",
                 settings: dict[str, str] | None = None) -> None:
        self.workdir, self.workers, self.quality = workdir, workers, quality
        self.settings = settings or {}  # more IMGPIPE_* variables
        self.database = database or f"sqlite:///{workdir / 'imgpipe.db'}"
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.peak_main_kb = self.peak_pool_kb = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._sampler: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    async def __aenter__(self) -> Daemon:
        env = {
            **os.environ,
            "IMGPIPE_SERVER_PORT": str(self.port),
            "IMGPIPE_PATHS_INBOX": str(self.workdir / "inbox"),
            "IMGPIPE_PATHS_OUTBOX": str(self.workdir / "outbox"),
            "IMGPIPE_PATHS_IMAGES": str(self.workdir / "images"),
            "IMGPIPE_PATHS_DATABASE": self.database,
            "IMGPIPE_COMPRESS_WORKERS": str(self.workers),
            "IMGPIPE_COMPRESS_QUALITY": str(self.quality),
            "IMGPIPE_NETWORK_ALLOW_PRIVATE": "true",
            **self.settings,
        }
        with open(self.workdir / "daemon.log", "wb") as log:
            self._proc = subprocess.Popen([sys.executable, "-m", "daemon", "run"], cwd=self.workdir, env=env,
                                          stdout=log, stderr=subprocess.STDOUT)
        try:
            await self._wait_healthy()
        except BaseException:
            self._stop()
            raise
        self._sampler = asyncio.create_task(self._sample_forever())
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
        self.sample()
        self._stop()

    async def _wait_healthy(self) -> None:
        async with aiohttp.ClientSession() as client:
            for _ in range(300):
                if self._proc is not None and self._proc.poll() is not None:
                    break
                try:
                    async with client.get(f"{self.base}/healthz") as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        raise RuntimeError(f"the daemon did not start; see {self.workdir / 'daemon.log'}")

    def _stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            self._proc.wait(30)

    async def _sample_forever(self, interval: float = 0.25) -> None:
        # Each sample reads /proc for every thread and child of the daemon: 0.3 ms of the bench's CPU, taken from
        # the same two cores. The main process's peak is the kernel's high-water mark, so no sample can miss it.
        while True:
            self.sample()
            await asyncio.sleep(interval)

    def sample(self) -> None:
        """Main process: the kernel's high-water mark. Pool (forkserver, workers, resource tracker): summed RSS."""
        self.peak_main_kb = max(self.peak_main_kb, rss_kb(self.pid))
        self.peak_pool_kb = max(self.peak_pool_kb, sum(rss_kb(p, "VmRSS") for p in descendants(self.pid)))

    def memory(self) -> dict[str, float]:
        return {"daemon_peak_rss_mb": round(self.peak_main_kb / 1024, 1),
                "pool_rss_mb": round(self.peak_pool_kb / 1024, 1)}


@dataclass(frozen=True)
class CpuMark:
    at: float
    machine: tuple[int, int]
    processes: dict[int, float]


def cpu_mark() -> CpuMark:
    """Start a CPU-use window over the machine, this process with everything below it, and the database server."""
    me = os.getpid()
    return CpuMark(time.perf_counter(), cpu_busy(),
                   {p: cpu_seconds(p) for p in [me, *descendants(me), *database_server_pids()]})


def cpu_use(mark: CpuMark, daemon: int) -> dict[str, float]:
    """CPU use since `mark`, in cores: the daemon's main process, its pool, the bench (client and origin), the
    PostgreSQL server (all of it: with the SQLite backend, the database's work is in the daemon's main process), and
    whatever else ran on the machine meanwhile (other users: not 0 means the figures are disturbed)."""
    wall = time.perf_counter() - mark.at
    busy, total = cpu_busy()
    me, pool = os.getpid(), set(descendants(daemon))
    used = {"daemon_main": 0.0, "pool": 0.0, "bench": 0.0, "database_server": 0.0}
    for pid in [me, *descendants(me)]:
        part = "daemon_main" if pid == daemon else "pool" if pid in pool else "bench"
        used[part] += cpu_seconds(pid) - mark.processes.get(pid, 0.0)
    for pid in database_server_pids():
        used["database_server"] += cpu_seconds(pid) - mark.processes.get(pid, 0.0)
    share = (busy - mark.machine[0]) / max(total - mark.machine[1], 1)
    machine = share * (os.cpu_count() or 1)
    return {"machine_cpu_busy_pct": round(100 * share, 1),
            **{f"{part}_cpu_cores": round(seconds / wall, 2) for part, seconds in used.items()},
            "other_cpu_cores": round(machine - sum(used.values()) / wall, 2)}


async def upload(client: aiohttp.ClientSession, base: str, urls: list[str], webhook_url: str = "") -> dict[str, object]:
    """POST one CSV as text/csv (with a per-request webhook if given); returns the 202 body or raises."""
    async with client.post(f"{base}/upload", data=csv_body(urls), headers={"Content-Type": "text/csv"},
                           params={"webhook_url": webhook_url} if webhook_url else None) as r:
        body = await r.json()
        if r.status != 202:
            raise RuntimeError(f"upload answered {r.status}: {body}")
        return dict(body)
