"""Speed, memory, energy and % of roofline of models on this device (llama-bench's tests and more).

``ondevice.bench(...)`` (:func:`ondevice.bench.api.bench`) runs a sweep; each configuration runs in its own
worker process (:mod:`ondevice.bench.worker`) and each test becomes one record in the store.
"""

from .record import BenchRecord
from .workloads import WORKLOADS, Sample, TestSpec, Workload, parse_tests, workload

__all__ = ["WORKLOADS", "BenchRecord", "Sample", "TestSpec", "Workload", "parse_tests", "workload"]


# ``ondevice.bench`` is both this package and the library function in ``ondevice/__init__``: importing
# the package rebinds the attribute ``ondevice.bench`` to the module, so the module itself must stay
# callable for ``ondevice.bench(...)`` to keep working after the first import.
import sys as _sys
import types as _types


class _CallableModule(_types.ModuleType):
    def __call__(self, *args, **kw):
        from .api import bench

        return bench(*args, **kw)


_sys.modules[__name__].__class__ = _CallableModule
