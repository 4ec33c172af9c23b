"""Plain-language findings from an analysis, by simple documented rules (docs/analyze.md lists them).

Each rule reads the figures of `analyze()` and returns sentences; thresholds are the constants below.

- imbalance: an expert's task-vector norm is >= IMBALANCE times the median of the other experts' in a run
  of consecutive layers -> suggest scaling its weight by the inverse ratio (and the converse, <= 1/IMBALANCE).
- conflict: a pair of experts disagrees in sign on >= CONFLICT of the entries where both moved, in a
  module group (attention, mlp, ...) -> one sentence per pair naming those groups, worst first; at
  >= CHANCE the signs are as good as independent.
- cosine: a pair's task vectors have cosine >= REDUNDANT (nearly the same update) or <= OPPOSED.
- concentration: the top 20% of an expert's magnitudes hold < DENSE_MASS of its L1 mass while the recipe
  keeps a density <= 0.3 (a dense update is trimmed hard); or the top 5% hold >= SPARSE_MASS (sparse:
  low densities are safe).
- distance: |tau|/|base| <= TINY (the expert barely differs from the base) or >= FAR.
- election: an expert's signs agree with the merged delta on < AGREEMENT of its entries (the merge mostly
  overrides it).
"""

from __future__ import annotations

import statistics
from typing import Any

IMBALANCE = 3.0
CONFLICT = 0.3
CHANCE = 0.45
REDUNDANT = 0.9
OPPOSED = -0.1
DENSE_MASS = 0.5
SPARSE_MASS = 0.5
TINY = 1e-4
FAR = 0.5
AGREEMENT = 0.6


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _runs(layers: list[int]) -> list[tuple[int, int]]:
    """Consecutive runs [(first, last)] of sorted layer indices."""
    out: list[tuple[int, int]] = []
    for k in layers:
        if out and k == out[-1][1] + 1:
            out[-1] = (out[-1][0], k)
        else:
            out.append((k, k))
    return out


def _span(a: int, b: int) -> str:
    return f"layer {a}" if a == b else f"layers {a}-{b}"


def imbalance(res: dict[str, Any]) -> list[str]:
    experts = res["experts"]
    if len(experts) < 2:
        return []
    out = []
    for e in experts:
        hi, lo = {}, {}
        for row in res["by_layer"]:
            own = row["experts"][e]["norm"]
            others = [row["experts"][o]["norm"] for o in experts if o != e]
            med = statistics.median(others)
            if own and med and own >= IMBALANCE * med:
                hi[row["layer"]] = own / med
            elif own is not None and med and own <= med / IMBALANCE:
                lo[row["layer"]] = own / med
        w = res.get("weights", {}).get(e) or 1.0
        for a, b in _runs(sorted(hi)):
            ratio = statistics.fmean(hi[k] for k in range(a, b + 1))
            out.append(
                f"{e}'s task vector is {ratio:.1f}x the others' in {_span(a, b)}: "
                f"consider weight {w / ratio:.2g} there (now {w:.2g}), or it dominates the merge"
            )
        for a, b in _runs(sorted(lo)):
            ratio = statistics.fmean(lo[k] for k in range(a, b + 1))
            out.append(
                f"{e}'s task vector is only {ratio:.2f}x the others' in {_span(a, b)}: "
                f"its contribution there is small unless its weight rises (about {w / ratio:.2g})"
            )
    return out


def conflict(res: dict[str, Any]) -> list[str]:
    """One sentence per pair of experts: the module groups where they conflict, worst first."""
    hits: dict[tuple[str, str], list[tuple[float, str]]] = {}
    for group, g in res["by_group"].items():
        for p in g["pairs"]:
            c = p["sign_conflict"]
            if c is not None and c >= CONFLICT:
                hits.setdefault((p["a"], p["b"]), []).append((c, group))
    out = []
    for (a, b), gs in hits.items():
        gs.sort(reverse=True)
        where = f"{_pct(gs[0][0])} of signs in {gs[0][1]} layers" + "".join(
            f", {_pct(c)} in {g}" for c, g in gs[1:]
        )
        tail = (
            "as good as independent signs (50% is chance): a plain average cancels much of both; sign "
            "election (ties, dare_ties) keeps one side per entry"
            if gs[0][0] >= CHANCE
            else "a sign-electing method (ties, dare_ties) resolves them; a plain average cancels them"
        )
        out.append(f"{a} and {b} conflict in {where}: {tail}")
    return out


def cosine(res: dict[str, Any]) -> list[str]:
    out = []
    for p in res["overall"]["pairs"]:
        c = p["cosine"]
        if c is None:
            continue
        if c >= REDUNDANT:
            out.append(
                f"{p['a']} and {p['b']} have nearly the same task vector (cosine {c:.2f}): merging both adds "
                "little over one of them"
            )
        elif c <= OPPOSED:
            out.append(
                f"{p['a']} and {p['b']} pull in opposite directions (cosine {c:.2f}): their average cancels"
            )
    return out


def concentration(res: dict[str, Any]) -> list[str]:
    out = []
    dens = res.get("densities") or {}
    for e, row in res["overall"]["experts"].items():
        top = row["top_mass"]
        d = dens.get(e)
        if d is not None and d <= 0.3 and top["20%"] is not None and top["20%"] < DENSE_MASS:
            out.append(
                f"{e}'s task vector is dense (its top 20% of magnitudes hold only {_pct(top['20%'])} of its "
                f"mass) but density is {d:.2g}: trimming drops most of it; consider density >= 0.5"
            )
        elif top["5%"] is not None and top["5%"] >= SPARSE_MASS:
            out.append(
                f"{e}'s task vector is concentrated (top 5% of magnitudes hold {_pct(top['5%'])} of its mass): "
                "low densities (0.1-0.2) keep most of it"
            )
    return out


def distance(res: dict[str, Any]) -> list[str]:
    out = []
    for e, row in res["overall"]["experts"].items():
        r = row["rel_norm"]
        if r is None:
            continue
        if r <= TINY:
            out.append(f"{e} barely differs from the base (|tau|/|base| = {r:.1e}): it adds almost nothing")
        elif r >= FAR:
            out.append(
                f"{e} is far from the base (|tau|/|base| = {r:.2f}): task arithmetic assumes small task "
                "vectors; consider a lower weight or slerp"
            )
    return out


def election(res: dict[str, Any]) -> list[str]:
    out = []
    for e, row in res["overall"]["experts"].items():
        a = row.get("sign_agreement")
        if a is not None and a < AGREEMENT:
            out.append(
                f"with {res['method']}, {e}'s signs agree with the merged change on only {_pct(a)} of its "
                "entries: the merge mostly overrides it"
            )
    return out


RULES = (imbalance, conflict, cosine, concentration, distance, election)


def findings(res: dict[str, Any]) -> list[str]:
    """Every rule's sentences, in rule order; one neutral line when none fires."""
    out = [s for rule in RULES for s in rule(res)]
    if not out and res["experts"]:
        out.append("no imbalance, strong sign conflict, redundancy or trimming loss found by the rules")
    return out
