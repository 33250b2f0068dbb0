"""GPU energy from the driver's cumulative energy counter (NVML, through nvidia-ml-py's `pynvml`).

Only the counter is used: no energy figure is ever derived from sample counts or power estimates.
The GPU is looked up by its UUID, not its index: CUDA numbers only the visible GPUs (CUDA_VISIBLE_DEVICES=1
makes NVML's GPU 1 CUDA's cuda:0), so an index would read another GPU's counter.
Where NVML, the package or the counter is missing (CPU machines, old GPUs), readings are None -> "not measured".
"""
import torch


def nvml_uuid(cuda_uuid):
    """NVML's name of a GPU ("GPU-xxxxxxxx-xxxx-...") from the UUID torch reports (the bare hex groups)."""
    text = str(cuda_uuid)
    return text if text.startswith(("GPU-", "MIG-")) else f"GPU-{text}"


class EnergyMeter:
    """Joules consumed by one GPU between start() and read(), or None where the driver has no counter."""

    def __init__(self, device):
        self.available = False
        self._start = None
        device = torch.device(device)
        if device.type != "cuda":
            return
        try:
            import pynvml
        except ImportError:  # nvidia-ml-py not installed (requirements.txt): not measured
            return
        try:
            pynvml.nvmlInit()
            index = device.index if device.index is not None else torch.cuda.current_device()
            self._handle = pynvml.nvmlDeviceGetHandleByUUID(nvml_uuid(torch.cuda.get_device_properties(index).uuid))
        except (pynvml.NVMLError, RuntimeError):  # no driver / library, or NVML does not know this GPU
            return
        self._nvml = pynvml
        self.available = self._millijoules() is not None

    def _millijoules(self):
        try:
            return self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
        except self._nvml.NVMLError:  # e.g. NOT_SUPPORTED: GPUs before Volta, MIG slices
            return None

    def start(self):
        self._start = self._millijoules() if self.available else None

    def read(self):
        """Joules since start(), or None if not measured."""
        if not self.available or self._start is None:
            return None
        now = self._millijoules()
        return None if now is None else (now - self._start) / 1000.0
