"""Custom autograd nodes: one node per Euler scan (keeps only the rates), max pool without stored indices.

The Euler scan is one autograd node that keeps only its output (the rates); on GPUs with Triton it is one
kernel per run. `use_fused_scan = False` (set here, in lib.dynvision.scan) forces the torch ops.
"""
import torch
import torch.nn.functional as F

try:  # the fused scan kernel is optional: CPUs and machines without Triton use the torch ops below
    import triton
    import triton.language as tl

    @triton.jit
    def _scan_fwd_kernel(x_ptr, rec_ptr, prev_ptr, out_ptr, n_steps, numel, alpha,
                         HAS_REC: tl.constexpr, HAS_PREV: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        if HAS_PREV:
            h = tl.load(prev_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        else:
            h = tl.zeros([BLOCK], dtype=tl.float32)
        at = offs  # int64 offsets, advanced by one step per iteration: n steps may pass 2**31 elements
        for _ in range(n_steps):
            d = tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32)
            if HAS_REC:
                d += tl.load(rec_ptr + at, mask=mask, other=0.0).to(tl.float32)
            h = tl.maximum(h + alpha * (d - h), 0.0)
            stored = h.to(out_ptr.dtype.element_ty)
            tl.store(out_ptr + at, stored, mask=mask)
            h = stored.to(tl.float32)  # the next step starts from the stored rate, as after a checkpoint
            at += numel

    @triton.jit
    def _scan_bwd_kernel(grad_ptr, out_ptr, grad_drive_ptr, grad_prev_ptr, n_steps, numel, alpha,
                         HAS_PREV: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        carry = tl.zeros([BLOCK], dtype=tl.float32)
        at = offs  # int64 offsets of the last step, then walked backwards
        for _ in range(n_steps - 1):
            at += numel
        for _ in range(n_steps):
            g = tl.load(grad_ptr + at, mask=mask, other=0.0).to(tl.float32) + (1.0 - alpha) * carry
            o = tl.load(out_ptr + at, mask=mask, other=0.0)
            g = tl.where(o > 0, g, 0.0)
            tl.store(grad_drive_ptr + at, (alpha * g).to(grad_drive_ptr.dtype.element_ty), mask=mask)
            carry = g
            at -= numel
        if HAS_PREV:
            tl.store(grad_prev_ptr + offs, ((1.0 - alpha) * carry).to(grad_prev_ptr.dtype.element_ty), mask=mask)

    HAVE_TRITON = True
except Exception:  # noqa: BLE001 - any import problem means: use the torch path
    HAVE_TRITON = False

_SCAN_BLOCK = 1024
use_fused_scan = True  # module switch (tests compare both paths)
_TRITON_ON_CPU = False  # tests run the kernels under TRITON_INTERPRET=1


def _same_layout(ref, *others):
    return all(o is None or (o.shape == ref.shape and o.stride() == ref.stride() and o.dtype == ref.dtype)
               for o in others)


def _fusable(drive, rec, prev):
    dense = drive.is_contiguous() or drive.is_contiguous(memory_format=torch.channels_last)
    return (use_fused_scan and HAVE_TRITON and (drive.is_cuda or _TRITON_ON_CPU) and dense and _same_layout(drive, rec)
            and (prev is None or (prev.dtype == drive.dtype and prev.stride() == drive[:prev.shape[0]].stride())))


class _EulerScan(torch.autograd.Function):
    """r_i = relu(lerp(r_{i-1}, drive_i, alpha)), drive = x (+ rec), over n steps stacked as rows of B.

    One autograd node that saves only its output (the rates): the relu mask and nothing else is needed.
    On GPUs with Triton the whole scan is one kernel (one read of x, rec and one write per step).
    """

    @staticmethod
    def forward(ctx, x, rec, prev, alpha, batch):
        n = x.shape[0] // batch
        fused = _fusable(x, rec, prev)
        out = torch.empty_like(x)
        if fused:
            numel = x[:batch].numel()
            grid = (triton.cdiv(numel, _SCAN_BLOCK),)
            _scan_fwd_kernel[grid](x, rec if rec is not None else x, prev if prev is not None else x, out, n,
                                   numel, float(alpha), HAS_REC=rec is not None, HAS_PREV=prev is not None,
                                   BLOCK=_SCAN_BLOCK)
        else:
            drive = x if rec is None else x + rec
            h = prev
            for i in range(n):
                d, o = drive[i * batch:(i + 1) * batch], out[i * batch:(i + 1) * batch]
                if h is None:
                    torch.mul(d, alpha, out=o)  # no past state yet: h = 0 + alpha * (drive - 0)
                else:
                    torch.lerp(h, d, alpha, out=o)
                o.relu_()
                h = o
        ctx.save_for_backward(out)
        ctx.alpha, ctx.batch, ctx.has_prev, ctx.has_rec = alpha, batch, prev is not None, rec is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (out,) = ctx.saved_tensors
        alpha, batch = ctx.alpha, ctx.batch
        n = out.shape[0] // batch
        grad_drive = torch.empty_like(out)
        grad_prev = None
        if _fusable(out, None, None) and HAVE_TRITON:
            if grad_out.stride() != out.stride():
                grad_out = torch.empty_like(out).copy_(grad_out)  # the kernel indexes both the same way
            numel = out[:batch].numel()
            if ctx.has_prev:
                grad_prev = torch.empty_like(out[:batch])
            grid = (triton.cdiv(numel, _SCAN_BLOCK),)
            _scan_bwd_kernel[grid](grad_out, out, grad_drive, grad_prev if grad_prev is not None else out, n,
                                   numel, float(alpha), HAS_PREV=ctx.has_prev, BLOCK=_SCAN_BLOCK)
        else:
            g = grad_out[(n - 1) * batch:]
            carry = None
            for i in reversed(range(n)):
                rows = slice(i * batch, (i + 1) * batch)
                if carry is not None:
                    g = torch.add(grad_out[rows], carry, alpha=1.0 - alpha)
                g = torch.ops.aten.threshold_backward(g, out[rows], 0)  # relu mask from the saved rate
                torch.mul(g, alpha, out=grad_drive[rows])
                carry = g
            if ctx.has_prev:
                grad_prev = carry * (1.0 - alpha)
        return grad_drive, (grad_drive if ctx.has_rec else None), grad_prev, None, None


def euler_scan(x, rec, prev, alpha, batch):
    """Euler-integrate and rectify n stacked steps (rows of `batch`): drive = x + rec, from rate `prev` (None = 0)."""
    return _EulerScan.apply(x, rec, prev, alpha, batch)


class _MaxPoolNoIndices(torch.autograd.Function):
    """3x3/2 max pool that recomputes its argmax in backward: the input (a rate) is saved anyway."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return F.max_pool2d(x, 3, 2, 1)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        _, idx = torch.ops.aten.max_pool2d_with_indices(x, [3, 3], [2, 2], [1, 1])
        return torch.ops.aten.max_pool2d_with_indices_backward(grad, x, [3, 3], [2, 2], [1, 1], [1, 1], False, idx)


def _pool_size(n):
    return (n + 2 - 3) // 2 + 1

