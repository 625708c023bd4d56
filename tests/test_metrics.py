"""The consumer lag and backlog that /metrics reads at scrape time, on both backends."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from daemon.app import EVENTLOG
from daemon.ingest.accept import accept
from daemon.ingest.csvfile import Batch, parse_csv
from daemon.metrics import METRICS
from daemon.testing import Origin, daemon_app, drain, jpeg_bytes, photo, pipeline_settings, with_database


def lags(text: str) -> dict[str, float]:
    return {sample.labels["consumer"]: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name == "imgpipe_consumer_lag_events"}


async def test_consumer_lag_counts_the_events_each_consumer_has_left(tmp_path: Path, either_database_url: str) -> None:
    """Before the consumers run, each one's lag is the events of its own types that were appended (not every event);
    once they have run, every lag is 0."""
    async with Origin({"a.jpg": jpeg_bytes(photo(200, 200, seed=5))}) as origin:
        settings = pipeline_settings(tmp_path, **with_database(either_database_url, {}))
        async with daemon_app(settings) as app:
            batch = parse_csv((f'S. No.,Product Name,Input Image Urls\n1,P,"{origin.url}/img/a.jpg,'
                               f'{origin.url}/img/a.jpg?2,{origin.url}/img/a.jpg?3"\n').encode(), settings.limits)
            assert isinstance(batch, Batch)
            await accept(app[EVENTLOG], batch, "upload", "t.csv")
            before = lags((await app[METRICS].exposition()).decode())
            await drain(app)
            after = lags((await app[METRICS].exposition()).decode())
    # One RequestAccepted and three ImageRequested: the status view takes the first only, the download stage the
    # three images, the compress stage none of them.
    assert (before["view.status"], before["stage.download"], before["stage.compress"]) == (1, 3, 0)
    assert set(after.values()) == {0}
