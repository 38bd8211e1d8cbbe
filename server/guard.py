"""The update guard: a push's contribution is checked against the job's history before it touches W
(issue 24, item 1). Thresholds are ``GuardSettings``'s defaults.

1. **The AdamW step bound** (no history needed, so the first round is covered too). AdamW moves an
   entry by at most ``lr * (1 - b1) / sqrt(1 - b2) / sqrt(1 - b1^2 / b2)`` per step (7.27 lr for
   b = 0.9, 0.999; ``adam_step_bound``), plus decoupled weight decay. A head's ``B`` and ``A`` may
   differ from the server's last merged ``B', A'`` by at most ``step_slack`` (2) times that bound
   summed over the round's scheduled learning rates, plus the uplink's rounding of the entry. (A
   head never merged: ``B' = 0``, ``A'`` unknown, so ``B`` is bounded from 0 and ``||A||_F`` by its
   init's largest norm plus the steps' (``init_norm_bound``); a transposed layer, transformers'
   Conv1D, sends ``(A^T, B^T)``: there ``B^T`` is the factor that starts at 0.)
2. **The running median.** A head's contribution to LTE layer ``l`` is ``D = B A - B' A'`` (the
   merge adds ``s * w * D``, docs/design.md section 2); its Frobenius norm comes from ``r x r`` Gram
   matrices in float64 without forming ``[m, n]``:
   ``||D||^2 = <B^T B, A A^T> - 2 <B^T B', A A'^T> + <B'^T B', A' A'^T>``. Divided by the round's
   summed learning rates (so warm-up and decay do not look like outliers), it may be at most
   ``ratio`` (30) times the median of the last ``window`` (64) accepted ones of that layer, once
   there are ``min_history`` (4), plus what the uplink's rounding of ``B`` and ``A`` alone can add
   (``(2 e + e^2) ||B|| ||A||``, ``e`` the codec's relative rounding), which does not shrink with the
   learning rate. A replica's delta is checked the same way (and, for trained
   parameters, by the step bound); a buffer's (running statistics) by its plain norm, not per unit
   of lr: the data moves it, not the learning rate.

Modes (``--update-guard``): ``refuse`` (default) refuses an outlier push (``Refusal.OUTLIER``): its
heads' round counts and merges nothing, and the worker rolls those heads back to their last merged
factors and trains the next round, so an honest worker refused by mistake loses one round and
neither dies nor loops. ``clip`` merges each outlier layer scaled to its bound (``c * s * w * D``,
``c = bound / norm``, 0 for a step-bound breach; ``B', A'`` still become ``B, A`` on both sides).
``quarantine_after`` (3) outliers in a row quarantine the worker. ``off``: none of this (the paper's
server; NaN or Inf pushes are refused in every mode). Pushes inside the bounds merge with the
paper's arithmetic unchanged, so sync runs stay bit for bit equal to ``lte-sim``.

After each merge (``refuse`` and ``clip``) every master tensor must be finite with
``||W_after|| <= growth * ||W_before|| + growth_floor * sqrt(numel)`` (2 and 1); a merge that fails
is rolled back (the pre-merge W and merged factors restored) and redone without the push that
most exceeded its bounds, whose worker is quarantined.

Honest jobs never trip it: tests/test_guard.py runs every zoo model through the server's push
path at the default thresholds, and tests/conftest.py fails any test in which a guard fired
unless the test is marked ``rogue``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import threading
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from lte.common.core.merge import HeadUpdate, ReplicaUpdate
from lte.common.job.config import UPDATE_GUARDS as GUARD_MODES  # declared with --update-guard
from lte.common.job.config import JobConfig
from lte.common.job.trainer import lr_at
from lte.common.wire.protocol import PushMeta, Refusal, Refused
from lte.server.aggregation import AcceptedPush, Aggregator, Merged
from lte.server.scheduler import Lease

_log = logging.getLogger("lte.server")

# Process-wide count of pushes the guard refused or clipped and merges it rolled back. The test
# suite asserts it stays 0 over every honest job it runs (tests/conftest.py): a false positive fails.
_fired_lock = threading.Lock()
_fired = 0
# A file to which every guard event of this process is appended as one JSON line (with its pid),
# when the environment names one: the test suite sets it, so that the guards of the lte-server
# processes its tests start are counted as this process's are (tests/conftest.py).
EVENTS_ENV = "LTE_GUARD_EVENTS"


def guard_fired_total() -> int:
    """How many times any guard in this process refused, clipped or rolled back (tests read it)."""
    return _fired


def _count_fired(event: Mapping[str, object]) -> None:
    global _fired
    with _fired_lock:
        _fired += 1
        path = os.environ.get(EVENTS_ENV)
        if path:
            line = json.dumps({"pid": os.getpid(), **event}, default=str) + "\n"
            with contextlib.suppress(OSError), open(path, "a", encoding="utf-8") as f:
                f.write(line)  # one short append per event: lines of several processes do not interleave


@dataclass(frozen=True)
class GuardSettings:
    """The guard's mode and thresholds (documented in the module docstring and README)."""

    mode: str = "refuse"
    # a contribution per unit of lr may be at most this many times the running median: an honest
    # digits mlp job (8 heads, 3 workers, 2000 steps) reached 10.1x once, so 10 refused honest work
    ratio: float = 30.0
    window: int = 64  # accepted contributions per layer in the median
    min_history: int = 4  # the median bound applies once a layer has this many
    step_slack: float = 2.0  # the AdamW step bound times this (rounding, fused kernels)
    quarantine_after: int = 3  # outlier pushes in a row that quarantine a worker
    growth: float = 2.0  # post-merge: ||W_after|| <= growth * ||W_before|| + growth_floor * sqrt(numel)
    growth_floor: float = 1.0  # RMS a tensor at zero (a fresh bias) may reach in one merge

    def __post_init__(self) -> None:
        if self.mode not in GUARD_MODES:
            raise ValueError(f"--update-guard must be one of {', '.join(GUARD_MODES)}, got {self.mode!r}")

    @property
    def on(self) -> bool:
        return self.mode != "off"


# Largest relative rounding of a factor on the uplink (int8-block: half a step of 1/127 of the block max).
CODEC_ROUNDING = {"fp32": 1e-6, "fp16": 2.0**-10, "bf16": 2.0**-7, "int8-block": 1.0 / 127}


def adam_step_bound(beta1: float, beta2: float) -> float:
    """The largest ``|m_hat / sqrt(v_hat)|`` AdamW can take in one step, whatever the gradients:
    ``(1 - b1) / sqrt(1 - b2) / sqrt(1 - b1^2 / b2)`` (Cauchy-Schwarz over the moment sums; Kingma &
    Ba 2015, section 2.1, bound the step by ``(1 - b1) / sqrt(1 - b2)`` in the common case). Inf when
    ``b1^2 >= b2`` (no bound)."""
    if beta1 * beta1 >= beta2 or beta2 >= 1.0:
        return math.inf
    return (1.0 - beta1) / math.sqrt(1.0 - beta2) / math.sqrt(1.0 - beta1 * beta1 / beta2)


def contribution_norm(
    b: torch.Tensor, a: torch.Tensor, b_prev: torch.Tensor | None = None, a_prev: torch.Tensor | None = None
) -> float:
    """``||B A - B' A'||_F`` (``B``: ``[m, r]``, ``A``: ``[r, n]``) from ``r x r`` Gram matrices in
    float64, never forming ``[m, n]``. Inf when the factors' entries are too large for float64."""
    b, a = b.double(), a.double()
    sq = float(((b.T @ b) * (a @ a.T)).sum())
    if b_prev is not None and a_prev is not None:
        bp, ap = b_prev.double(), a_prev.double()
        sq += float(((bp.T @ bp) * (ap @ ap.T)).sum()) - 2.0 * float(((b.T @ bp) * (a @ ap.T)).sum())
    if not math.isfinite(sq):
        return math.inf
    return math.sqrt(max(sq, 0.0))


def _max_abs(t: torch.Tensor) -> float:
    return float(t.abs().max()) if t.numel() else 0.0


@dataclass
class Verdict:
    """What the guard says of one push: the outliers (what, value, bound), the factor each key
    merges with in clip mode (0: not at all), and the normalised norms to record if accepted."""

    outliers: list[tuple[str, float, float]] = field(default_factory=list)
    clip: dict[tuple[int, str], float] = field(default_factory=dict)  # (head, or -1 for a replica; key)
    norms: dict[str, list[float]] = field(default_factory=dict)  # history key -> norms per unit of lr
    worst_ratio: float = 0.0  # the largest value / bound: which push a failed merge blames
    impact: float = 0.0  # the largest ||s w D|| / ||W_l|| of its layers: the blame when ratios tie

    def describe(self) -> str:
        if not self.outliers:
            return "no outlier"
        what, value, bound = max(self.outliers, key=lambda o: o[1] / max(o[2], 1e-300))
        more = f" (and {len(self.outliers) - 1} more)" if len(self.outliers) > 1 else ""
        return f"{what}: {value:.3g} > bound {bound:.3g}{more}"

    def _flag(self, key: tuple[int, str], what: str, value: float, bound: float, factor: float) -> None:
        self.outliers.append((what, value, bound))
        self.clip[key] = min(self.clip.get(key, 1.0), factor)
        self.worst_ratio = max(
            self.worst_ratio, value / max(bound, 1e-300) if math.isfinite(value) else math.inf
        )


class UpdateGuard:
    """Per-layer running medians of accepted contributions, and the checks of a push."""

    def __init__(self, settings: GuardSettings, job, transposed: frozenset[str] = frozenset()) -> None:
        """``transposed``: layers whose factors travel as ``(A^T, B^T)`` (transformers' Conv1D): there
        the second factor is the one that starts at 0."""
        self.settings, self.job = settings, job
        self.transposed = transposed
        self.adam = adam_step_bound(job.beta1, job.beta2)
        self.rounding = CODEC_ROUNDING.get(job.uplink, 1.0 / 127)
        self.history: dict[str, deque[float]] = {}
        self.outliers = 0  # pushes refused (refuse) or clipped (clip)
        self.clipped = 0
        self.rollbacks = 0
        self.quarantined: list[str] = []  # worker ids
        self.events: deque[dict] = deque(maxlen=100)  # the newest, for the dashboard
        self.master_norms: dict[str, float] = {}  # ||W|| per tensor before the next merge (guard on only)
        # head -> (round id, pusher: lease id and push id) of its last round refused: the retry of
        # that very push is refused again; another worker's push of the round (rewound when the
        # refused push's lease ended) is not
        self.refused_rounds: dict[int, tuple[int, tuple[str, int]]] = {}

    def remember_master(self, master: Mapping[str, torch.Tensor]) -> None:
        """Take ``||W||`` of the master now as the next merge's growth bound (guard on only)."""
        self.master_norms = tensor_norms(master) if self.settings.on else {}

    def median(self, key: str) -> float | None:
        h = self.history.get(key)
        if h is None or len(h) < self.settings.min_history:
            return None
        values = sorted(h)
        mid = len(values) // 2
        return values[mid] if len(values) % 2 else 0.5 * (values[mid - 1] + values[mid])

    def step_bound(self, lr_sum: float, prev_max: float, now_max: float) -> float:
        """How far AdamW can move one entry in a round whose learning rates sum to ``lr_sum``: the
        step bound, decoupled weight decay, and the uplink's rounding of the entry."""
        s, wd = self.settings, self.job.weight_decay
        move = lr_sum * (self.adam + wd * max(prev_max, now_max))
        return s.step_slack * move + self.rounding * max(prev_max, now_max) + 1e-12

    def init_norm_bound(self, a: torch.Tensor) -> float:
        """The largest ``||A||_F`` the job's ``--a-init`` draws for a factor of ``a``'s size (``r`` rows
        of fan-in ``n``): orthogonal inits have exactly ``sqrt(min(r, n))`` times their spectral norm,
        uniform ones at most ``sqrt(r n)`` times their bound (common/core/layers.py ``init_lora_a``)."""
        r = max(1, int(self.job.rank))
        n = max(1, a.numel() // r)
        gain, kind = self.job.a_init_gain, self.job.a_init
        if kind == "reference":
            norm = math.sqrt(min(r, n)) * math.sqrt(n / r)
        elif kind == "semi-orthogonal":
            norm = math.sqrt(min(r, n)) * math.sqrt(r / n)
        elif kind == "kaiming":
            norm = math.sqrt(r * n) * math.sqrt(3.0 / n)
        elif kind == "xavier":
            norm = math.sqrt(r * n) * math.sqrt(6.0 / (n + r))
        else:
            return math.inf
        return gain * norm * (1.0 + 1e-6)

    def _median_check(
        self,
        verdict: Verdict,
        key: tuple[int, str],
        hkey: str,
        what: str,
        norm: float,
        lr_sum: float,
        floor: float = 0.0,
    ) -> None:
        """``norm`` within ``ratio`` x the median per unit of lr, times ``lr_sum``, plus ``floor`` (what
        the uplink's rounding alone can add: it does not shrink with the learning rate)."""
        unit = norm / max(lr_sum, 1e-300)
        verdict.norms.setdefault(hkey, []).append(unit)
        median = self.median(hkey)
        if median is not None and not norm <= self.settings.ratio * median * lr_sum + floor:
            bound = self.settings.ratio * median * lr_sum + floor
            verdict._flag(
                key, f"{what} contribution norm", norm, bound, bound / norm if math.isfinite(norm) else 0.0
            )

    def check(
        self,
        heads: Mapping[int, Mapping[str, tuple[torch.Tensor, torch.Tensor]]],
        prev: Mapping[int, Mapping[str, tuple[torch.Tensor, torch.Tensor]]],
        replicas: Mapping[str, torch.Tensor],
        lr_sums: Mapping[int, float],
        trained_replicas: frozenset[str] | set[str] = frozenset(),
        master_norms: Mapping[str, float] | None = None,
    ) -> Verdict:
        """The verdict on one push: ``heads`` ``{head: {layer: (B, A)}}``, ``prev`` the server's last
        merged factors (a head never merged: ``B' = 0``, ``A'`` unknown), ``replicas`` ``{name:
        delta}``, ``lr_sums`` each head's learning rates summed over this round's steps,
        ``trained_replicas`` the replica names AdamW trains (buffers are not step-bounded),
        ``master_norms`` ``||W||`` per master name (for ``Verdict.impact``). Changes nothing
        (``accept`` records it)."""
        verdict = Verdict()
        if not self.settings.on:
            return verdict
        for h, layers in heads.items():
            lr_sum = lr_sums[h]
            for layer, (b, a) in layers.items():
                bp, ap = prev.get(h, {}).get(layer, (None, None))
                # 1. no factor entry moved further than AdamW can move it in this round
                if ap is not None:
                    steps = [("B", b, bp), ("A", a, ap)]
                elif layer in self.transposed:  # (A^T, B^T): B^T is the factor that starts at 0
                    steps = [("B^T", a, None)]
                else:
                    steps = [("B", b, bp)]
                if ap is None:  # A' unknown: A may be no larger than its init's norm plus the steps
                    first = b if layer in self.transposed else a
                    norm_a = float(first.double().norm())
                    bound = self.init_norm_bound(first) + self.step_bound(
                        lr_sum, 0.0, _max_abs(first)
                    ) * math.sqrt(first.numel())
                    if not norm_a <= bound:
                        verdict._flag((h, layer), f"head {h} layer {layer} factor A norm", norm_a, bound, 0.0)
                for part, now, before in steps:
                    prev_max = _max_abs(before) if before is not None else 0.0
                    moved = _max_abs(now - before) if before is not None else _max_abs(now)
                    bound = self.step_bound(lr_sum, prev_max, _max_abs(now))
                    if not moved <= bound:
                        verdict._flag(
                            (h, layer), f"head {h} layer {layer} factor {part} step", moved, bound, 0.0
                        )
                # 2. the contribution per unit of lr within ratio x the running median
                norm = contribution_norm(b, a, bp, ap)
                share = self.job.scale / self.job.heads * norm
                verdict.impact = max(verdict.impact, share / ((master_norms or {}).get(layer, 0.0) + 1e-12))
                # the uplink rounds each entry of B and A by up to `rounding` of it: ||round(B) round(A) -
                # B A|| <= (2 e + e^2) ||B|| ||A||, whatever the round's lr (near the end of the cosine,
                # one entry on a rounding boundary flips by an ulp and is thousands of medians per lr)
                floor = (
                    (2 * self.rounding + self.rounding**2)
                    * float(b.double().norm())
                    * float(a.double().norm())
                )
                self._median_check(verdict, (h, layer), layer, f"head {h} layer {layer}", norm, lr_sum, floor)
        lr_sum = max(lr_sums.values(), default=0.0)
        for name, delta in replicas.items():
            if name in trained_replicas:
                moved = _max_abs(delta)
                bound = self.step_bound(lr_sum, 0.0, 0.0)
                if not moved <= bound:
                    verdict._flag((-1, name), f"replica {name} step", moved, bound, 0.0)
            norm = float(delta.double().norm())
            norm = norm if math.isfinite(norm) else math.inf
            share = norm / self.job.heads
            verdict.impact = max(verdict.impact, share / ((master_norms or {}).get(name, 0.0) + 1e-12))
            # a buffer (batch norm's running statistics, its batch count) moves by the data, not by the
            # learning rate: per unit of lr it would grow 100x as the cosine decays to 0 and every
            # honest push near the end would be an outlier; its median is of the plain norms
            per = lr_sum if name in trained_replicas else 1.0
            self._median_check(verdict, (-1, name), "replica/" + name, f"replica {name}", norm, per)
        return verdict

    def judge(
        self,
        lease: Lease,
        heads: list[HeadUpdate],
        replica_deltas: Mapping[str, torch.Tensor],
        prev: Mapping[int, Mapping[str, tuple[torch.Tensor, torch.Tensor]]],
        lr_sums: Mapping[int, float],
        trained_replicas: frozenset[str],
        version: int,
    ) -> tuple[Verdict, bool, dict | None]:
        """The verdict on a push of ``lease`` (``check``, with ``lr_sums`` keyed by every pushed head),
        whether it is refused (mode ``refuse``), and an outlier's metrics record (None for a push in
        bounds, whose norms join the history). Counts the lease's outliers in a row."""
        verdict = self.check(
            {u.head_id: u.factors for u in heads},
            prev,
            replica_deltas,
            lr_sums,
            trained_replicas,
            self.master_norms,
        )
        refuse = bool(verdict.outliers) and self.settings.mode == "refuse"
        if not verdict.outliers:
            self.accept(verdict)
            lease.outliers_in_row = 0
            return verdict, refuse, None
        lease.outliers_in_row += 1
        name = lease.worker.get("name", "")
        return (
            verdict,
            refuse,
            self.note_outlier(lease.worker_id, name, sorted(lr_sums), verdict, refuse, version),
        )

    def refusal(self, head_rounds: Mapping[int, int], verdict: Verdict, pusher: tuple[str, int]) -> Refused:
        """The ``OUTLIER`` refusal of a push of ``head_rounds`` (head -> round id) from ``pusher`` (lease
        id, push id); remembers them, so a retry of that push gets the same answer (``push_check.is_retry``)."""
        self.refused_rounds.update({h: (r, pusher) for h, r in head_rounds.items()})
        return Refused(
            Refusal.OUTLIER,
            f"push of heads {sorted(head_rounds)} refused by the update guard: "
            f"{verdict.describe()}; the round is discarded: roll these heads back and go on",
        )

    def accept(self, verdict: Verdict) -> None:
        """Add an accepted push's norms to the history (not an outlier's: it would drag the median)."""
        if verdict.outliers:
            return
        for key, values in verdict.norms.items():
            self.history.setdefault(key, deque(maxlen=self.settings.window)).extend(values)

    def fired(self, event: dict) -> None:
        """Count one refusal, clip or rollback (log lines are the caller's: it knows the worker)."""
        _count_fired(event)
        self.events.append(event)

    def note_outlier(
        self, worker_id: str, name: str, head_ids: list[int], verdict: Verdict, refuse: bool, version: int
    ) -> dict:
        """Count and log an outlier push of ``head_ids`` (refused or clipped); the metrics record."""
        self.outliers += 1
        self.clipped += not refuse
        action = "refused" if refuse else "clipped"
        what = verdict.describe()
        _log.warning(
            "update guard: push of heads %s from worker %s (%s) %s: %s",
            head_ids,
            worker_id,
            name,
            action,
            what,
        )
        self.fired({"version": version, "worker_id": worker_id, "action": action, "what": what})
        return {"guard": action, "worker_id": worker_id, "version": version, "what": what}

    def note_quarantine(
        self, worker_id: str, name: str, head_ids: list[int], problem: str, version: int
    ) -> dict:
        """Count and log a worker quarantined for ``problem``; the metrics record."""
        _log.error(
            "update guard: %s; worker %s (%s) quarantined, its heads %s go back to the pool",
            problem,
            worker_id,
            name,
            head_ids,
        )
        self.quarantined.append(worker_id)
        self.fired({"version": version, "worker_id": worker_id, "action": "quarantined", "what": problem})
        return {"guard": "quarantined", "worker_id": worker_id, "version": version, "what": problem}

    def status(self) -> dict:
        s = self.settings
        return {
            "mode": s.mode,
            "ratio": s.ratio,
            "outliers": self.outliers,
            "clipped": self.clipped,
            "rollbacks": self.rollbacks,
            "quarantined": list(self.quarantined),
            "events": list(self.events)[-20:],
        }


def screened_push(
    lease_id: str,
    header: PushMeta,
    heads: list[HeadUpdate],
    replica: ReplicaUpdate,
    weight: float,
    lr_start: float,
    verdict: Verdict,
    refuse: bool,
) -> AcceptedPush:
    """A push as the guard lets it into the round: a refused one merges nothing and counts no samples,
    but its heads' round counts (``skipped``); an outlier's clip factors and worst ratio go with it."""
    return AcceptedPush(
        lease_id,
        [] if refuse else heads,
        weight,
        replica,
        header.steps,
        0 if refuse else header.samples,
        header.train_loss,
        lr_start,
        skipped=sorted(header.head_rounds) if refuse else [],
        clip=dict(verdict.clip) if verdict.outliers else {},
        guard_ratio=verdict.worst_ratio,
        impact=verdict.impact,
    )


def round_lr_sum(job: JobConfig, steps_done: int) -> float:
    """The learning rates of a head's round starting at step ``steps_done``, summed (the step bound's
    and the running median's unit)."""
    return sum(lr_at(t, job) for t in range(steps_done, steps_done + job.round_steps(steps_done)))


def tensor_norms(master: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """``||W||_F`` of every floating master tensor, in float64 (integer buffers: 0)."""
    return {k: float(v.double().norm()) if v.is_floating_point() else 0.0 for k, v in master.items()}


def all_master_finite(tensors: Mapping[str, torch.Tensor]) -> bool:
    """No NaN or Inf in any floating tensor (a checkpoint or an export is never written otherwise)."""
    return all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())


def merge_within_bounds(
    master: Mapping[str, torch.Tensor], before: Mapping[str, float], settings: GuardSettings
) -> tuple[str | None, dict[str, float]]:
    """(None, the new norms) when every floating master tensor is finite and its norm within
    ``growth * before + growth_floor * sqrt(numel)``; else (a line naming the first that is not, {})."""
    norms = tensor_norms(master)
    for name, norm in norms.items():
        if not math.isfinite(norm):
            return f"{name} is not finite after the merge", {}
        limit = settings.growth * before[name] + settings.growth_floor * math.sqrt(master[name].numel())
        if norm > limit:
            return (
                f"{name} grew from norm {before[name]:.3g} to {norm:.3g} in one merge (limit {limit:.3g})",
                {},
            )
    return None, norms


def guarded_merge(
    aggregator: Aggregator,
    accepted: list[AcceptedPush],
    guard: UpdateGuard,
    quarantine: Callable[[str, str], None],
) -> Merged:
    """Merge ``accepted`` into ``aggregator.master``; with the guard on, check the master after it and
    roll a bad merge back (the pre-merge W and merged factors restored), then merge again without the
    push that most exceeded its bounds, whose lease goes to ``quarantine(lease_id, problem)``."""
    if not guard.settings.on:
        return aggregator.merge_pushes(accepted)
    master, prev_factors = aggregator.master, aggregator.prev_factors
    backup = {k: v.detach().clone() for k, v in master.items()}
    prev_backup = {h: dict(layers) for h, layers in prev_factors.items()}
    while True:
        merged = aggregator.merge_pushes(accepted)
        problem, norms = merge_within_bounds(master, guard.master_norms, guard.settings)
        if problem is None:
            guard.master_norms = norms
            return merged
        for k, v in backup.items():
            master[k].copy_(v)
        prev_factors.clear()
        prev_factors.update({h: dict(layers) for h, layers in prev_backup.items()})
        guard.rollbacks += 1
        culprits = [a for a in accepted if a.heads]
        if not culprits:
            _log.error("update guard: the master is out of bounds with nothing merged: %s", problem)
            return aggregator.merge_pushes(accepted)
        culprit = max(culprits, key=lambda a: (a.guard_ratio, a.impact))
        culprit.skipped = sorted([u.head_id for u in culprit.heads] + culprit.skipped)
        culprit.heads, culprit.samples = [], 0
        quarantine(culprit.lease_id, f"merge rolled back: {problem}")
