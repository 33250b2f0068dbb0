"""Per-step signals stored as row blocks: a run of consecutive steps of one block is a free view.

_Run holds what one forward shares across its chunks and windows: weights cast once, input frames, sizes.
"""
import torch
import torch.nn as nn


def _exporting():
    """True while torch.export traces the model (export_onnx.py)."""
    return bool(getattr(torch.compiler, "is_exporting", lambda: False)())


class _Timeline:
    """Per-step tensors (B, C, H, W) of one signal; entries point into (n*B, C, H, W) blocks, no copies.

    Per-step views of a block come from one torch.split, so backward materialises one gradient per
    block rather than one full-size zero-filled gradient per slice (SliceBackward), which dominated.
    """

    def __init__(self, batch):
        self.batch = batch
        self.entries = {}  # step -> (block, row)
        self._views = {}   # id(block) -> (block, per-step views)

    def put_block(self, steps, block):
        for i, t in enumerate(steps):
            self.entries[t] = (block, i)

    def hold(self, t):
        self.entries[t] = self.entries[t - 1]

    def has(self, t):
        return t in self.entries

    def step(self, t):
        block, i = self.entries[t]
        if block.shape[0] == self.batch:
            return block
        if _exporting():  # torch 2.11's strict export cannot trace id(); the traced graph needs no cache
            return block.unflatten(0, (-1, self.batch)).unbind(0)[i]
        cached = self._views.get(id(block))
        if cached is None or cached[0] is not block:
            # (n*B, ...) -> n views of (B, ...); unflatten + unbind rather than split(B), whose piece count
            # ceil(n*B / B) torch.export cannot prove for every batch size (it would fix the exported batch)
            cached = (block, block.unflatten(0, (-1, self.batch)).unbind(0))
            self._views[id(block)] = cached
        return cached[1][i]

    def rows(self, steps):
        """(len(steps)*B, ...) for the given steps: whole blocks as they are, other steps copied once."""
        parts, i = [], 0
        while i < len(steps):
            block, row = self.entries[steps[i]]
            n = block.shape[0] // self.batch
            if row == 0 and i + n <= len(steps) and all(
                    self.entries[steps[i + j]][0] is block and self.entries[steps[i + j]][1] == j
                    for j in range(n)):
                parts.append(block)
                i += n
            else:
                parts.append(self.step(steps[i]))
                i += 1
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def prune(self, keep_from):
        for t in [t for t in self.entries if t < keep_from]:
            del self.entries[t]
        if not self._views:  # nothing cached (always so under torch.export)
            return
        live = {id(b) for b, _ in self.entries.values()}
        for key in [k for k in self._views if k not in live]:
            del self._views[key]


class _Run:
    """What one forward shares across chunks: weights cast once, input frames, sizes, static schedule."""

    def __init__(self, model, images, dtype):
        cfg = model.cfg
        self.model, self.dtype = model, dtype
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        if images.dim() == 4:        # (B, C, H, W): a static image shown for n_timesteps steps
            self.video = None
            self.n_stimulus = cfg.n_timesteps
            image = images.to(dtype).contiguous(memory_format=self.memory_format)
            self.image, self.blank = image, torch.zeros_like(image)
        elif images.dim() == 5:      # (B, T_in, C, H, W): one frame per step, then blank
            self.video = images.to(dtype)
            self.n_stimulus = images.shape[1]
            self.blank = torch.zeros_like(self.video[:, 0]).contiguous(memory_format=self.memory_format)
        else:
            raise ValueError(f"images must be (B, C, H, W) or (B, T, C, H, W), got shape {tuple(images.shape)}")
        if images.shape[-3] != cfg.in_channels:
            raise ValueError(f"images have {images.shape[-3]} channels but model.in_channels={cfg.in_channels}")
        self.batch = images.shape[0]
        self.total = self.n_stimulus + cfg.residual()
        self.sizes, self.pooled_sizes = model.spatial_sizes(images.shape[-2], images.shape[-1])
        self.refresh_casts()
        self.next_keys = None

    def refresh_casts(self):
        """Cast every weight to the compute dtype once (autograd sees one cast per weight, not per window)."""
        self.weights = {}
        for module in self.model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                # keep the parameter's layout (prepare_model makes conv weights channels_last on GPUs):
                # a different layout would hand DDP gradients whose strides do not match its buckets
                w = module.weight.to(dtype=self.dtype)
                b = None if module.bias is None else module.bias.to(self.dtype)
                self.weights[module] = (w, b)
        self.fused = {}
        # the tensors the memory strategies' saved-tensor hooks must leave alone (weights and their casts), by
        # address; torch.export has no addresses (torch 2.11's exporter fails on data_ptr) and runs no strategy
        self.protected = set()
        if not _exporting():
            self.protected = {t.data_ptr() for pair in self.weights.values() for t in pair if t is not None}
            self.protected |= {p.data_ptr() for p in self.model.parameters()}

    def fused_weights(self, area):
        """conv2 and the recurrent conv as one conv over [ff, past rate] channels (same math, one kernel)."""
        if area not in self.fused:
            w2, b2 = self.weights[area.conv2]
            wr, br = self.weights[area.recurrence[0]]
            w = torch.cat([w2, wr], dim=1).contiguous(memory_format=self.memory_format)
            bias = None if b2 is None else b2 + br
            self.fused[area] = (w, bias)
            if not _exporting():
                self.protected |= {t.data_ptr() for t in (w, bias) if t is not None}
        return self.fused[area]

    def frames(self, steps):
        """Input rows for the given steps: the stimulus while it is shown, blank after."""
        parts = []
        for t in steps:
            if t >= self.n_stimulus:
                parts.append(self.blank)
            elif self.video is None:
                parts.append(self.image)
            else:
                parts.append(self.video[:, t].contiguous(memory_format=self.memory_format))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

