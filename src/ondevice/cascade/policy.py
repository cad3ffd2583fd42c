"""When to defer a request to the cloud: a confidence threshold, per-request overrides and a budget.

Policies come from two places: the server (or library) default, :class:`Policy`, and the request's own
:class:`RequestPolicy` (``"cascade": {"never_defer": true, "threshold": 0.6}`` in the body). A request may
always keep itself on the device (``never_defer``: private data never leaves it); it may not raise the
budget. The budget caps the share of requests deferred over a sliding time window, so a burst of hard
inputs cannot run up the cloud bill.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, replace

from .. import fields
from ..errors import InvalidArgument


@dataclass(frozen=True)
class Policy:
    """Defaults for every request.

    Attributes:
        threshold: defer when the confidence is below this (0 never defers, 1 defers everything).
        budget: at most this share of the requests of the last ``window_s`` seconds go to the cloud (a deferral
            sent counts whether the cloud answers, times out or its client leaves).
        window_s: the budget's sliding window.
        timeout_s: the cloud's whole answer (streaming: its first token, then each gap) must come in this
            time; past it the device answer is returned, marked as a fallback.
        keep_hard: store deferred inputs with the cloud's answers (hard samples) for later adaptation.
        defer_share: instead of ``threshold``, defer this share of requests, the least confident: the
            threshold is the one that deferred this share of the fitted combiner's dev answers.
    """

    threshold: float = 0.5
    budget: float = 1.0
    window_s: float = 60.0
    timeout_s: float = 10.0
    keep_hard: bool = False
    defer_share: float | None = None

    def __post_init__(self) -> None:
        fields.check(self)
        checks = [("threshold", 0 <= self.threshold <= 1, "must be in [0, 1]"),
                  ("defer share", self.defer_share is None or 0 <= self.defer_share <= 1, "must be in [0, 1]"),
                  ("budget", 0 <= self.budget <= 1, "must be a share in [0, 1]"),
                  ("window", self.window_s > 0, "must be > 0 seconds"),
                  ("timeout", self.timeout_s > 0, "must be > 0 seconds")]
        for name, ok, why in checks:
            if not ok:
                raise InvalidArgument(f"cascade {name} {why}")


def with_combiner(policy: Policy, combiner) -> Policy:
    """``policy`` with its threshold taken from ``combiner`` when it asks for a deferral share."""
    if policy.defer_share is None:
        return policy
    return replace(policy, threshold=combiner.threshold_for(policy.defer_share))


def threshold_warning(policy: Policy, combiner, name: str = "--cascade-threshold",
                      share: str = "--cascade-defer-share 0.4") -> str | None:
    """Why ``policy``'s threshold would defer (nearly) every request, or None. A threshold above (nearly) every
    confidence the fitted combiner gave its dev answers does: the combiner's scale is its dev split's base rate,
    not 0.5 (a fixed threshold means little; a share does). None when the threshold comes from a share, is 1
    (defer all, as asked), or the combiner did not record its dev thresholds (a file fitted before it did, or
    the uncalibrated one). ``name`` and ``share`` are the setting and the fix as the caller spells them (the
    server's flags, the library's :class:`Policy`)."""
    pts = combiner.meta.get("share_thresholds")
    if policy.defer_share is not None or policy.threshold >= 1 or not pts:
        return None
    frac, top = pts[-1]  # below ``top`` lie ``frac`` (95%) of the dev confidences
    if policy.threshold <= top:
        return None
    return (f"{name} {policy.threshold:g} is above {frac:.0%} of the fitted combiner's dev confidences (they lie "
            f"below {top:.4g}), so nearly every request will go to the cloud; give {share} to defer the least "
            f"confident 40%, or a {name} below {top:.4g}")


@dataclass(frozen=True)
class RequestPolicy:
    """What one request asks for (all optional)."""

    never_defer: bool = False  # private: the request never leaves the device, and is never stored
    always_defer: bool = False  # skip the confidence test (still subject to the budget)
    threshold: float | None = None
    keep: bool | None = None  # store as a hard sample if deferred (None: the server's default)

    def __post_init__(self) -> None:
        fields.check(self)
        if self.threshold is not None and not 0 <= self.threshold <= 1:
            raise InvalidArgument(f"cascade.threshold {self.threshold!r} must be in [0, 1]")
        if self.never_defer and self.always_defer:
            raise InvalidArgument("cascade.never_defer and cascade.always_defer contradict each other; pick one")


class Budget:
    """Share of requests deferred over a sliding window; thread-safe (library and server)."""

    def __init__(self, share: float, window_s: float, clock=time.monotonic):
        self.share, self.window_s, self.clock = share, window_s, clock
        self._events: deque[tuple[float, bool]] = deque()  # (time, deferred)
        self._lock = threading.Lock()

    def _trim(self, now: float) -> None:
        while self._events and self._events[0][0] <= now - self.window_s:
            self._events.popleft()

    def admit(self, want: bool) -> bool:
        """Count one request; True when it wants the cloud and the window's share allows it.

        The share counts this request: with a budget of 0.25, one request in four may go to the cloud.
        """
        with self._lock:
            now = self.clock()
            self._trim(now)
            n = len(self._events) + 1
            deferred = sum(d for _, d in self._events)
            ok = want and deferred + 1 <= self.share * n + 1e-9
            self._events.append((now, ok))
            return ok

    def refund(self) -> None:
        """The deferral was never sent to the cloud (a refused connection, a cooldown): the last deferral of this
        window does not count. One the cloud may have got stays charged, answered or not: the budget caps cloud
        calls (and their cost), not cloud answers."""
        with self._lock:
            for i in range(len(self._events) - 1, -1, -1):
                if self._events[i][1]:
                    self._events[i] = (self._events[i][0], False)
                    return

    @property
    def deferred_share(self) -> float:
        with self._lock:
            self._trim(self.clock())
            return sum(d for _, d in self._events) / len(self._events) if self._events else 0.0


@dataclass(frozen=True)
class Decision:
    defer: bool
    reason: str  # confident | unsure | never_defer | always_defer | over_budget
    threshold: float


def decide(confidence: float, policy: Policy, request: RequestPolicy, budget: Budget) -> Decision:
    """Whether this answer goes to the cloud, and why."""
    threshold = policy.threshold if request.threshold is None else request.threshold
    if request.never_defer:
        return Decision(False, "never_defer", threshold)  # not counted: it never competes for the budget
    want = request.always_defer or confidence < threshold
    if not budget.admit(want):
        return Decision(False, "over_budget" if want else "confident", threshold)
    return Decision(True, "always_defer" if request.always_defer else "unsure", threshold)
