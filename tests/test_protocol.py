"""Table-driven tests of the pure wire helpers."""

from __future__ import annotations

import pytest

from app.core.protocol import (
    MAX_PARTS,
    MIB,
    Chunk,
    Probe,
    choose_part_size,
    format_range,
    parse_content_range,
    parse_length,
    validate_name,
)
from app.errors import InvalidContentRange, InvalidName, TooLarge


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("bytes */*", Probe(None)),
        ("bytes */0", Probe(0)),
        ("bytes */1000", Probe(1000)),
        ("bytes 0-0/1", Chunk(0, 0, 1)),
        ("bytes 0-99/100", Chunk(0, 99, 100)),
        ("bytes 100-199/*", Chunk(100, 199, None)),
        ("bytes 5-5/*", Chunk(5, 5, None)),
        (" bytes 0-9/10 ", Chunk(0, 9, 10)),
    ],
)
def test_parse_content_range_valid(header: str, expected: Probe | Chunk) -> None:
    assert parse_content_range(header) == expected


@pytest.mark.parametrize(
    "header",
    [
        "",
        "bytes",
        "bytes ",
        "bits 0-9/10",
        "Bytes 0-9/10",
        "bytes 0-9",
        "bytes 0-9/",
        "bytes -1-9/10",
        "bytes 0--9/10",
        "bytes 9-0/10",
        "bytes 0-10/10",
        "bytes 0-9/5",
        "bytes a-b/10",
        "bytes 0-9/10x",
        "bytes 0-9/10, bytes 10-19/20",
        "bytes 0-9/ 10",
        "bytes 01-9/10",
        "bytes 0-9/-1",
        "bytes */",
        "bytes */-1",
        "bytes **/*",
        "bytes 0x10-0x20/100",
        "bytes 0-99999999999999999999/*",
        "bytes 1.5-2/10",
    ],
)
def test_parse_content_range_malformed(header: str) -> None:
    with pytest.raises(InvalidContentRange) as info:
        parse_content_range(header)
    assert info.value.status == 400
    assert info.value.body()["error"] == "invalid_content_range"


@pytest.mark.parametrize(("offset", "expected"), [(0, None), (1, "bytes=0-0"), (100, "bytes=0-99")])
def test_format_range(offset: int, expected: str | None) -> None:
    assert format_range(offset) == expected


@pytest.mark.parametrize(("value", "expected"), [(None, None), ("0", 0), ("123", 123), (" 7 ", 7)])
def test_parse_length_valid(value: str | None, expected: int | None) -> None:
    assert parse_length(value, "Content-Length") == expected


@pytest.mark.parametrize("value", ["-1", "abc", "1e3", "", "01", "1 2"])
def test_parse_length_invalid(value: str) -> None:
    with pytest.raises(InvalidContentRange):
        parse_length(value, "X-Upload-Content-Length")


@pytest.mark.parametrize(
    "name",
    ["a", "videos/a.mp4", "with space.txt", "ünïcödé/ファイル", "a/b/c/d", "..a", "a..", ".hidden",
     "x" * 1024],
)
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "/abs", "..", ".", "a/../b", "a/./b", "../x", "a/..", "a//b", "a/", "nul\x00byte",
     "tab\tname", "del\x7f", "x" * 1025, "é" * 513, ".uploads/x", ".uploads"],
)
def test_invalid_names(name: str) -> None:
    with pytest.raises(InvalidName):
        validate_name(name)


GIB = 1024 * MIB


@pytest.mark.parametrize(
    ("total", "expected"),
    [
        (None, 6 * MIB),
        (0, 6 * MIB),
        (6 * MIB * MAX_PARTS, 6 * MIB),
        (6 * MIB * MAX_PARTS + 1, 7 * MIB),
        (100 * GIB, 11 * MIB),
        (5 * 1024 * GIB, 525 * MIB),
    ],
)
def test_choose_part_size(total: int | None, expected: int) -> None:
    part = choose_part_size(total, 6 * MIB)
    assert part == expected
    if total:
        assert -(-total // part) <= MAX_PARTS


def test_choose_part_size_refuses_more_than_s3_holds() -> None:
    with pytest.raises(TooLarge):
        choose_part_size(50 * 1024 * GIB, 6 * MIB)
