"""Promotion gates: two metric dicts and the configured gates → a decision with its reasons.

    decision = decide(challenger_metrics, champion_metrics_or_None, cfg.promotion.gates)
    decision.promote, decision.reasons, decision.checks

Every gate is checked and reported (not only the first failure), so the tags on a rejected
version say everything that was wrong. A metric that is missing or not finite fails its gate:
an evaluation that could not measure something must not count as passing it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from w2svd.config import GateConfig


@dataclass(frozen=True)
class Check:
    metric: str
    kind: str  # "absolute-min" | "absolute-max" | "relative" | "missing"
    passed: bool
    challenger: float | None
    reference: float | None  # the bound, or the champion's value for relative checks
    reason: str


@dataclass
class Decision:
    promote: bool
    checks: list[Check] = field(default_factory=list)
    first_version: bool = False

    @property
    def reasons(self) -> list[str]:
        """What blocked promotion, or (when promoted) every check that passed."""
        failed = [c.reason for c in self.checks if not c.passed]
        return failed if failed else [c.reason for c in self.checks]

    def to_dict(self) -> dict:
        return {"promote": self.promote, "first_version": self.first_version,
                "reasons": self.reasons, "checks": [asdict(c) for c in self.checks]}


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def relative_regression(challenger: float, champion: float, better: str) -> float:
    """How much worse the challenger is, as a fraction of ``|champion|`` (negative: better)."""
    worse_by = challenger - champion if better == "lower" else champion - challenger
    scale = abs(champion)
    if scale == 0.0:
        return 0.0 if worse_by <= 0 else math.inf
    return worse_by / scale


def check_gate(gate: GateConfig, challenger: dict, champion: dict | None) -> list[Check]:
    name = gate.metric
    value = challenger.get(name)
    if not _finite(value):
        what = "missing from" if value is None else f"not finite ({value}) in"
        return [Check(name, "missing", False, None, None, f"{name} is {what} the challenger's evaluation")]
    value = float(value)
    checks = []
    if gate.min is not None:
        ok = value >= gate.min
        checks.append(Check(name, "absolute-min", ok, value, gate.min,
                            f"{name} {_fmt(value)} {'>=' if ok else 'is below the minimum'} {_fmt(gate.min)}"))
    if gate.max is not None:
        ok = value <= gate.max
        checks.append(Check(name, "absolute-max", ok, value, gate.max,
                            f"{name} {_fmt(value)} {'<=' if ok else 'is above the maximum'} {_fmt(gate.max)}"))
    if gate.max_regression is not None and champion is not None:
        ref = champion.get(name)
        if not _finite(ref):
            # The champion's number is what the challenger is judged against; without it the
            # comparison cannot be made, and silently passing would defeat the gate.
            checks.append(Check(name, "relative", False, value, None,
                                f"{name}: the champion's value is missing or not finite ({ref}); re-evaluate it"))
        else:
            ref = float(ref)
            reg = relative_regression(value, ref, gate.better)
            ok = reg <= gate.max_regression
            direction = "lower" if gate.better == "lower" else "higher"
            if reg <= 0:
                text = f"{name} {_fmt(value)} vs champion {_fmt(ref)}: not worse ({direction} is better)"
            else:
                text = (f"{name} {_fmt(value)} vs champion {_fmt(ref)}: worse by {reg:.1%} "
                        f"({'allowed' if ok else 'more than the allowed'} {gate.max_regression:.1%}; "
                        f"{direction} is better)")
            checks.append(Check(name, "relative", ok, value, ref, text))
    return checks


def decide(challenger: dict, champion: dict | None, gates: list[GateConfig]) -> Decision:
    """Promote only if every check of every gate passes. ``champion=None``: a first version,
    judged by the absolute bounds alone."""
    if not gates:
        raise ValueError("no promotion gates configured (promotion.gates is empty); refusing to promote blindly")
    checks = [c for gate in gates for c in check_gate(gate, challenger, champion)]
    return Decision(promote=all(c.passed for c in checks), checks=checks, first_version=champion is None)
