"""What the device is and can do: info, measured roofs, roofline, limits to emulate smaller devices, energy."""

from __future__ import annotations

from .energy import DEFAULT_WATTS_PER_CORE, EnergyMeter
from .info import device_info, machine_key
from .limits import AppliedLimits, apply_profile, remove_cgroup
from .probe import Probe, probe
from .profile import BUILTIN_PROFILES, DeviceProfile, parse_profile, parse_size
from .roofline import Cost, decode_cost, prefill_cost, roofline

__all__ = [
    "BUILTIN_PROFILES",
    "DEFAULT_WATTS_PER_CORE",
    "AppliedLimits",
    "Cost",
    "DeviceProfile",
    "EnergyMeter",
    "Probe",
    "apply_profile",
    "decode_cost",
    "device_info",
    "machine_key",
    "parse_profile",
    "parse_size",
    "prefill_cost",
    "probe",
    "remove_cgroup",
    "roofline",
]
