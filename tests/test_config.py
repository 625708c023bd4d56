"""Settings: defaults, config.toml, IMGPIPE_* overrides, and errors that name the offending key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from daemon.config import ConfigError, Settings, load_settings, replace


def write(folder: Path, text: str) -> Path:
    path = folder / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_without_a_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no config file and no environment, the documented defaults apply, paths relative to the cwd."""
    monkeypatch.chdir(tmp_path)
    settings = load_settings(None, env={})
    assert settings == Settings(base_dir=tmp_path)
    assert (settings.server.host, settings.server.port, settings.server.tokens) == ("127.0.0.1", 5000, ())
    assert settings.public_url == "http://127.0.0.1:5000"
    assert settings.limits.max_upload_bytes == 20 * 1024 * 1024
    assert (settings.limits.max_rows, settings.limits.max_cell_bytes) == (20_000, 65536)
    assert (settings.inbox.enabled, settings.inbox.settle_seconds) == (True, 5.0)
    assert settings.compress.job_timeout == 120.0
    assert settings.path("inbox") == tmp_path / "inbox"
    assert settings.path("images") == tmp_path / "compressed_images"
    assert settings.database_url == f"sqlite:///{tmp_path / 'imgpipe.db'}"


def test_shipped_config_toml_documents_the_defaults(helpers: Any) -> None:
    """The repository's config.toml sets every key to its default value."""
    path = helpers.root / "config.toml"
    assert load_settings(path, env={}) == Settings(base_dir=path.parent)


def test_load_settings_reads_config_toml_in_the_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a path, ./config.toml is read and relative paths resolve against its folder."""
    write(tmp_path, '[server]\nport = 7001\n[paths]\ninbox = "drop"\n')
    monkeypatch.chdir(tmp_path)
    settings = load_settings(None, env={})
    assert settings.server.port == 7001
    assert settings.path("inbox") == tmp_path / "drop"


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Relative paths and a relative SQLite URL resolve against the config file's folder, not the cwd."""
    etc = tmp_path / "etc"
    etc.mkdir()
    path = write(etc, '[paths]\ninbox = "in"\ndatabase = "sqlite:///data/log.db"\n')
    monkeypatch.chdir(tmp_path)
    settings = load_settings(path, env={})
    assert settings.path("inbox") == etc / "in"
    assert settings.database_url == f"sqlite:///{etc / 'data' / 'log.db'}"


def test_the_working_folder_is_outside_the_images_folder_by_default(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty paths.work is a dot-folder beside a SQLite file, else in the cache folder; a set one is relative
    to the config file like the other paths."""
    etc = tmp_path / "etc"
    etc.mkdir()
    beside = load_settings(write(etc, '[paths]\ndatabase = "sqlite:///data/log.db"\n'), env={})
    assert beside.path("work") == etc / "data" / ".imgpipe-work"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    server = load_settings(write(etc, '[paths]\ndatabase = "postgresql://db.internal/imgpipe"\n'), env={})
    assert server.path("work").parent == tmp_path / "cache" / "imgpipe"
    configured = load_settings(write(etc, '[paths]\nwork = "scratch"\n'), env={})
    assert configured.path("work") == etc / "scratch"


def test_environment_overrides(tmp_path: Path) -> None:
    """IMGPIPE_<SECTION>_<KEY> overrides the file; numbers, booleans and comma-separated lists are parsed."""
    path = write(tmp_path, '[server]\nport = 7000\ntokens = ["from-file"]\n[paths]\ninbox = "in"\n')
    settings = load_settings(path, env={
        "IMGPIPE_SERVER_PORT": "8080",
        "IMGPIPE_PATHS_INBOX": "/data/in",
        "IMGPIPE_SERVER_TOKENS": "alpha, beta,,gamma ",
        "IMGPIPE_WEBHOOKS_RETRY_SCHEDULE": "1,2.5,60",
        "IMGPIPE_INBOX_ENABLED": "false",
        "IMGPIPE_INBOX_SETTLE_SECONDS": "0.2",
        "IMGPIPE_WEBHOOKS_MAX_PAYLOAD_BYTES": "1000",
        "IMGPIPE_COMPRESS_JOB_TIMEOUT": "30",
        "UNRELATED": "ignored",
    })
    assert settings.server.port == 8080
    assert settings.public_url == "http://127.0.0.1:8080"
    assert settings.paths.inbox == "/data/in"
    assert settings.path("inbox") == Path("/data/in")
    assert settings.server.tokens == ("alpha", "beta", "gamma")
    assert settings.webhooks.retry_schedule == (1.0, 2.5, 60.0)
    assert settings.inbox.enabled is False
    assert settings.inbox.settle_seconds == 0.2
    assert settings.webhooks.max_payload_bytes == 1000
    assert settings.compress.job_timeout == 30.0


def test_replace_changes_only_the_named_keys(settings: Settings) -> None:
    """config.replace returns a copy with some keys of some sections changed and the rest kept."""
    changed = replace(settings, limits={"max_rows": 3}, inbox={"enabled": False})
    assert (changed.limits.max_rows, changed.inbox.enabled) == (3, False)
    assert changed.limits.max_cell_bytes == settings.limits.max_cell_bytes
    assert changed.paths == settings.paths
    assert (settings.limits.max_rows, settings.inbox.enabled) == (20_000, True)


@pytest.mark.parametrize(("text", "env", "key"), [
    ("", {"IMGPIPE_SERVER_PORT": "abc"}, "IMGPIPE_SERVER_PORT"),
    ("", {"IMGPIPE_SERVER_PORT": "70000"}, "server.port"),
    ("", {"IMGPIPE_INBOX_ENABLED": "maybe"}, "IMGPIPE_INBOX_ENABLED"),
    ("", {"IMGPIPE_LIMITS_MAX_ROWS": "-1"}, "limits.max_rows"),
    ("", {"IMGPIPE_WEBHOOKS_RETRY_SCHEDULE": "5,soon"}, "IMGPIPE_WEBHOOKS_RETRY_SCHEDULE"),
    ("", {"IMGPIPE_COMPRESS_QUALTY": "30"}, "IMGPIPE_COMPRESS_QUALTY"),
    ("", {"IMGPIPE_SERVER": "1"}, "IMGPIPE_SERVER"),
    ("[server]\nbogus = 1\n", {}, "server.bogus"),
    ("[bogus]\nx = 1\n", {}, "[bogus]"),
    ('[server]\nport = "five thousand"\n', {}, "server.port"),
    ("[server]\nport = 5000.5\n", {}, "server.port"),
    ("[limits]\nmax_rows = true\n", {}, "limits.max_rows"),
    ("[compress]\nquality = 0\n", {}, "compress.quality"),
    ("", {"IMGPIPE_WEBHOOKS_MAX_PAYLOAD_BYTES": "0"}, "webhooks.max_payload_bytes"),
    ('[webhooks]\nurls = ["ftp://hooks.example/x"]\n', {}, "webhooks.urls"),
    ("[compress]\njob_timeout = 0\n", {}, "compress.job_timeout"),
    ('[webhooks]\nsecret = "changeme1"\n', {}, "webhooks.secret: not a usable secret"),
    ("", {"IMGPIPE_DOWNLOAD_CONNECT_TIMEOUT": "0"}, "download.connect_timeout: must be above 0 seconds"),
    ("[download]\ntotal_timeout = 0\n", {}, "download.total_timeout: must be above 0 seconds"),
    ("[webhooks]\ntimeout = nan\n", {}, "webhooks.timeout: must be a finite number, got nan"),
    ("[compress]\njob_timeout = inf\n", {}, "compress.job_timeout: must be a finite number, got inf"),
    ("", {"IMGPIPE_WEBHOOKS_RETRY_SCHEDULE": "5,nan"}, "webhooks.retry_schedule: must be a finite number"),
    ("[server]\nport = 0\n", {}, "server.port: must be 1..65535, got 0"),
    ('[server]\ntokens = ["alpha", ""]\n', {}, "server.tokens: an empty token would let in anyone"),
    ("", {"IMGPIPE_SERVER_TOKENS": " "}, "IMGPIPE_SERVER_TOKENS: expected list, got ' '"),
    ("", {"IMGPIPE_WEBHOOKS_URLS": " , "}, "IMGPIPE_WEBHOOKS_URLS: expected list, got ' , '"),
    ("", {"IMGPIPE_WEBHOOKS_SECRET": "whsec_"}, "webhooks.secret: not a usable secret (webhook secret may not be empty)"),
    ('[webhooks]\ninbound_secret = "whsec_abcde"\n', {}, "webhooks.inbound_secret: not a usable secret"),
])
def test_bad_values_raise_config_error_naming_the_key(tmp_path: Path, text: str, env: dict[str, str],
                                                      key: str) -> None:
    """A wrong type, range or unknown key raises ConfigError whose message names that key."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path, env=env)
    assert key in str(caught.value)


@pytest.mark.parametrize(("text", "env", "refused"), [
    ('[webhooks]\nurls = ["https://hooks.example/x", "http://127.0.0.1:9000/hook"]\n', {},
     "refused to connect: 127.0.0.1, a loopback address"),
    ("", {"IMGPIPE_WEBHOOKS_URLS": "http://localhost:9000/hook"},
     "refused to connect: localhost resolves to 127.0.0.1, a loopback address"),
    ('[webhooks]\nurls = ["http://192.168.1.20/hook"]\n', {}, "refused to connect: 192.168.1.20, a private address"),
])
def test_a_configured_listener_on_an_internal_host_is_refused_at_start(tmp_path: Path, text: str,
                                                                       env: dict[str, str], refused: str) -> None:
    """A webhooks.urls entry on a blocked literal address or a localhost name raises ConfigError naming the key
    and the reason, unless [network] lets it through."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path, env=env)
    assert str(caught.value).startswith(f"config key webhooks.urls: {refused}")
    assert "allow_private = true" in str(caught.value)
    allowed = load_settings(path, env={**env, "IMGPIPE_NETWORK_ALLOW_PRIVATE": "true"})
    assert allowed.webhooks.urls and allowed.network.allow_private


@pytest.mark.parametrize(("text", "env", "message"), [
    ("[compress]\nqualty = 30\n", {}, "config key compress.qualty: unknown setting; did you mean compress.quality?"),
    ("", {"IMGPIPE_COMPRESS_QUALTY": "30"},
     "config key IMGPIPE_COMPRESS_QUALTY: unknown setting; did you mean IMGPIPE_COMPRESS_QUALITY?"),
    ("", {"IMGPIPE_COMPRES_QUALITY": "30"},
     "config key IMGPIPE_COMPRES_QUALITY: unknown setting; did you mean IMGPIPE_COMPRESS_QUALITY?"),
    ("", {"IMGPIPE_compress_quality": "30"},
     "config key IMGPIPE_compress_quality: unknown setting; did you mean IMGPIPE_COMPRESS_QUALITY?"),
    ("[inbox]\nzzz = 1\n", {}, "config key inbox.zzz: unknown setting; valid keys of [inbox]: settle_seconds, enabled"),
    ("", {"IMGPIPE_INBOX_ZZZ": "1"},
     "config key IMGPIPE_INBOX_ZZZ: unknown setting; valid keys of [inbox]: settle_seconds, enabled"),
    ("[compres]\nquality = 30\n", {}, "config section [compres]: unknown section; did you mean [compress]?"),
])
def test_unknown_names_are_refused_with_the_closest_valid_one(tmp_path: Path, text: str, env: dict[str, str],
                                                               message: str) -> None:
    """An unknown key, section or IMGPIPE_* variable is refused, offering the closest valid name or the valid keys."""
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, text), env=env)
    assert str(caught.value) == message


def test_variables_outside_the_imgpipe_prefix_are_left_alone(tmp_path: Path) -> None:
    """Only IMGPIPE_* variables are settings: others, even ones that look alike, are not checked."""
    settings = load_settings(write(tmp_path, ""), env={"IMGPIPE": "x", "imgpipe_compress_qualty": "x",
                                                       "MY_IMGPIPE_COMPRESS_QUALTY": "x"})
    assert settings.compress.quality == 50


def test_bad_toml_raises_config_error_naming_the_file(tmp_path: Path) -> None:
    """A file that is not TOML raises ConfigError naming the file and the line of the error."""
    path = write(tmp_path, "[server]\nport = 5000\nhost = \n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path, env={})
    assert str(path) in str(caught.value)
    assert "line 3" in str(caught.value)


def test_missing_config_file_raises_config_error(tmp_path: Path) -> None:
    """An explicit config path that does not exist raises ConfigError naming it."""
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="nope.toml"):
        load_settings(path, env={})


def test_imgpipe_run_with_a_bad_environment_value_exits_naming_the_key(tmp_path: Path, helpers: Any) -> None:
    """`imgpipe run` with IMGPIPE_SERVER_PORT=abc exits non-zero at once with the key on stderr."""
    result = helpers.run_imgpipe("run", cwd=tmp_path, env={"IMGPIPE_SERVER_PORT": "abc"}, timeout=30)
    assert result.returncode != 0
    assert "IMGPIPE_SERVER_PORT" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_imgpipe_run_with_a_misspelt_environment_variable_exits_naming_it(tmp_path: Path, helpers: Any) -> None:
    """`imgpipe run` with IMGPIPE_COMPRESS_QUALTY=30 exits 2 before starting, naming it and the right spelling."""
    result = helpers.run_imgpipe("run", cwd=tmp_path, env={"IMGPIPE_COMPRESS_QUALTY": "30"}, timeout=30)
    assert result.returncode == 2
    assert result.stderr == ("imgpipe: config key IMGPIPE_COMPRESS_QUALTY: unknown setting; "
                             "did you mean IMGPIPE_COMPRESS_QUALITY?\n")
    assert result.stdout == ""


def test_imgpipe_run_with_an_unknown_key_in_the_file_exits_naming_the_key(tmp_path: Path, helpers: Any) -> None:
    """`imgpipe --config FILE run` with an unknown key in FILE exits non-zero naming section.key on stderr."""
    path = write(tmp_path, "[inbox]\nsettle = 2\n")
    result = helpers.run_imgpipe("--config", str(path), "run", cwd=tmp_path, timeout=30)
    assert result.returncode != 0
    assert "inbox.settle" in result.stderr
    assert "Traceback" not in result.stderr


def test_sqlite_durability_takes_normal_or_full() -> None:
    """paths.sqlite_synchronous is "normal" by default, may be "full", and anything else stops start-up naming it."""
    assert load_settings(None, env={}).paths.sqlite_synchronous == "normal"
    assert load_settings(None, env={"IMGPIPE_PATHS_SQLITE_SYNCHRONOUS": "full"}).paths.sqlite_synchronous == "full"
    with pytest.raises(ConfigError, match='paths.sqlite_synchronous: must be "normal" or "full", got \'off\''):
        load_settings(None, env={"IMGPIPE_PATHS_SQLITE_SYNCHRONOUS": "off"})


def test_quality_targets_are_one_or_the_other(tmp_path: Path, helpers: Any) -> None:
    """target_ssim takes 0..1 and a score to aim at; with target_ratio also set `imgpipe run` refuses to start."""
    assert load_settings(None, env={"IMGPIPE_COMPRESS_TARGET_SSIM": "0.95"}).compress.target_ssim == 0.95
    with pytest.raises(ConfigError, match=r"compress.target_ssim: must be 0 \(off\) or up to 1, got 1.5"):
        load_settings(None, env={"IMGPIPE_COMPRESS_TARGET_SSIM": "1.5"})
    with pytest.raises(ConfigError, match=r"compress.target_ssim: needs compress.ssim = true"):
        load_settings(None, env={"IMGPIPE_COMPRESS_TARGET_SSIM": "0.9", "IMGPIPE_COMPRESS_SSIM": "false"})
    path = write(tmp_path, "[compress]\ntarget_ssim = 0.95\ntarget_ratio = 0.5\n")
    result = helpers.run_imgpipe("--config", str(path), "run", cwd=tmp_path, timeout=30)
    assert result.returncode != 0
    assert "compress.target_ssim and compress.target_ratio: set one or the other" in result.stderr
    assert "Traceback" not in result.stderr
