"""lib/energy.py: the NVML counter of the GPU CUDA uses (found by UUID, not index), or None: never a made-up number."""
import sys
import types

import pytest
import torch

from lib import energy

# NVML numbers every GPU of the machine; CUDA only the visible ones
NVML_UUIDS = ["GPU-00000000-1111-2222-3333-444444444444", "GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"]


class _CudaUUID:
    """Stands in for torch's _CUuuid, whose str() is the bare hex groups without NVML's 'GPU-'."""

    def __init__(self, text):
        self.text = text

    def __str__(self):
        return self.text


def fake_pynvml(energy_supported=True):
    """A pynvml module over two GPUs whose counters the test advances by hand (millijoules)."""
    nvml = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    nvml.NVMLError = NVMLError
    nvml.counters = [1_000_000, 7_000_000]
    nvml.nvmlInit = lambda: None
    nvml.nvmlDeviceGetHandleByIndex = lambda i: ("nvml", i)  # present, so a lookup by CUDA index would "work"

    def by_uuid(uuid):
        if uuid not in NVML_UUIDS:
            raise NVMLError("Not Found")
        return ("nvml", NVML_UUIDS.index(uuid))

    def total_energy(handle):
        if not energy_supported:
            raise NVMLError("Not Supported")
        return nvml.counters[handle[1]]

    nvml.nvmlDeviceGetHandleByUUID = by_uuid
    nvml.nvmlDeviceGetTotalEnergyConsumption = total_energy
    return nvml


@pytest.fixture
def visible_second_gpu(monkeypatch):
    """CUDA_VISIBLE_DEVICES=1: cuda:0 is NVML's GPU 1."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    visible = [NVML_UUIDS[1]]
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: types.SimpleNamespace(uuid=_CudaUUID(visible[i].removeprefix("GPU-"))))


@pytest.mark.parametrize("device", [torch.device("cuda", 0), "cuda"])
def test_reads_the_counter_of_the_gpu_cuda_uses_not_the_one_with_its_index(monkeypatch, visible_second_gpu, device):
    nvml = fake_pynvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    meter = energy.EnergyMeter(device)
    assert meter.available
    meter.start()
    nvml.counters[0] += 9_000  # NVML GPU 0 (not ours) works hard
    nvml.counters[1] += 2_500  # ours: 2.5 J
    assert meter.read() == 2.5


def test_not_measured_without_a_counter(monkeypatch, visible_second_gpu):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(energy_supported=False))
    meter = energy.EnergyMeter(torch.device("cuda", 0))
    meter.start()
    assert not meter.available and meter.read() is None


def test_not_measured_when_nvml_does_not_know_the_gpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml())
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: types.SimpleNamespace(uuid=_CudaUUID("99999999-9999-9999-9999-999999999999")))
    meter = energy.EnergyMeter(torch.device("cuda", 0))
    meter.start()
    assert not meter.available and meter.read() is None


def test_not_measured_without_the_package_or_a_gpu(monkeypatch, visible_second_gpu):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    meter = energy.EnergyMeter(torch.device("cuda", 0))
    meter.start()
    assert not meter.available and meter.read() is None
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml())
    cpu = energy.EnergyMeter(torch.device("cpu"))
    cpu.start()
    assert not cpu.available and cpu.read() is None


def test_nvml_uuid_adds_the_prefix_nvml_expects():
    assert energy.nvml_uuid(_CudaUUID("aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee")) == NVML_UUIDS[1]
    assert energy.nvml_uuid(NVML_UUIDS[0]) == NVML_UUIDS[0]
