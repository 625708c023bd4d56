"""The SSRF guard: internal addresses are refused after resolution, on every redirect hop, for images and webhooks."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from daemon.app import EVENTLOG
from daemon.config import ConfigError, NetworkSettings, load_settings
from daemon.http_api import SETTINGS
from daemon.ingest.accept import accept
from daemon.ingest.csvfile import Batch, parse_csv
from daemon.network import AddressPolicy
from daemon.testing import (
    Listener,
    Origin,
    daemon_app,
    drain,
    jpeg_bytes,
    photo,
    pipeline_settings,
)
from daemon.views.status import request_status


@pytest.fixture
async def origin() -> AsyncIterator[Origin]:
    async with Origin({"a.jpg": jpeg_bytes(photo(200, 200, seed=1))}) as server:
        yield server


async def run_batch(tmp_path: Path, urls: list[str], **sections: Any) -> dict[str, Any]:
    settings = pipeline_settings(tmp_path, **sections)
    async with daemon_app(settings) as app:
        batch = parse_csv(("S. No.,Product Name,Input Image Urls\n1,P,\"" + ",".join(urls) + "\"\n").encode(),
                          settings.limits)
        assert isinstance(batch, Batch)
        accepted = await accept(app[EVENTLOG], batch, "upload", "t.csv")
        await drain(app)
        body = await app[EVENTLOG].query(request_status, accepted.request_id, app[SETTINGS].public_url)
    assert body is not None
    return body


def errors(body: dict[str, Any]) -> list[str | None]:
    return [image["error"] for product in body["products"] for image in product["images"]]


async def test_internal_targets_are_refused_by_default(tmp_path: Path, origin: Origin) -> None:
    """A name resolving to 127.0.0.1 and a literal [::1] fail with a clear error, and no request reaches them."""
    port = origin.url.rsplit(":", 1)[1]
    body = await run_batch(tmp_path, [f"http://localhost:{port}/img/a.jpg", f"http://[::1]:{port}/img/a.jpg"],
                           network={"allow_private": False})
    by_name, v6 = errors(body)
    assert by_name == ("download failed: refused to connect: localhost resolves to 127.0.0.1, a loopback address "
                       "(set [network] allow_private = true or list it in [network] allow)")
    assert v6 is not None and "::1, a loopback address" in v6
    assert body["status"] == "failed" and sum(origin.hits.values()) == 0


async def test_a_redirect_hop_to_the_metadata_address_is_refused(tmp_path: Path, origin: Origin) -> None:
    """An allowed origin that redirects to 169.254.169.254 gets the hop refused; the origin itself works."""
    body = await run_batch(tmp_path, [f"{origin.url}/to?url=http://169.254.169.254/latest/meta-data/",
                                      f"{origin.url}/img/a.jpg"],
                           network={"allow_private": False, "allow": ("127.0.0.1/32",)})
    metadata, allowed = errors(body)
    assert metadata is not None and "169.254.169.254, a link-local address" in metadata
    assert allowed is None
    assert origin.hits["/to"] == 1 and origin.hits["/img/a.jpg"] == 1


async def test_allow_private_lifts_the_guard(tmp_path: Path, origin: Origin) -> None:
    """With allow_private the same loopback origin is fetched normally."""
    port = origin.url.rsplit(":", 1)[1]
    body = await run_batch(tmp_path, [f"http://localhost:{port}/img/a.jpg"], network={"allow_private": True})
    assert errors(body) == [None] and body["status"] == "completed"


async def test_webhook_listeners_are_guarded_too(tmp_path: Path, origin: Origin) -> None:
    """A listener whose name resolves to a loopback address is refused like an image URL, and the delivery fails
    at once with the refusal: no retry could be let through."""
    async with Listener([200]) as listener:
        body = await run_batch(tmp_path, [f"{origin.url}/img/a.jpg"], network={"allow_private": False},
                               webhooks={"urls": (listener.url.replace("127.0.0.1", "localhost"),),
                                         "retry_schedule": (0.05, 0.05, 0.05)})
    (delivery,) = body["webhooks"]
    (attempt,) = delivery["attempts"]
    assert delivery["state"] == "failed" and attempt["outcome"] == "failed" and attempt["retry_in"] is None
    assert attempt["error"] == ("refused to connect: localhost resolves to 127.0.0.1, a loopback address "
                                "(set [network] allow_private = true or list it in [network] allow)")
    assert listener.received == []


@pytest.mark.parametrize(("url", "refused"), [
    ("http://127.0.0.1:8080/hook", "127.0.0.1, a loopback"), ("http://[::1]/hook", "::1, a loopback"),
    ("https://10.0.0.7/hook", "10.0.0.7, a private"), ("http://169.254.169.254/", "169.254.169.254, a link-local"),
    ("http://localhost:8080/hook", "localhost resolves to 127.0.0.1"),
    ("http://LOCALHOST./hook", "localhost resolves to 127.0.0.1"),
    ("http://hooks.localhost/x", "hooks.localhost resolves to 127.0.0.1"),
    ("http://127.1/hook", "127.1 resolves to 127.0.0.1"), ("http://2130706433/hook", "resolves to 127.0.0.1"),
    ("http://93.184.216.34/hook", None), ("http://hooks.example.com/x", None), ("http://localhost.example/x", None),
])
def test_urls_naming_an_internal_host_are_refused_without_a_lookup(url: str, refused: str | None) -> None:
    """A literal internal address (also IPv4 shorthand) or a localhost name is refused from the URL alone;
    other names are left to the check at connect time."""
    reason = AddressPolicy(NetworkSettings()).url_refusal(url)
    assert (reason is None) if refused is None else (reason is not None and refused in reason)
    assert AddressPolicy(NetworkSettings(allow_private=True)).url_refusal(url) is None
    assert AddressPolicy(NetworkSettings(allow=("127.0.0.0/8", "::1", "10.0.0.0/8", "169.254.0.0/16"))
                         ).url_refusal(url) is None


@pytest.mark.parametrize(("address", "refused"), [
    ("127.0.0.1", "loopback"), ("10.1.2.3", "private"), ("172.20.0.1", "private"), ("192.168.1.1", "private"),
    ("169.254.169.254", "link-local"), ("fe80::1", "link-local"), ("fd00::1", "private"), ("224.0.0.1", "multicast"),
    ("0.0.0.0", "unspecified"), ("::ffff:127.0.0.1", "loopback"), ("93.184.216.34", None), ("2606:4700::1", None),
    ("64:ff9b::a00:5", "private"), ("2002:a00:5::1", "private"), ("198.18.0.1", "reserved"),
    ("2001:db8::1", "reserved"),
])
def test_policy_classifies_addresses(address: str, refused: str | None) -> None:
    """Every internal range is refused with its kind named; public addresses pass."""
    reason = AddressPolicy(NetworkSettings()).refusal("example.test", address)
    assert (reason is None) if refused is None else (reason is not None and f"a {refused} address" in reason)


@pytest.mark.parametrize(("url", "refused"), [
    ("http://127.0.0.1:8080/x", None), ("http://127.1/x", None), ("http://[::1]/x", None),
    ("http://[::ffff:127.0.0.1]/x", None), ("http://localhost:8080/x", None), ("http://hooks.localhost/x", None),
    ("http://img.internal/x", None),  # listed in allow: looked up, and must then resolve to loopback
    ("http://10.0.0.7/x", "10.0.0.7, not a loopback address"),
    ("http://93.184.216.34/x", "93.184.216.34, not a loopback address"),
    ("http://hooks.example.com/x", "hooks.example.com is not looked up"),
])
def test_loopback_only_refuses_everything_but_loopback(url: str, refused: str | None) -> None:
    """With loopback_only, only loopback targets pass, whatever allow_private and allow say, and a name other than
    localhost (or one listed in allow) is refused before any lookup."""
    policy = AddressPolicy(NetworkSettings(loopback_only=True, allow_private=True,
                                           allow=("img.internal", "10.0.0.0/8", "93.184.216.0/24")))
    reason = policy.url_refusal(url)
    assert (reason is None) if refused is None else (reason is not None and refused in reason
                                                     and "[network] loopback_only = true" in reason)
    assert policy.name_refusal("img.internal") is None
    assert policy.refusal("img.internal", "10.1.2.3") is not None  # an allowed name resolving elsewhere still fails


async def test_loopback_only_daemon_fetches_from_loopback_and_nothing_else(tmp_path: Path, origin: Origin) -> None:
    """A batch under loopback_only gets its loopback image and fails the others with the reason, without a request
    reaching anyone: a private address, a public one, a public name, and a redirect from loopback to a public name."""
    body = await run_batch(tmp_path, [f"{origin.url}/img/a.jpg", "http://10.255.255.1/a.jpg",
                                      "http://93.184.216.34/a.jpg", "http://images.example.com/a.jpg",
                                      f"{origin.url}/to?url=http://images.example.com/a.jpg"],
                           network={"loopback_only": True, "allow_private": True})
    fetched, private, public, name, redirected = errors(body)
    assert fetched is None
    assert private == ("download failed: refused to connect: 10.255.255.1, not a loopback address "
                       "([network] loopback_only = true)")
    assert public is not None and "93.184.216.34, not a loopback address" in public
    for error in (name, redirected):
        assert error == ("download failed: refused to connect: images.example.com is not looked up, only loopback "
                         "addresses are allowed ([network] loopback_only = true)")
    assert origin.hits["/img/a.jpg"] == 1 and origin.hits["/to"] == 1


def test_loopback_only_is_a_setting_like_the_others(tmp_path: Path) -> None:
    """`IMGPIPE_NETWORK_LOOPBACK_ONLY` sets it, and a configured listener it would refuse stops start-up."""
    assert load_settings(env={"IMGPIPE_NETWORK_LOOPBACK_ONLY": "true"}).network.loopback_only
    assert not load_settings(env={}).network.loopback_only
    config = tmp_path / "config.toml"
    config.write_text('[network]\nloopback_only = true\n[webhooks]\nurls = ["https://hooks.example.com/x"]\n',
                      encoding="utf-8")
    with pytest.raises(ConfigError, match="webhooks.urls: refused to connect: hooks.example.com is not looked up"):
        load_settings(config, env={})
