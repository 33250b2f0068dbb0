"""Recurrent vision models with biological delays (DyRCNN, after DynVision by Gutzen & Lindsay, 2025).

Four areas V1 -> V2 -> V4 -> IT, each a feedforward convolution (two in the x8 preset) plus a recurrent
convolution over the area's own delayed past rate, integrated with Euler dynamics

    h(t) = r(t-1) + dt/tau * (drive(t) - r(t-1)),   r(t) = relu(h(t)),
    drive(t) = ff(input(t)) + rec(r(t - recurrent_delay)) [+ skip] [+ feedback]

where the input of area k is area k-1's pooled rate from `forward_delay` steps ago and the readout sees
IT's rate `forward_delay` steps ago. An area is silent until its input first arrives; a connection whose
source has not started yet contributes nothing (as in DynVision, where those states are None).

Modules, by purpose (everything is re-exported here: `from lib.dynvision import DyRCNN, ...`):
  model.py     ModelConfig, LossConfig, the DyRCNN model (windows of steps batched per area), the loss and
               metrics over timesteps, parameter and FLOP counts
  timeline.py  what one forward keeps: per-step signals as row blocks (_Timeline), weights cast once (_Run)
  scan.py      the custom autograd nodes: the Euler scan (one Triton kernel per run on GPUs) and max pool
               without stored indices. Its switch `use_fused_scan` is read there: set
               `lib.dynvision.scan.use_fused_scan`, not an attribute of this package
  memory.py    MemoryConfig and the strategies: checkpoint, offload, compress, stream; saved-tensor policies
"""
from lib.dynvision.memory import (STRATEGY_PARTS, MemoryConfig, SavedBytesMeter, check_schedule,
                                  saved_tensor_policy, stream_backward, stream_windows, strategy_forward)
from lib.dynvision.model import (AREAS, FEEDBACK_SOURCES, PRESETS, RECURRENCE_TYPES, SKIP_SOURCES, Area, AreaSpec,
                                 DyRCNN, LossConfig, ModelConfig, accuracy_per_step, build_model, count_params,
                                 flops_per_sample, reaction_step, timestep_loss)
from lib.dynvision.scan import HAVE_TRITON, euler_scan

__all__ = ["AREAS", "FEEDBACK_SOURCES", "HAVE_TRITON", "PRESETS", "RECURRENCE_TYPES", "SKIP_SOURCES",
           "STRATEGY_PARTS", "Area", "AreaSpec", "DyRCNN", "LossConfig", "MemoryConfig", "ModelConfig",
           "SavedBytesMeter", "accuracy_per_step", "build_model", "check_schedule", "count_params", "euler_scan",
           "flops_per_sample", "reaction_step", "saved_tensor_policy", "stream_backward", "stream_windows",
           "strategy_forward", "timestep_loss"]
