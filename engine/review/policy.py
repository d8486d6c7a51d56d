"""The review policy of a run: which samples are flagged and in which order they are reviewed.

A policy is one cut-off rule plus one ranking score:

- ``auto``: the run's automatic AUM cut-off (``scores.pass_cutoff("auto")``: mixture on AUM, capped
  by the threshold samples' rule); flagged = mean AUM below the mean of the pass cut-offs;
- ``threshold`` (or ``threshold:P``): Pleiss et al. 2020, the P-th percentile (default: the run's
  ``threshold_percentile``, 99) of each pass's threshold samples' AUM; flagged = below its own pass's
  cut-off in **every** pass where the sample kept its label;
- ``value:V``: flagged = the ranking score on its suspicious side of V (``aum`` < V; ``ce_loss`` > V);
- ``quantile:Q``: the fraction Q at the ranking score's suspicious end, as peerannot's
  ``WAUM.cut_lowests(alpha=Q)``: ``values <= nanquantile(values, Q)`` (mirrored for a score whose
  high end is suspicious).

The ranking score (``score``, default ``aum``) is any registry column of the run or an imported
``csv:NAME`` column (ensembles are imported as CSV); ``value`` and ``quantile`` cut it, ``auto`` and
``threshold`` always cut AUM. ``decide`` is the one function that turns a policy into flags and
ranks; ``apply_to_table`` applies the run's saved policy (``policy.json``) to a scores table, and
every page, export and ``summary.json`` ``policy`` goes through it.

``policy.json``: ``{"rule", "value", "score", "saved_at", "history": [earlier policies with their
saved_at]}``, written atomically. A run without it uses its config's ``cutoff`` and ranks by AUM.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from engine.capture import dynamics as dyn
from engine.scores.registry import PASS_AUM, REGISTRY, oriented
from engine.store.runs import Run, atomic_write_json

POLICY_FILE = "policy.json"
RULES = ("auto", "threshold", "value", "quantile")
RULE_TITLES = {"auto": "automatic", "threshold": "threshold samples' percentile", "value": "value",
               "quantile": "lowest fraction"}
CSV_PREFIX = "csv:"


class PolicyError(ValueError):
    """A policy that cannot be used on this run; the message says why and what to choose instead."""


@dataclass(frozen=True)
class Policy:
    rule: str = "auto"
    value: float | None = None  # value: the cut-off; quantile: the fraction; threshold: the percentile (None = run's)
    score: str = "aum"  # the ranking score; value / quantile cut it

    @property
    def cutoff(self) -> str:
        """The ``--cutoff`` spelling: ``auto``, ``threshold[:P]``, ``value:V`` or ``quantile:Q``."""
        return self.rule if self.value is None else f"{self.rule}:{self.value:g}"

    def to_dict(self) -> dict:
        return asdict(self)


def parse_cutoff(text: str) -> tuple[str, float | None]:
    """``auto`` | ``threshold`` | ``threshold:P`` | ``value:V`` | ``quantile:Q`` -> (rule, value), or PolicyError."""
    t = (text or "").strip()
    rule, _, arg = t.partition(":")
    rule = rule.strip().lower()
    if rule not in RULES:
        raise PolicyError(f"cut-off {text!r} is not one of auto, threshold, value:V, quantile:Q (e.g. value:-0.5, "
                          "quantile:0.1)")
    if not arg.strip():
        if rule in ("value", "quantile"):
            raise PolicyError(f"cut-off {rule!r} needs a number: {rule}:{'-0.5' if rule == 'value' else '0.1'}")
        return rule, None
    if rule == "auto":
        raise PolicyError(f"cut-off 'auto' takes no number, got {text!r}")
    try:
        v = float(arg)
    except ValueError as exc:
        raise PolicyError(f"cut-off {text!r}: {arg.strip()!r} is not a number") from exc
    if not np.isfinite(v):
        raise PolicyError(f"cut-off {text!r}: the number must be finite")
    if rule == "quantile" and not 0 < v < 1:
        raise PolicyError(f"cut-off {text!r}: the fraction must be between 0 and 1, e.g. quantile:0.1 for 10%")
    if rule == "threshold" and not 0 < v <= 100:
        raise PolicyError(f"cut-off {text!r}: the percentile must be in (0, 100], e.g. threshold:99")
    return rule, v


def make_policy(cutoff: str = "auto", rank_by: str | None = None) -> Policy:
    """A policy from the CLI's ``--cutoff`` and ``--rank-by`` spellings (checked against a run by ``resolve``)."""
    rule, value = parse_cutoff(cutoff)
    return Policy(rule, value, (rank_by or "aum").strip())


def default_policy(run: Run) -> Policy:
    """What a run without ``policy.json`` uses: its config's cut-off method, ranked by AUM."""
    return Policy(str(run.config().get("cutoff", "auto")), None, "aum")


def load_policy(run: Run) -> Policy:
    """The run's saved policy (``policy.json``), else ``default_policy``."""
    path = run.path / POLICY_FILE
    if not path.is_file():
        return default_policy(run)
    d = json.loads(path.read_text())
    return Policy(d.get("rule", "auto"), d.get("value"), d.get("score", "aum"))


def policy_history(run: Run) -> list[dict]:
    """Earlier policies of the run, oldest first, each with its ``saved_at`` (UTC ISO time)."""
    path = run.path / POLICY_FILE
    return list(json.loads(path.read_text()).get("history", [])) if path.is_file() else []


def save_policy(run: Run, policy: Policy) -> dict:
    """Check ``policy`` against the run, save it as ``policy.json`` (the previous one goes to ``history``), and
    bring ``scores.parquet`` ``flagged`` / ``rank`` and ``summary.json`` in line. Returns the applied info."""
    from engine.store.runs import atomic_write_parquet

    table, info = current_table(run)
    resolve(run, policy, table)  # raises PolicyError before anything is written
    path = run.path / POLICY_FILE
    history: list[dict] = []
    if path.is_file():
        old = json.loads(path.read_text())
        history = list(old.pop("history", [])) + [old]
    else:
        history = [default_policy(run).to_dict() | {"saved_at": None, "note": "the run's config"}]
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    atomic_write_json(path, policy.to_dict() | {"saved_at": stamp, "history": history})
    applied = apply_to_table(run, table, info)
    if (run.path / "scores.parquet").is_file() and run.status().get("state") != "running":
        atomic_write_parquet(run.path / "scores.parquet", table)
        summary = run.summary()
        if summary is not None:
            atomic_write_json(run.path / "summary.json", summary | applied | summary_counts(run, table, applied["policy"]))
    return applied


def current_table(run: Run) -> tuple[pd.DataFrame, dict]:
    """The run's scores table (natural values) and cut-off facts: ``scores.parquet`` of a finished run, else
    computed from the finished epochs. PolicyError before the first epoch."""
    from engine.scores.registry import compute_scores

    if run.status().get("state") != "running" and (run.path / "scores.parquet").is_file():
        return run.scores(), run_info(run)
    try:
        table, info = compute_scores(run)
    except ValueError as exc:
        raise PolicyError(f"run {run.id} has no scores yet ({exc}); save a policy after the first epoch") from exc
    return table, info


def run_info(run: Run) -> dict:
    """The cut-off facts a policy needs that are not per-sample: the automatic cut-off(s)."""
    summary = run.summary() or {}
    auto = summary.get("auto_cutoff")
    if auto is None and summary.get("cutoff_method") == "auto":  # a summary written before policies existed
        auto = summary.get("cutoff")
    return {"auto_cutoff": auto, "auto_pass_cutoffs": summary.get("auto_pass_cutoffs"),
            "n_unscored": summary.get("n_unscored")}


def summary_counts(run: Run, table: pd.DataFrame, policy_info: dict) -> dict:
    """``n_flagged`` and, with known label errors, precision / recall / F1 of the flags and AUROC of the ranking
    score (``policy_info`` is the ``policy`` block ``apply_to_table`` returned)."""
    from engine.scores.metrics import detection_metrics
    from engine.store.runs import trained_rows

    out: dict = {"n_flagged": int(table["flagged"].sum())}
    samples = run.samples()
    rows = trained_rows(samples)  # the samples the audit could judge (held-out ones are never flagged)
    true = samples["true_label"].to_numpy()[rows]
    if len(samples) == len(table) and (true >= 0).all():
        is_error = samples["label"].to_numpy()[rows] != true
        name = policy_info["score"]
        ranked = oriented(score_values(run, table, name), name, policy_info["suspicious"])[rows]
        out.update(detection_metrics(table["flagged"].to_numpy()[rows], ranked, is_error))
    return out


@dataclass
class Decision:
    flagged: np.ndarray  # bool per sample
    rank: np.ndarray  # 1 = most suspicious by the ranking score; unscored samples last
    cutoff: float  # on the scale of the score that is cut (AUM for auto / threshold)
    pass_cutoffs: list[float] = field(default_factory=list)
    text: str = ""  # "aum < -0.12 (automatic)"


def suspicious_of(run: Run | None, name: str) -> str:
    """Which end of score ``name`` is suspicious: the registry, or the direction an imported column was saved with."""
    if name.startswith(CSV_PREFIX):
        from engine.scores.predefined import directions

        d = directions(run.path if run is not None else None).get(name[len(CSV_PREFIX):])
        if d is None:
            raise PolicyError(f"{name!r} is not an imported score of this run")
        return d
    if name not in REGISTRY:
        raise PolicyError(f"{name!r} is not a score: choose one of {', '.join(REGISTRY)} or an imported csv:NAME")
    return REGISTRY[name].suspicious


def score_values(run: Run | None, table: pd.DataFrame, name: str) -> np.ndarray | None:
    """Natural values of score ``name`` in run order: a column of ``table`` or an imported ``csv:`` column."""
    if name.startswith(CSV_PREFIX):
        from engine.scores.predefined import load_from_run

        imported = load_from_run(run.path) if run is not None else pd.DataFrame()
        col = name[len(CSV_PREFIX):]
        return imported[col].to_numpy(dtype=np.float64) if col in imported.columns and len(imported) == len(table) else None
    return table[name].to_numpy(dtype=np.float64) if name in table.columns else None


def resolve(run: Run, policy: Policy, table: pd.DataFrame) -> tuple[np.ndarray, str]:
    """The ranking score's natural values and its suspicious end, or PolicyError saying what is available."""
    if policy.rule not in RULES:
        raise PolicyError(f"unknown cut-off rule {policy.rule!r}; choose one of {', '.join(RULES)}")
    end = suspicious_of(run, policy.score)
    values = score_values(run, table, policy.score)
    if values is None or not np.isfinite(values).any():
        raise PolicyError(f"run {run.id} has no values of {policy.score!r} yet; choose one of "
                          f"{', '.join(available_scores(run, table))}")
    has_thr = "threshold_aum" in table and np.isfinite(table["threshold_aum"].to_numpy(dtype=np.float64)).any()
    if policy.rule == "threshold" and not (has_thr and any(PASS_AUM.format(p) in table for p in range(run.n_passes()))):
        raise PolicyError("cut-off 'threshold' needs threshold samples, and this run has none; use auto, value:V or "
                          "quantile:Q")
    return values, end


def available_scores(run: Run, table: pd.DataFrame) -> list[str]:
    """Names a policy can rank by: the registry columns with values, then the imported ``csv:`` columns."""
    from engine.scores.predefined import load_from_run

    names = [c for c in REGISTRY if c in table.columns and np.isfinite(table[c].to_numpy(dtype=np.float64)).any()]
    imported = load_from_run(run.path)
    if len(imported) == len(table):
        names += [CSV_PREFIX + c for c in imported.columns]
    return names


def rank_of(values: np.ndarray, name: str, suspicious: str | None = None) -> np.ndarray:
    """1 = most suspicious by ``values`` (``scores.oriented``), ties in run order, NaN last."""
    o = oriented(values, name, suspicious)
    order = np.argsort(-np.nan_to_num(o, nan=-np.inf, neginf=-np.inf), kind="stable")
    rank = np.empty(len(o), dtype=np.int64)
    rank[order] = np.arange(1, len(o) + 1)
    return rank


def decide(policy: Policy, values: np.ndarray, suspicious: str, *, aum: np.ndarray, pass_aum: list[np.ndarray],
           pass_threshold_aum: list[np.ndarray], auto_cutoff: float | None, percentile: float) -> Decision:
    """Flags and ranks of every sample under ``policy``: the one place a cut-off becomes flags.

    ``values``: natural values of the ranking score (``suspicious`` = its suspicious end); ``aum``: mean AUM
    over the passes where a sample kept its label; ``pass_aum[p]`` / ``pass_threshold_aum[p]``: pass p's AUM of
    the samples that kept their label / of its threshold samples. A sample without a value (NaN) is never
    flagged and ranks last.
    """
    v = np.asarray(values, dtype=np.float64)
    a = np.asarray(aum, dtype=np.float64)
    rank = rank_of(v, policy.score, suspicious)
    finite = np.isfinite(v)
    lt = "<" if suspicious == "low" else ">"
    passes: list[float] = []
    if policy.rule == "auto":
        cut = float("nan") if auto_cutoff is None else float(auto_cutoff)
        flagged = np.isfinite(a) & (a < cut)  # NaN cut-off: nothing flagged
        text = f"aum < {cut:.3g} (automatic)" if np.isfinite(cut) else \
            "automatic: no cut-off found (AUM has one group and there are no threshold samples); use value:V or quantile:Q"
    elif policy.rule == "threshold":
        pct = float(policy.value) if policy.value is not None else percentile
        flagged = np.ones(len(a), dtype=bool)
        seen = np.zeros(len(a), dtype=bool)
        for pa, ta in zip(pass_aum, pass_threshold_aum, strict=True):
            ta = np.asarray(ta, dtype=np.float64)
            ta = ta[np.isfinite(ta)]
            if ta.size == 0:
                continue
            c = dyn.threshold_cutoff(ta, pct)
            passes.append(c)
            pa = np.asarray(pa, dtype=np.float64)
            kept = np.isfinite(pa)
            flagged &= np.where(kept, pa < c, True)
            seen |= kept
        if not passes:
            raise PolicyError("cut-off 'threshold' needs threshold samples, and this run has none")
        flagged &= seen
        cut = float(np.mean(passes))
        text = (f"aum < its pass's cut-off in every pass ({', '.join(f'{c:.3g}' for c in passes)}; "
                f"{pct:g}th percentile of the threshold samples)")
    elif policy.rule == "value":
        cut = float(policy.value)
        flagged = finite & ((v < cut) if suspicious == "low" else (v > cut))
        text = f"{policy.score} {lt} {cut:.3g} (value)"
    else:  # quantile: peerannot WAUM.cut_lowests
        q = float(policy.value)
        if not finite.any():
            flagged, cut = np.zeros(len(v), dtype=bool), float("nan")
        elif suspicious == "low":
            cut = float(np.nanquantile(v, q))
            flagged = finite & (v <= cut)
        else:
            cut = float(np.nanquantile(v, 1 - q))
            flagged = finite & (v >= cut)
        text = f"{policy.score} {lt}= {cut:.3g} ({'lowest' if suspicious == 'low' else 'highest'} {q:.1%})"
    if policy.rule in ("auto", "threshold") and policy.score != "aum":
        text += f", ranked by {policy.score}"
    return Decision(flagged, rank, cut, passes, text)


def decision_for(run: Run, table: pd.DataFrame, info: dict, policy: Policy | None = None) -> tuple[Decision, dict]:
    """``decide`` for ``policy`` (default: the run's saved policy) on a run's scores table, without changing it.

    Returns the decision and the summary fields: ``cutoff``, ``cutoff_method``, ``pass_cutoffs`` and ``policy``
    (rule, value, score, cutoff, text, n_flagged, suspicious). A saved policy whose score the table does not have
    yet (a running audit, a score not computed) falls back to the run's default, and ``policy.note`` says so; a
    policy given explicitly raises PolicyError instead.
    """
    chosen = policy or load_policy(run)
    note = None
    try:
        values, end = resolve(run, chosen, table)
    except PolicyError as exc:
        if policy is not None:
            raise
        note = f"saved policy not applicable ({exc}); using the run's default"
        chosen = default_policy(run)
        values, end = resolve(run, chosen, table)
    tpass = run.samples(["threshold_pass"])["threshold_pass"].to_numpy()
    passes = [p for p in range(run.n_passes()) if PASS_AUM.format(p) in table.columns]
    thr = table["threshold_aum"].to_numpy(dtype=np.float64) if "threshold_aum" in table else np.full(len(table), np.nan)
    d = decide(
        chosen, values, end,
        aum=table["aum"].to_numpy(dtype=np.float64),
        pass_aum=[table[PASS_AUM.format(p)].to_numpy(dtype=np.float64) for p in passes],
        pass_threshold_aum=[np.where(tpass == p, thr, np.nan) for p in passes],
        auto_cutoff=info.get("auto_cutoff"),
        percentile=float(run.config().get("threshold_percentile", 99.0)),
    )
    pol = chosen.to_dict() | {"cutoff": chosen.cutoff, "text": d.text, "n_flagged": int(d.flagged.sum()),
                              "suspicious": end}
    if note:
        pol["note"] = note
    passes_cut = d.pass_cutoffs if chosen.rule == "threshold" else list(info.get("auto_pass_cutoffs") or []) \
        if chosen.rule == "auto" else []
    return d, {"cutoff": d.cutoff, "cutoff_method": chosen.rule, "pass_cutoffs": passes_cut, "policy": pol}


def apply_to_table(run: Run, table: pd.DataFrame, info: dict, policy: Policy | None = None) -> dict:
    """Set ``table["flagged"]`` and ``table["rank"]`` under ``policy`` (default: the run's saved one) in place;
    returns the summary fields of ``decision_for``."""
    d, fields = decision_for(run, table, info, policy)
    table["flagged"] = d.flagged
    table["rank"] = d.rank
    return fields


def direction_label(run: Run | None, name: str) -> str:
    """``"aum (low = suspicious)"``: a score's name with its suspicious end, for axes, legends and choices."""
    try:
        return f"{name} ({suspicious_of(run, name)} = suspicious)"
    except PolicyError:
        return name


def summary_line(run: Run) -> str:
    """The policy line of a run without reading its scores: the saved summary's, else the rule alone."""
    pol = (run.summary() or {}).get("policy")
    if pol:
        return caption(pol)
    p = load_policy(run)
    return f"Policy: {p.cutoff} ({RULE_TITLES.get(p.rule, p.rule)}), ranked by {p.score}; flags appear with the scores"


def caption(policy_info: dict | None) -> str:
    """One line for every page: ``Policy: aum < -0.12 (automatic) - 177 flagged``."""
    if not policy_info:
        return "Policy: none yet (no finished epoch)"
    return f"Policy: {policy_info['text']} - {policy_info['n_flagged']:,} flagged"
