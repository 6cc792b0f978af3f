"""Config loading: YAML defaults, environment overrides, validation messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.config import ConfigError, load_config, parse_duration, parse_size

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_defaults_serve_from_the_filesystem() -> None:
    config = load_config(ROOT / "config" / "app.yaml", environ={})
    assert config.storage.backend == "filesystem"
    assert config.storage.filesystem.root == "./data"
    assert config.storage.part_size == 6 * 1024 * 1024
    assert config.server.port == 8080
    assert config.auth.forward_headers == ("Authorization", "Cookie")
    assert config.storage.upload_ttl == 7 * 86400


def test_environment_overrides_nested_keys() -> None:
    config = load_config(
        ROOT / "config" / "app.yaml",
        environ={
            "APP__STORAGE__BACKEND": "s3",
            "APP__STORAGE__S3__BUCKET": "media",
            "APP__STORAGE__S3__ENDPOINT_URL": "http://127.0.0.1:9000",
            "APP__STORAGE__PART_SIZE": "8MiB",
            "APP__STORAGE__S3__CREATE_BUCKET": "true",
            "APP__AUTH__FORWARD_HEADERS": "Authorization, X-Api-Key",
            "APP__AUTH__CACHE_TTL": "5m",
            "PORT": "9999",
        },
    )
    assert config.storage.backend == "s3"
    assert config.storage.s3.bucket == "media"
    assert config.storage.s3.endpoint_url == "http://127.0.0.1:9000"
    assert config.storage.part_size == 8 * 1024 * 1024
    assert config.storage.s3.create_bucket is True
    assert config.auth.forward_headers == ("Authorization", "X-Api-Key")
    assert config.auth.cache_ttl == 300
    assert config.server.port == 9999


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"APP__STORAGE__BACKEND": "s3"}, "storage.s3.bucket: required"),
        ({"APP__STORAGE__BACKEND": "ftp"}, "storage.backend: 'ftp' is not one of"),
        ({"APP__STORAGE__PART_SIZE": "6 parsecs"}, "storage.part_size:"),
        ({"APP__STORAGE__PART_SIZE": "1MiB"}, "storage.part_size: S3 needs parts"),
        ({"APP__STORAGE__PART_SIZE": "100MiB"}, "storage.max_part_size: must be between"),
        ({"APP__STORAGE__MAX_PART_SIZE": "6GiB"}, "storage.max_part_size: must be between"),
        ({"APP__STORAGE__BUKET": "x"}, "storage.buket: unknown key"),
        ({"APP__SERVER__PORT": "http"}, "server.port: expected an integer"),
        ({"PORT": "70000"}, "server.port: 70000 is not a TCP port"),
        ({"APP__STORAGE__UPLOAD_TTL": "soon"}, "storage.upload_ttl:"),
        ({"APP__SERVER__PUBLIC_URL": "uploads.example.com"}, "server.public_url: must be an"),
        ({"APP__CALLBACKS__ON_COMPLETE_URL": "http://main/app"}, "callbacks.secret: required"),
        ({"APP__AUTH__WEBHOOK_URL": "main-app"}, "auth.webhook_url: must be"),
        ({"APP__STORAGE__S3__FSYNC": "true"}, "storage.s3.fsync: unknown key"),
        ({"APP__STORAGE__FILESYSTEM__FSYNC": "maybe"}, "storage.filesystem.fsync: expected true"),
    ],
)
def test_invalid_config_names_the_key(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(ROOT / "config" / "app.yaml", environ=environ)
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)


def test_missing_explicit_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml", environ={})


def test_yaml_that_is_not_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(path, environ={})


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0, 0), (5, 5), ("6MiB", 6 * 1024**2), ("5GB", 5 * 1000**3), ("1.5KiB", 1536), ("10", 10)],
)
def test_parse_size(value: object, expected: int) -> None:
    assert parse_size(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [(10, 10.0), ("10s", 10.0), ("5m", 300.0), ("24h", 86400.0), ("7d", 604800.0),
     ("250ms", 0.25)],
)
def test_parse_duration(value: object, expected: float) -> None:
    assert parse_duration(value) == expected


def test_cli_reports_bad_config_in_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "app", "--port", "1"],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "APP__STORAGE__BACKEND": "s3"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "configuration error: storage.s3.bucket: required when storage.backend is s3 "
        "(set it in the YAML or as APP__STORAGE__S3__BUCKET)"
    ]


def test_the_memory_budget_defaults_and_overrides() -> None:
    config = load_config(ROOT / "config" / "app.yaml", environ={})
    assert config.storage.memory_budget == 256 * 1024 * 1024
    assert config.storage.budget_wait == 30
    config = load_config(ROOT / "config" / "app.yaml", environ={
        "APP__STORAGE__MEMORY_BUDGET": "1GiB", "APP__STORAGE__BUDGET_WAIT": "2m"})
    assert config.storage.memory_budget == 1024**3
    assert config.storage.budget_wait == 120


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        # Less than one part: no upload could ever fill one.
        ({"APP__STORAGE__MEMORY_BUDGET": "5MiB"},
         "storage.memory_budget: 5MiB is less than one part (storage.part_size 6MiB)"),
        ({"APP__STORAGE__MEMORY_BUDGET": "40MiB", "APP__STORAGE__PART_SIZE": "64MiB",
          "APP__STORAGE__CHECKSUM_BUFFER": "1MiB"},
         "raise it to at least 64MiB"),
        # A body held for its checksum and the part it is written through.
        ({"APP__STORAGE__MEMORY_BUDGET": "32MiB"},
         "storage.checksum_buffer: 64MiB plus one part (6MiB) must fit in "
         "storage.memory_budget (32MiB)"),
        ({"APP__STORAGE__BUDGET_WAIT": "0s"}, "storage.budget_wait: must be positive"),
        ({"APP__STORAGE__MEMORY_BUDGET": "lots"}, "storage.memory_budget: 'lots' is not a size"),
    ],
)
def test_a_memory_budget_that_cannot_work_is_refused_at_start_up(environ, message) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(ROOT / "config" / "app.yaml", environ=environ)
    assert message in str(caught.value)


def test_a_budget_of_one_part_plus_the_checksum_buffer_is_enough() -> None:
    config = load_config(ROOT / "config" / "app.yaml", environ={
        "APP__STORAGE__MEMORY_BUDGET": "7MiB", "APP__STORAGE__CHECKSUM_BUFFER": "1MiB"})
    assert config.storage.memory_budget == 7 * 1024 * 1024
    with pytest.raises(ConfigError, match="checksum_buffer"):
        load_config(ROOT / "config" / "app.yaml", environ={
            "APP__STORAGE__MEMORY_BUDGET": "7MiB", "APP__STORAGE__CHECKSUM_BUFFER": "2MiB"})
