"""Medians with min-max, the table, the ratio line and the targets of issue #11."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .common import median
from .runs import RunResult


@dataclass
class Stat:
    median: float
    low: float
    high: float
    n: int

    def cell(self, fmt: str) -> str:
        if self.n == 1:
            return format(self.median, fmt)
        return f"{self.median:{fmt}} ({self.low:{fmt}}-{self.high:{fmt}})"


def stat(runs: list[RunResult], get: Callable[[RunResult], float | None]) -> Stat | None:
    values = [v for r in runs if r.ok and (v := get(r)) is not None]
    if not values:
        return None
    return Stat(median(values), min(values), max(values), len(values))


@dataclass
class Row:
    key: str
    runs: list[RunResult]

    @property
    def label(self) -> str:
        return self.runs[0].label if self.runs else self.key

    def stat(self, name: str) -> Stat | None:
        getters: dict[str, Callable[[RunResult], float | None]] = {
            "mb_s": lambda r: r.mb_s,
            "wall_s": lambda r: r.wall_s or None,
            "cpu": lambda r: r.cpu_per_gib,
            "rss": lambda r: r.peak_rss_mib,
            "s3": lambda r: r.s3_per_request,
            "s3w": lambda r: r.s3_writes_per_request,
            "probe": lambda r: r.probe_s3,
        }
        return stat(self.runs, getters[name])

    def ops(self) -> dict[str, float]:
        """Median S3 calls per client request, by operation."""
        good = [r for r in self.runs if r.ok and r.s3_ops is not None and r.units]
        names = sorted({op for r in good for op in (r.s3_ops or {})})
        return {op: median([(r.s3_ops or {}).get(op, 0) / r.units for r in good])
                for op in names}

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "runs": [r.to_json() for r in self.runs],
                "median": {k: (s.median if (s := self.stat(k)) else None)
                           for k in ("mb_s", "wall_s", "cpu", "rss", "s3", "s3w", "probe")},
                "s3_ops_per_request": self.ops()}


def _c(s: Stat | None, fmt: str) -> str:
    return "-" if s is None else s.cell(fmt)


def table(rows: list[Row]) -> list[str]:
    w = max([44, *(len(row.label) for row in rows)])
    head = (f"{'run':<{w}} {'MB/s':>15} {'CPU-s/GiB':>17} {'S3/chunk (writes)':>18} "
            f"{'peak RSS MiB':>14}  ok")
    out = [head, "-" * len(head)]
    for row in rows:
        ok = all(r.ok for r in row.runs)
        s3, s3w = row.stat("s3"), row.stat("s3w")
        calls = "-" if s3 is None or s3w is None else f"{s3.median:.2f} ({s3w.median:.2f})"
        if s3 is not None and row.runs and row.runs[0].per_part:
            calls = "/part " + calls
        out.append(f"{row.label:<{w}} {_c(row.stat('mb_s'), '.0f'):>15} "
                   f"{_c(row.stat('cpu'), '.2f'):>17} {calls:>18} "
                   f"{_c(row.stat('rss'), '.0f'):>14}  {'ok' if ok else 'FAILED'}")
    out.append("")
    for row in rows:
        ops = row.ops()
        if ops and row.key.startswith("s3"):
            probe = row.stat("probe")
            per = "part" if row.runs[0].per_part else "chunk"
            text = ", ".join(f"{op} {n:.2f}" for op, n in ops.items())
            out.append(f"  {row.label}: S3 calls per {per}: {text}"
                       + (f"; per probe {probe.median:g}" if probe else ""))
    return out


def ratio(a: Stat | None, b: Stat | None) -> float | None:
    return a.median / b.median if a and b and b.median else None


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def summary(rows: dict[str, Row], peer_against: str) -> tuple[str, list[str]]:
    """The ratio line and one line per target of issue #11."""
    floor, direct = rows.get("floor"), rows.get("direct")
    plain, c8 = rows.get("s3_plain"), rows.get("s3_c8")
    c8a, c1 = rows.get("s3_c8_p8"), rows.get("s3_c1")
    peer, ours = rows.get("peer"), rows.get(peer_against)

    def st(row: Row | None, name: str) -> Stat | None:
        return row.stat(name) if row else None

    cpu_floor = fmt_ratio(ratio(st(plain, "cpu"), st(floor, "cpu")))
    line = (f"ratios (CPU-s/GiB, medians): proxy/floor {cpu_floor}"
            f", proxy/direct {fmt_ratio(ratio(st(plain, 'cpu'), st(direct, 'cpu')))}"
            f" (wall {fmt_ratio(ratio(st(plain, 'wall_s'), st(direct, 'wall_s')))})"
            f", peer/proxy {fmt_ratio(ratio(st(peer, 'cpu'), st(ours, 'cpu')))}"
            f" (against {ours.label if ours else peer_against})")
    targets: list[str] = []

    def check(name: str, value: float | None, limit: float, below: bool = True,
              unit: str = "") -> None:
        if value is None:
            targets.append(f"  {name}: not measured")
            return
        met = value <= limit if below else value >= limit
        sign = "<=" if below else ">="
        verdict = "met" if met else f"MISSED by {abs(value / limit - 1) * 100:.0f}%"
        targets.append(f"  {name}: {value:.2f}{unit} (target {sign} {limit:g}{unit}): {verdict}")

    def med(row: Row | None, name: str) -> float | None:
        s = st(row, name)
        return s.median if s else None

    check("S3 plain PUT CPU-s/GiB", med(plain, "cpu"), 1.2)
    check("S3 8 MiB chunks CPU-s/GiB", med(c8, "cpu"), 1.5)
    check("S3 requests per aligned 8 MiB chunk (part_size 8 MiB; 1 write + record)",
          med(c8a, "s3"), 2.0)
    check("S3 requests per unaligned 8 MiB chunk (part_size 6 MiB)", med(c8, "s3"), 3.0)
    check("S3 requests per 1 MiB chunk", med(c1, "s3"), 3.0)
    check("S3 requests per probe", med(c8, "probe"), 1.0)
    check("plain PUT wall / direct wall", ratio(st(plain, "wall_s"), st(direct, "wall_s")),
          1.05, unit="x")
    check("peer CPU / ours", ratio(st(peer, "cpu"), st(ours, "cpu")), 8.0, below=False,
          unit="x")
    return line, targets
