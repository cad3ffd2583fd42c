"""Speed, memory, energy and % of roofline of models on this device (llama-bench's tests and more).

``ondevice.bench(...)`` (:func:`ondevice.bench.api.bench`) runs a sweep; each configuration runs in its own
worker process (:mod:`ondevice.bench.worker`) and each test becomes one record in the store.
"""

from .record import BenchRecord
from .workloads import WORKLOADS, Sample, TestSpec, Workload, parse_tests, workload

__all__ = ["WORKLOADS", "BenchRecord", "Sample", "TestSpec", "Workload", "parse_tests", "workload"]


from ..callable_module import make_callable as _make_callable

_make_callable(__name__, "ondevice.bench.api:bench")  # ondevice.bench(...) after the import, too
