"""One cascade decision and its result, shared by the library (:class:`Cascade`) and the server.

"Towards an On-device Agent for Text Rewriting" pairs a small on-device rewriter with a server model and
defers only the uncertain part; "Are We There Yet?" puts device, edge and cloud latency side by side. Here
the device always answers first (its answer costs nothing and never leaves the machine); below the
threshold the request also goes to the cloud, and when the cloud fails, is slow or over budget the device
answer is returned, marked as such. Every result says which tier answered, the confidence and each tier's
latency.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .. import fields
from ..engine.chat import validate_messages
from ..engine.records import Sampling
from .cloud import DEFAULT_KEY_ENV, CloudAnswer, CloudClient, CloudError, wire_messages
from .confidence import Combiner, TokenStats, combiner_warning, find_combiner
from .policy import Budget, Decision, Policy, RequestPolicy, decide, threshold_warning, with_combiner


@dataclass(frozen=True)
class CascadeResult:
    """What the cascade answered and why. ``text`` is what the user gets."""

    text: str
    tier: str  # "device" | "cloud": who wrote ``text``
    confidence: float
    calibrated: bool  # False: the uncalibrated exp(mean logprob) fallback, not a fitted combiner
    reason: str  # confident | unsure | always_defer | never_defer | over_budget
    threshold: float
    device_text: str
    device_s: float
    features: dict = field(default_factory=dict)
    cloud_s: float | None = None
    cloud_model: str | None = None
    cloud_prompt_tokens: int = 0
    cloud_completion_tokens: int = 0
    cloud_usage_reported: bool = False  # the cloud answered and said its token counts (else cloud_usage is null)
    fallback: str | None = None  # why the cloud did not answer a deferred request (timeout, unreachable, http_503)
    error: str | None = None  # the fallback's whole message (which URL, what the cloud said, the key's variable)
    finish_reason: str | None = None

    @property
    def deferred(self) -> bool:
        return self.reason in ("unsure", "always_defer")

    def info(self) -> dict:
        """The reply's ``cascade`` object."""
        return {"tier": self.tier, "confidence": round(self.confidence, 6), "calibrated": self.calibrated,
                "threshold": self.threshold, "reason": self.reason, "deferred": self.deferred,
                "fallback": self.fallback, "error": self.error, "device_ms": round(self.device_s * 1e3, 3),
                "cloud_ms": None if self.cloud_s is None else round(self.cloud_s * 1e3, 3),
                "cloud_model": self.cloud_model,
                "cloud_usage": {"prompt_tokens": self.cloud_prompt_tokens,
                                "completion_tokens": self.cloud_completion_tokens}
                if self.cloud_usage_reported else None,  # not asked, or it did not say: unknown, not 0
                "features": {k: round(v, 6) for k, v in self.features.items()}}


def headers(info: dict) -> dict[str, str]:
    """Response headers for a reply's ``cascade`` object (readable without parsing the body)."""
    lat = f"device={info['device_ms']:.1f}"
    if info.get("cloud_ms") is not None:
        lat += f", cloud={info['cloud_ms']:.1f}"
    elif info.get("cloud_first_token_ms") is not None:  # streaming: the headers leave before the cloud ends
        lat += f", cloud_first_token={info['cloud_first_token_ms']:.1f}"
    reason = info["reason"] + (f"; fallback={info['fallback']}" if info.get("fallback") else "")
    return {"X-Ondevice-Tier": info["tier"], "X-Ondevice-Confidence": f"{info['confidence']:.6f}",
            "X-Ondevice-Latency-Ms": lat, "X-Ondevice-Cascade": reason}


def finish(decision: Decision, confidence: float, calibrated: bool, feats: dict, device_text: str, device_s: float,
           device_finish: str | None, cloud: CloudAnswer | CloudError | None, cloud_s: float | None = None,
           cloud_model: str | None = None) -> CascadeResult:
    """The result of a decision, given the cloud's answer (or its error, or None when not deferred)."""
    base = {"confidence": confidence, "calibrated": calibrated, "reason": decision.reason,
            "threshold": decision.threshold, "device_text": device_text, "device_s": device_s, "features": feats}
    if isinstance(cloud, CloudAnswer):
        return CascadeResult(text=cloud.text, tier="cloud", cloud_s=cloud.latency_s, cloud_model=cloud.model,
                             cloud_prompt_tokens=cloud.prompt_tokens, cloud_completion_tokens=cloud.completion_tokens,
                             cloud_usage_reported=cloud.usage_reported,
                             finish_reason=cloud.finish_reason, **base)
    failed = isinstance(cloud, CloudError)
    return CascadeResult(text=device_text, tier="device", finish_reason=device_finish, cloud_model=cloud_model,
                         cloud_s=cloud.latency_s if failed and cloud_s is None else cloud_s,  # the wait that failed
                         fallback=cloud.kind if failed else None, error=str(cloud) if failed else None,
                         **base)


CUT_SHORT = ("length", "content_filter")  # a cloud answer that did not end: no target to learn from


def should_keep(policy: Policy, request: RequestPolicy, result: CascadeResult) -> bool:
    """A hard sample is kept when the cloud answered a deferred request in full and keeping is on (never a private
    one). An answer cut off by max_tokens would teach the device, with the end-of-turn token training adds, to stop
    mid-sentence."""
    keep = policy.keep_hard if request.keep is None else request.keep
    return keep and not request.never_defer and result.tier == "cloud" and result.finish_reason not in CUT_SHORT


def keep_sample(store_path: str | Path | None, source: str, device_model: str, device_sha256: str | None,
                messages: Sequence[dict], result: CascadeResult) -> int:
    """Write a hard sample (the input and both answers) to the SQLite store."""
    from ..store import Store

    with Store(store_path) as db:
        return db.add_hard_sample(source=source, device_model=device_model, device_sha256=device_sha256,
                                  cloud_model=result.cloud_model, confidence=result.confidence,
                                  messages=wire_messages(messages), device_answer=result.device_text,
                                  cloud_answer=result.text,
                                  extra={**result.info(), "finish_reason": result.finish_reason})


def request_policy(value: RequestPolicy | dict | None) -> RequestPolicy:
    return fields.build(RequestPolicy, value, "cascade")


@fields.keywords("Cascade")
class Cascade:
    """The library door: ``Cascade(device_model, cloud_url).generate("Rewrite politely: ...")``.

    Args:
        device_model: a loaded :class:`ondevice.Model`, a model name or path (None: the default model).
        cloud_url: an OpenAI-compatible endpoint: its base URL as the openai client takes it (``.../v1``, Gemini's
            ``.../v1beta/openai``), or a bare ``http://host:port`` (``/v1`` is added); a query is sent as one.
        cloud_model: the model name to ask for there (None: the one ``/models`` lists; a cloud listing several
            wants it named).
        policy: threshold, budget, timeout and whether hard samples are kept.
        combiner: a :class:`Combiner`, a combiner file, or None (the one fitted for this model, else the
            uncalibrated ``exp(mean logprob)``).
        key_env: the environment variable holding the cloud's API key.
        store: where hard samples go (None: the default SQLite store).
    """

    def __init__(self, device_model=None, cloud_url: str | None = None, *, cloud_model: str | None = None,
                 policy: Policy | None = None, combiner: Combiner | str | Path | None = None,
                 key_env: str = DEFAULT_KEY_ENV, store: str | Path | None = None):
        from ..engine import Model, load
        from ..errors import InvalidArgument

        if not cloud_url or not isinstance(cloud_url, str):
            raise InvalidArgument(f"Cascade needs cloud_url, an OpenAI-compatible endpoint as a string (e.g. "
                                  f"'http://127.0.0.1:8081/v1'), got {cloud_url!r}")
        for name, value, kinds, what in (("cloud_model", cloud_model, (str, type(None)), "a model name or None"),
                                         ("key_env", key_env, (str,), "the name of an environment variable"),
                                         ("combiner", combiner, (Combiner, str, Path, type(None)),
                                          "a Combiner, a combiner file's path or None"),
                                         ("store", store, (str, Path, type(None)), "a SQLite file's path or None")):
            if not isinstance(value, kinds) or (isinstance(value, str) and not value):
                raise InvalidArgument(f"Cascade {name}={value!r}: give {what}")
        self.policy = fields.build(Policy, policy, "policy")
        self.budget = Budget(self.policy.budget, self.policy.window_s)
        # everything that can refuse the arguments comes before the model is loaded
        self.cloud = CloudClient(cloud_url, model=cloud_model, key_env=key_env, timeout=self.policy.timeout_s)
        self._owns_model = not isinstance(device_model, Model)
        try:
            self.model = load(device_model) if self._owns_model else device_model
            self.sha256 = _sha256(self.model.path)
            self.combiner = combiner if isinstance(combiner, Combiner) else find_combiner(self.sha256, combiner)
            self.policy = with_combiner(self.policy, self.combiner)
            said = (threshold_warning(self.policy, self.combiner, "policy threshold", "Policy(defer_share=0.4)"),
                    combiner_warning(self.combiner, self.model.name))
        except BaseException:
            self.cloud.close()
            if self._owns_model and hasattr(self, "model"):
                self.model.close()
            raise
        self.store = store
        for warning in filter(None, said):  # as `ondevice serve --cascade` says at start-up (the same checks)
            warnings.warn(warning, stacklevel=2)

    def confidence(self, stats: TokenStats) -> tuple[float, dict]:
        feats = stats.features()
        return self.combiner.predict(feats), feats

    def generate(self, prompt, *, cascade: RequestPolicy | dict | None = None, sampling: Sampling | None = None,
                 **sampling_kw) -> CascadeResult:
        """Answer on the device; defer to the cloud when unsure (see :class:`CascadeResult`)."""
        rp = request_policy(cascade)
        s = dataclasses.replace(Sampling.of(sampling, **sampling_kw), token_stats=True)
        if not isinstance(prompt, (str, Sequence)) or isinstance(prompt, (bytes, bytearray)):
            from ..errors import InvalidArgument

            raise InvalidArgument(f"Cascade.generate: the prompt is a {type(prompt).__name__}; give a string or a "
                                  f"list of chat messages ({{'role': 'user', 'content': '...'}})")
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        validate_messages(messages)  # before the confidence features read them
        t0 = time.perf_counter()
        stats, last = TokenStats(messages), None
        device = self.model.stream(messages, sampling=s)
        try:
            # always_defer: the cloud is asked once the first token is scored, as the server's (the device's whole
            # answer is decoded only when the cloud gives none: the fallback)
            for g in device:
                stats.add(g)
                last = g
                if rp.always_defer:
                    break
            device_s = time.perf_counter() - t0
            conf, feats = self.confidence(stats)
            decision = decide(conf, self.policy, rp, self.budget)
            cloud: CloudAnswer | CloudError | None = None
            if decision.defer:
                try:
                    cloud = self.cloud.chat(messages, **cloud_sampling(s))
                except CloudError as e:
                    if not e.sent:  # a request the cloud may have got (and billed) stays charged
                        self.budget.refund()
                    cloud = e
            if not isinstance(cloud, CloudAnswer):
                t1 = time.perf_counter()
                for g in device:  # the rest of the device's answer (nothing left unless it stopped early above)
                    stats.add(g)
                    last = g
                device_s += time.perf_counter() - t1
        finally:
            device.close()
        result = finish(decision, conf, self.combiner.calibrated, feats, stats.text, device_s,
                        last.finish_reason if last else "length", cloud)
        if should_keep(self.policy, rp, result):
            keep_sample(self.store, "library", self.model.name, self.sha256, messages, result)
        return result

    def close(self) -> None:
        self.cloud.close()
        if self._owns_model:
            self.model.close()

    def __enter__(self) -> Cascade:  # noqa: PYI034 — a plain class, not meant to be subclassed
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def cloud_sampling(s: Sampling) -> dict:
    """The sampling the cloud gets, as ``serve --cascade`` forwards it: OpenAI's fields (a random seed, penalties
    of 0 and no token cap, -1, are not sent: the cloud's defaults)."""
    return {"temperature": s.temp, "top_p": s.top_p, "max_tokens": s.max_tokens if s.max_tokens >= 0 else None,
            "stop": list(s.stop) or None,
            "seed": None if s.seed == Sampling().seed else s.seed, "presence_penalty": s.presence_penalty or None,
            "frequency_penalty": s.frequency_penalty or None}


def _sha256(path) -> str | None:
    try:
        from ..models.store import cached_sha256

        return cached_sha256(Path(path))
    except (OSError, ImportError):
        return None

