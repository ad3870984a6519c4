"""The soak suite's figures: per-part results, process RSS, and the table printed at the end."""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field

MIB = 1 << 20
BAD_CODES = ("UNKNOWN", "INTERNAL")  # statuses that mean the server did not know what went wrong


def rss_bytes(pid: int) -> int:
    """Resident set size of a process from /proc (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass
class RssSample:
    process: str
    before: int  # bytes, after a warm-up round
    after: int

    @property
    def drift(self) -> int:
        return self.after - self.before

    def text(self) -> str:
        return f"{self.before / MIB:.0f} -> {self.after / MIB:.0f} MiB ({self.drift / MIB:+.1f})"


@dataclass
class FuzzResult:
    """What one target (an RPC of a process, or its UDP port) did with the mutated messages."""

    target: str  # e.g. "shard Forward", "dht udp"
    process: str  # name of the process it ran on
    cases: int = 0
    statuses: Counter[str] = field(default_factory=Counter)  # gRPC code name (or UDP reply kind) -> count
    bad: Counter[str] = field(default_factory=Counter)  # kind of UNKNOWN/INTERNAL/unclear status -> count
    examples: dict[str, str] = field(default_factory=dict)  # kind -> the mutation label of its first case
    unclear: int = 0  # error statuses without a message
    crashed: bool = False
    notes: list[str] = field(default_factory=list)  # target-specific checks (e.g. amplification)

    @property
    def bad_count(self) -> int:
        return sum(self.statuses[c] for c in BAD_CODES)

    def problems(self) -> list[str]:
        out = []
        if self.crashed:
            out.append(f"{self.target}: {self.process} crashed")
        if self.bad_count:
            kinds = "; ".join(f"{n}x {kind}" for kind, n in self.bad.most_common(3))
            out.append(f"{self.target}: {self.bad_count} UNKNOWN/INTERNAL statuses: {kinds}")
        if self.unclear:
            out.append(f"{self.target}: {self.unclear} error statuses without a message")
        return out + [n for n in self.notes if n.startswith("FAIL")]


@dataclass
class FaultResult:
    injected: Counter[str] = field(default_factory=Counter)  # "server kill", "dht-node kill", "server restart"
    survived: int = 0
    faults: int = 0
    requests: Counter[str] = field(default_factory=Counter)  # "generate ok", "train ok", "generate failed"...
    failures: list[str] = field(default_factory=list)  # per kind of failure: count and the first one
    failure_kinds: Counter[str] = field(default_factory=Counter)
    failovers: int = 0
    seconds: float = 0.0
    events: list[str] = field(default_factory=list)  # the fault schedule as it ran (printed on failure)

    def problems(self) -> list[str]:
        out = [f"faults: {f}" for f in self.failures[:8]]
        if self.survived < self.faults:
            out.append(f"faults: {self.faults - self.survived} of {self.faults} faults had a failed request")
        return out


@dataclass
class LoadResult:
    clients: int = 0
    seconds: float = 0.0
    generations: int = 0
    tokens: int = 0
    errors: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)  # sessions or cache bytes not returned afterwards
    after: list[str] = field(default_factory=list)  # per server: what Info/metrics show afterwards

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def problems(self) -> list[str]:
        return [f"load: {e}" for e in self.errors[:10]] + [f"load: {leak}" for leak in self.leaks]


@dataclass
class SoakReport:
    mode: str
    fuzz: list[FuzzResult] = field(default_factory=list)
    rss: list[RssSample] = field(default_factory=list)
    faults: FaultResult | None = None
    load: LoadResult | None = None
    extra_problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # figures that are not pass/fail (e.g. Push victims)

    def problems(self) -> list[str]:
        out = [p for r in self.fuzz for p in r.problems()]
        out += self.faults.problems() if self.faults else []
        out += self.load.problems() if self.load else []
        return out + self.extra_problems

    def table(self) -> str:
        rows: list[tuple[str, str, str]] = []
        if self.faults is not None:
            f = self.faults
            rows.append(("faults", "injected", ", ".join(f"{n} {k}" for k, n in sorted(f.injected.items())) or "0"))
            rows.append(("faults", "survived", f"{f.survived} of {f.faults} (every request in their window correct)"))
            rows.append(("faults", "requests", ", ".join(f"{n} {k}" for k, n in sorted(f.requests.items()))))
            rows.append(("faults", "client failovers", str(f.failovers)))
            rows.append(("faults", "duration", f"{f.seconds:.0f} s"))
        for r in self.fuzz:
            statuses = " ".join(f"{code}:{n}" for code, n in r.statuses.most_common())
            crash = "CRASHED" if r.crashed else "no crash"
            rows.append(("fuzz", r.target, f"{r.cases} cases, {crash}; {statuses}"))
            if r.bad_count or r.unclear:
                rows.append(("fuzz", f"  {r.target} UNKNOWN/INTERNAL", f"{r.bad_count} (unclear: {r.unclear})"))
                for kind, n in r.bad.most_common(6):
                    rows.append(("fuzz", f"    {n}x", f"{kind} [e.g. {r.examples[kind]}]"[:160]))
            for note in r.notes:
                rows.append(("fuzz", f"  {r.target}", note))
        fuzz_total = sum(r.cases for r in self.fuzz)
        if self.fuzz:
            rows.append(("fuzz", "total", f"{fuzz_total} cases, {sum(r.crashed for r in self.fuzz)} crashes, "
                         f"{sum(r.bad_count for r in self.fuzz)} UNKNOWN/INTERNAL"))  # fmt: skip
        rows += [("fuzz", "note", note) for note in self.notes]
        for s in self.rss:
            rows.append(("rss", s.process, s.text()))
        if self.load is not None:
            ld = self.load
            rows.append(("load", "clients x duration", f"{ld.clients} x {ld.seconds:.0f} s"))
            rows.append(("load", "generations / tokens", f"{ld.generations} / {ld.tokens}"))
            rows.append(("load", "throughput", f"{ld.tokens_per_s:.1f} tokens/s"))
            rows.append(("load", "errors", str(len(ld.errors))))
            for line in ld.after:
                rows.append(("load", "afterwards", line))
        problems = self.problems()
        rows.append(("all", "problems", str(len(problems))))
        rows += [("all", "  -", p[:220]) for p in problems[:20]]
        widths = [max(len(r[i]) for r in rows + [("part", "figure", "value")]) for i in range(3)]
        line = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
        out = [f"Pollen soak ({self.mode})", line, _row(("part", "figure", "value"), widths), line]
        out += [_row(r, widths) for r in rows]
        return "\n".join([*out, line])


def _row(cells: tuple[str, str, str], widths: list[int]) -> str:
    return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"


def status_kind(code: str, details: str) -> str:
    """A status with its message's variable parts (numbers, quoted values) blanked, to group similar cases."""
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", details)
    text = re.sub(r"\d+", "N", text)
    return f"{code}: {text[:110]}"


def mode_from_env() -> str:
    """POLLEN_SOAK=long runs the full soak (make soak); anything else the short one (make test)."""
    return "long" if os.environ.get("POLLEN_SOAK", "").lower() == "long" else "short"
