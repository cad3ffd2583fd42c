"""Prometheus text exposition (format 0.0.4) for the server, without a client library.

Counters and histograms are updated from the batcher thread and the event loop; one lock guards them.
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict
from collections.abc import Callable, Sequence

# seconds; TTFT spans queue wait + prefill, ITL one decode step of the whole batch
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


class Histogram:
    def __init__(self, buckets: Sequence[float]):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # last: +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, v)] += 1
        self.sum += v
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, acc = [], 0
        for b, c in zip(self.buckets, self.counts):
            acc += c
            out.append(f'{name}_bucket{{le="{b:g}"}} {acc}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out.append(f"{name}_sum {self.sum:.6f}")
        out.append(f"{name}_count {self.count}")
        return out


class Metrics:
    """The server's counters, histograms and gauges (gauges are read at scrape time)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.generation_tokens = 0
        self.decode_steps = 0
        self.cancelled = 0
        self.prompt_seconds = 0.0  # admission to first token, summed over requests (prefill time)
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.batch_tokens = Histogram(BATCH_BUCKETS)
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}

    def request(self, route: str, status: int) -> None:
        with self.lock:
            self.requests[(route, status)] += 1

    def gauge(self, name: str, help_: str, fn: Callable[[], float]) -> None:
        self.gauges[name] = (help_, fn)

    def render(self) -> str:
        p = "ondevice_"
        with self.lock:
            lines = [f"# HELP {p}requests_total HTTP requests by route and status code.",
                     f"# TYPE {p}requests_total counter"]
            for (route, status), n in sorted(self.requests.items()):
                lines.append(f'{p}requests_total{{route="{route}",code="{status}"}} {n}')
            for name, help_, v in (
                    ("prompt_tokens_total", "Prompt tokens received.", self.prompt_tokens),
                    ("prompt_tokens_cached_total", "Prompt tokens whose KV was reused (prefix cache).",
                     self.cached_tokens),
                    ("generation_tokens_total", "Tokens generated.", self.generation_tokens),
                    ("decode_steps_total", "llama_decode calls made by the batcher.", self.decode_steps),
                    ("requests_cancelled_total", "Generations cancelled (disconnect or timeout).", self.cancelled)):
                lines += [f"# HELP {p}{name} {help_}", f"# TYPE {p}{name} counter", f"{p}{name} {v}"]
            for name, help_, h in (
                    ("time_to_first_token_seconds", "Arrival to first generated token (queue + prefill).",
                     self.ttft),
                    ("inter_token_latency_seconds", "Time between consecutive tokens of one stream.", self.itl),
                    ("batch_tokens", "Tokens per llama_decode step.", self.batch_tokens)):
                lines += [f"# HELP {p}{name} {help_}", f"# TYPE {p}{name} histogram", *h.lines(p + name)]
        for name, (help_, fn) in self.gauges.items():
            lines += [f"# HELP {p}{name} {help_}", f"# TYPE {p}{name} gauge", f"{p}{name} {fn():g}"]
        return "\n".join(lines + self._llamacpp()) + "\n"

    def _llamacpp(self) -> list[str]:
        """llama-server's names (``llamacpp:*``, its --metrics) for the same counts: its dashboards and alerts
        read this server as they read it. Its throughputs are averages over the server's life here."""
        gauge = {name: fn for name, (_, fn) in self.gauges.items()}
        with self.lock:
            decode_s = self.itl.sum  # the time between the tokens of each stream: its decoding
            rows = [("prompt_tokens_total", "counter", "Number of prompt tokens processed.", self.prompt_tokens),
                    ("prompt_seconds_total", "counter", "Prompt process time", self.prompt_seconds),
                    ("tokens_predicted_total", "counter", "Number of generation tokens processed.",
                     self.generation_tokens),
                    ("tokens_predicted_seconds_total", "counter", "Predict process time", decode_s),
                    ("n_decode_total", "counter", "Total number of llama_decode() calls", self.decode_steps),
                    ("prompt_tokens_seconds", "gauge", "Average prompt throughput in tokens/s.",
                     self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0),
                    ("predicted_tokens_seconds", "gauge", "Average generation throughput in tokens/s.",
                     self.itl.count / decode_s if decode_s else 0.0)]
        rows += [("requests_processing", "gauge", "Number of requests processing.",
                  gauge["slots_busy"]() if "slots_busy" in gauge else 0),
                 ("requests_deferred", "gauge", "Number of requests deferred.",
                  gauge["queue_depth"]() if "queue_depth" in gauge else 0)]
        out = []
        for name, kind, help_, v in rows:
            out += [f"# HELP llamacpp:{name} {help_}", f"# TYPE llamacpp:{name} {kind}", f"llamacpp:{name} {v:g}"]
        return out
