"""The complete stage on a real SQLite log: when it batches image events, and when it does not."""

from __future__ import annotations

import asyncio

from daemon.config import Settings
from daemon.eventlog.store import open_store
from daemon.events import ImageCompressed, Product, RequestAccepted, RequestCompleted
from daemon.stages.bodies import Bodies
from daemon.stages.complete import LAST_FEW, CompleteStage
from daemon.testing import eventually


def compressed(index: int) -> ImageCompressed:
    return ImageCompressed(product=0, index=index, name=f"r_0_{index}.jpg", format="JPEG", width=1, height=1,
                           bytes_in=2, bytes_out=1, quality=50, kept_original=False, note="")


async def test_a_requests_last_images_complete_it_without_waiting_out_the_linger(settings: Settings) -> None:
    """Once a request is down to its last few images, its RequestCompleted is not held back to be batched."""
    eventlog = open_store(settings.database_url)
    await eventlog.open()
    images = LAST_FEW + 2
    stage = CompleteStage(eventlog, Bodies(settings.path("images") / ".incoming", 4))
    stage.batch_window = 60.0  # type: ignore[misc]  # were it waited out, the test would time out
    task = asyncio.create_task(stage.run())
    try:
        urls = tuple(f"http://o/{i}.jpg" for i in range(images))
        await eventlog.append("r", [RequestAccepted(source="upload", source_name="t.csv",
                                                    products=(Product("1", "Shoe", "1", urls),))])
        for index in range(2):  # someone waiting for them cuts the batch_window short, so these are counted now
            assert await stage.wait_for(await eventlog.append("r", [compressed(index)]), timeout=10)
        await eventlog.append("r", [compressed(i) for i in range(2, images)])  # nobody waits for these

        async def completed() -> RequestCompleted | None:
            last = (await eventlog.read_stream("r"))[-1].event
            return last if isinstance(last, RequestCompleted) else None

        outcome = await eventually(completed, "the RequestCompleted", timeout=10)
        assert (outcome.status, outcome.done, outcome.failed) == ("completed", images, 0)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await eventlog.close()
