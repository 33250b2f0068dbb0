"""GPU energy from the driver's cumulative energy counter (NVML), read through ctypes; no extra package.

Only the counter is used: no energy figure is ever derived from sample counts or power estimates.
Where NVML or the counter is missing (CPU machines, old GPUs), readings are None -> "not measured".
"""
import ctypes


class EnergyMeter:
    """Joules consumed by one GPU between start() and read(), or None where the driver has no counter."""

    def __init__(self, device):
        self.available = False
        self._start = None
        if getattr(device, "type", str(device)) != "cuda":
            return
        try:
            self._nvml = ctypes.CDLL("libnvidia-ml.so.1")
            if self._nvml.nvmlInit_v2() != 0:
                return
            self._handle = ctypes.c_void_p()
            index = device.index if device.index is not None else 0
            # NVML numbers GPUs as the driver does; with CUDA_VISIBLE_DEVICES unset that is CUDA's order.
            if self._nvml.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(self._handle)) != 0:
                return
            self.available = self._millijoules() is not None
        except OSError:
            self.available = False

    def _millijoules(self):
        value = ctypes.c_ulonglong()
        if self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle, ctypes.byref(value)) != 0:
            return None
        return value.value

    def start(self):
        self._start = self._millijoules() if self.available else None

    def read(self):
        """Joules since start(), or None if not measured."""
        if not self.available or self._start is None:
            return None
        now = self._millijoules()
        return None if now is None else (now - self._start) / 1000.0
