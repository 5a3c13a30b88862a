"""The text helpers the inspection views rely on (layerfs.text): one time format (RFC 3339,
UTC, Z, up to nanoseconds), offsets kept after a fraction, sizes read back; and --help
text on every option of the engine's own commands."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import click
import pytest

from layerfs.text import parse_rfc3339, parse_rfc3339_ns, parse_size, rfc3339, rfc3339_nano


@pytest.mark.parametrize(("text", "expected"), [
    ("2024-01-01T00:00:00.123456789+02:00", datetime(2023, 12, 31, 22, 0, 0, 123456, tzinfo=UTC)),
    ("2024-01-01T00:00:00.123-05:30", datetime(2024, 1, 1, 5, 30, 0, 123000, tzinfo=UTC)),
    ("2024-01-01T00:00:00.5Z", datetime(2024, 1, 1, 0, 0, 0, 500000, tzinfo=UTC)),
    ("2024-01-01T00:00:00Z", datetime(2024, 1, 1, tzinfo=UTC)),
    ("2024-01-01T02:00:00+02:00", datetime(2024, 1, 1, tzinfo=UTC)),
])
def test_parse_rfc3339_keeps_the_offset_after_a_fraction(text: str, expected: datetime) -> None:
    got = parse_rfc3339(text)
    assert got is not None and got.tzinfo is not None and got == expected


@pytest.mark.parametrize("text", ["", "yesterday", "2024-13-01T00:00:00Z", None, 5])
def test_parse_rfc3339_rejects(text: object) -> None:
    assert parse_rfc3339(text) is None and parse_rfc3339_ns(text) is None


def test_nanoseconds_round_trip() -> None:
    for text in ("2024-01-02T03:04:05.123456789Z", "2024-01-02T03:04:05.5Z", "2024-01-02T03:04:05Z"):
        ns = parse_rfc3339_ns(text)
        assert ns is not None and rfc3339_nano(ns) == text
    assert rfc3339_nano(parse_rfc3339_ns("2024-01-02T05:04:05.000000001+02:00") or 0) == "2024-01-02T03:04:05.000000001Z"


def test_rfc3339_is_the_nano_form_in_utc() -> None:
    assert rfc3339(datetime(2024, 6, 1, 10, 0, 0, 250000)) == "2024-06-01T10:00:00.25Z"
    assert rfc3339(datetime(2024, 6, 1, 12, tzinfo=timezone(timedelta(hours=2)))) == "2024-06-01T10:00:00Z"
    assert "+00:00" not in rfc3339(datetime.now(UTC))


@pytest.mark.parametrize(("text", "size"), [
    ("1000", 1000), ("20MB", 20_000_000), ("20 mb", 20_000_000), ("1.5GB", 1_500_000_000),
    ("3kB", 3000), ("3KB", 3000), ("512KiB", 524288), ("1GiB", 1 << 30), ("0", 0), ("7B", 7),
])
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "MB", "-1", "1 parsec", "1..2MB", "0x10"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_every_option_of_the_engines_commands_has_help() -> None:
    from layerfs.cli import cli

    missing = []
    checked = 0
    for name, cmd in cli.commands.items():
        if not (cmd.callback and cmd.callback.__module__ in {"layerfs.cli.images", "layerfs.cli.containers",
                                                             "layerfs.cli.inspect"}):
            continue
        checked += 1
        missing += [f"{name} {p.opts}" for p in cmd.params
                    if isinstance(p, click.Option) and not p.help and "--help" not in p.opts]
    assert checked >= 20 and not missing, (checked, missing)
