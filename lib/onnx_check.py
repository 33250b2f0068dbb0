"""Prove an exported ONNX model computes what the PyTorch model computes; quantize it to int8; time both on the CPU.

    inputs = sample_inputs(data, "test", n, shape, seed)           # real samples, or seeded random (said which)
    report = parity(model.module, "model.onnx", inputs.images, model)   # max abs / relative error, top-1 agreement
    quantize(model, "model.onnx", "model.int8.onnx", calibration)  # static QDQ (conv nets) or dynamic (Linear)
    rows = latency({"torch eager fp32": ..., "ort fp32": ..., "ort int8": ...}, images, [1, 32], threads)

Relative error is max |onnxruntime - torch| / max |torch| over each output tensor: the error in units of the
output's scale, so one tolerance fits logits and embeddings alike (the reported number is the worst output).
"""
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

TINY = 1e-12


@dataclass
class Inputs:
    images: torch.Tensor            # (N, C, H, W) float32, normalized as the model saw its data
    labels: torch.Tensor | None     # (N,) when the samples are real
    description: str                # where they came from


def sample_inputs(data, split, count, shape, seed=0, unavailable=""):
    """The first `count` samples of the split in order, as the model's loader normalizes them; seeded N(0, 1)
    noise of `shape` when the data is unavailable (the description says which)."""
    if data is not None:
        from lib.data import in_order
        loader = in_order(data.train if split == "train" else data.test)
        images, labels = [], []
        for x, y, _ in loader:
            images.append(x.float().contiguous())
            labels.append(y)
            if sum(len(t) for t in labels) >= count:
                break
        images, labels = torch.cat(images)[:count].contiguous(), torch.cat(labels)[:count]
        if tuple(images.shape[1:]) != tuple(shape):
            raise ValueError(f"the dataset gives samples of shape {tuple(images.shape[1:])}, the model takes {shape}")
        return Inputs(images, labels, f"{len(images)} real samples, {split} split, in order")
    g = torch.Generator().manual_seed(seed + (0 if split == "test" else 1))
    why = f" (data unavailable: {unavailable})" if unavailable else ""
    return Inputs(torch.randn(count, *shape, generator=g), None, f"{count} seeded random N(0, 1) inputs, "
                  f"seed {seed}{why}")


def session(path, threads):
    """An onnxruntime CPU session with every graph optimization, `threads` intra-op threads, sequential ops."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: fused-node notices are not for the user
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_session(sess, images, batch=256):
    """All outputs of `sess` for `images`, fed in batches of `batch`; a list of arrays in output order."""
    parts = [sess.run(None, {"images": images[i:i + batch].numpy()}) for i in range(0, len(images), batch)]
    return [np.concatenate([p[k] for p in parts]) for k in range(len(parts[0]))]


@torch.inference_mode()
def run_torch(module, images, batch=256):
    parts = []
    for i in range(0, len(images), batch):
        out = module(images[i:i + batch])
        parts.append([o.float().numpy() for o in out])
    return [np.concatenate([p[k] for p in parts]) for k in range(len(parts[0]))]


def compare(reference, candidate, names, class_output):
    """Per-output max abs error, output scale, relative error; top-1 agreement on the class output; cosine
    similarity of the first output for encoders (no classes)."""
    outputs = {}
    for name, ref, got in zip(names, reference, candidate):
        if ref.shape != got.shape:
            raise ValueError(f"output {name} has shape {got.shape}, PyTorch gives {ref.shape}")
        abs_err = float(np.abs(got.astype(np.float64) - ref).max()) if ref.size else 0.0
        scale = float(np.abs(ref).max()) if ref.size else 0.0
        outputs[name] = {"max_abs_err": abs_err, "output_scale": scale, "rel_err": abs_err / max(scale, TINY)}
    result = {"outputs": outputs, "max_abs_err": max(o["max_abs_err"] for o in outputs.values()),
              "rel_err": max(o["rel_err"] for o in outputs.values())}
    if class_output is not None:
        k = names.index(class_output)
        ref_top, got_top = reference[k].argmax(-1), candidate[k].argmax(-1)
        result["top1_agreement"] = float((ref_top == got_top).mean())
        result["distinct_predictions"] = int(len(np.unique(ref_top)))
    else:
        a, b = reference[0].reshape(len(reference[0]), -1), candidate[0].reshape(len(candidate[0]), -1)
        cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), TINY)
        result[f"cosine_{names[0]}_min"] = float(cos.min())
        result[f"cosine_{names[0]}_mean"] = float(cos.mean())
    return result


def accuracy(outputs, names, class_output, labels):
    """Top-1 accuracy against the dataset's labels (None without real labels or a class output)."""
    if labels is None or class_output is None:
        return None
    return float((outputs[names.index(class_output)].argmax(-1) == labels.numpy()).mean())


def parity(module, onnx_path, inputs, names, class_output, threads):
    """PyTorch vs onnxruntime on the same inputs, at the full count and at batch 1 (another batch size than the
    one traced): errors, agreement, and the PyTorch outputs (the int8 comparison reuses them)."""
    sess = session(onnx_path, threads)
    reference = run_torch(module, inputs.images)
    candidate = run_session(sess, inputs.images, batch=len(inputs.images))
    result = compare(reference, candidate, names, class_output)
    single = sess.run(None, {"images": inputs.images[:1].numpy()})
    single_err = max(float(np.abs(s - r[:1]).max() / max(np.abs(r).max(), TINY)) for s, r in zip(single, reference))
    result["rel_err"] = max(result["rel_err"], single_err)
    result["batch_sizes_checked"] = [len(inputs.images), 1]
    result["accuracy_torch"] = accuracy(reference, names, class_output, inputs.labels)
    return result, reference


# ----------------------------------------------------------------------------- int8
class _Calibration:
    """onnxruntime's CalibrationDataReader protocol over a tensor of samples, `batch` at a time."""

    def __init__(self, images, batch=16):
        self.batches = [images[i:i + batch].contiguous().numpy() for i in range(0, len(images), batch)]
        self.position = 0

    def get_next(self):
        if self.position >= len(self.batches):
            return None
        self.position += 1
        return {"images": self.batches[self.position - 1]}

    def rewind(self):
        self.position = 0


CALIBRATIONS = ("minmax", "percentile", "entropy")


def _end_nodes(path):
    """Names of the graph's first Conv and last Gemm/MatMul (the input layer and the classifier), where present."""
    import onnx
    nodes = onnx.load(str(path), load_external_data=False).graph.node
    first = next((n.name for n in nodes if n.op_type == "Conv"), None)
    last = next((n.name for n in reversed(nodes) if n.op_type in ("Gemm", "MatMul")), None)
    return [name for name in (first, last) if name]


def quantize(mode, fp32_path, out_path, calibration=None, per_channel=True, quant_format="QDQ",
             activations="uint8", reduce_range=False, calibration_method="minmax", percentile=99.999,
             fp32_ends=False):
    """int8 model at out_path; returns its settings. static: int8 weights (per channel by default) and activations
    (uint8 by default) with ranges calibrated on `calibration`, as QDQ pairs around each op (QOperator: QLinear* ops
    instead); calibration_method: minmax (the observed range: one outlier widens every step), percentile (the range
    holding `percentile`% of the values), entropy (the range that keeps the histogram's KL divergence lowest);
    fp32_ends keeps the first convolution and the classifier in fp32 (static; the layers int8 hurts most).
    dynamic: int8 weights, activation ranges computed per batch at run time (MatMul, Gemm)."""
    if calibration_method not in CALIBRATIONS:
        raise ValueError(f"calibration_method must be one of {', '.join(CALIBRATIONS)}, got '{calibration_method}'")
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process
    weights = "int8 " + ("per-channel" if per_channel else "per-tensor") + (", reduce_range" if reduce_range else "")
    with tempfile.TemporaryDirectory(dir=Path(out_path).parent, prefix=".quant-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # ONNX shape inference and onnxruntime's basic graph optimizations (constants folded, BatchNorm into conv)
        # before the quantizer picks its ops. onnxruntime's symbolic shape inference is skipped: it fails on the
        # exporter's Reshape nodes once the batch axis is symbolic.
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        if mode == "static":
            excluded = _end_nodes(prepared) if fp32_ends else []
            quantize_static(str(prepared), str(out_path), _Calibration(calibration), nodes_to_exclude=excluded,
                            quant_format=getattr(QuantFormat, quant_format), per_channel=per_channel,
                            reduce_range=reduce_range, weight_type=QuantType.QInt8,
                            activation_type=QuantType.QUInt8 if activations == "uint8" else QuantType.QInt8,
                            calibrate_method={"minmax": CalibrationMethod.MinMax,
                                              "percentile": CalibrationMethod.Percentile,
                                              "entropy": CalibrationMethod.Entropy}[calibration_method],
                            extra_options={"CalibPercentile": percentile} if calibration_method == "percentile"
                            else None)
            how = {"minmax": "min/max", "percentile": f"{percentile} percentile",
                   "entropy": "entropy (KL)"}[calibration_method]
            return {"mode": "static", "format": quant_format, "weights": weights,
                    "activations": f"{activations}, {how} calibration", "calibration_samples": len(calibration),
                    **({"kept_fp32": excluded} if fp32_ends else {})}
        quantize_dynamic(str(prepared), str(out_path), weight_type=QuantType.QInt8, per_channel=per_channel,
                         reduce_range=reduce_range)
        return {"mode": "dynamic", "weights": weights, "activations": "uint8, range computed per batch at run time"}


def quantized_ops(path):
    """Op types of the int8 graph that carry integer arithmetic or (de)quantization, with their counts."""
    import onnx
    counts = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        if "quant" in node.op_type.lower() or "Integer" in node.op_type or node.op_type.startswith("QLinear"):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def set_metadata(path, props):
    """Add metadata_props to an ONNX file in place (through a temp file and os.replace)."""
    import onnx
    model = onnx.load(str(path))
    existing = {p.key: p for p in model.metadata_props}
    for key, value in props.items():
        if key in existing:
            existing[key].value = str(value)
        else:
            model.metadata_props.add(key=key, value=str(value))
    tmp = Path(path).with_name(f".{Path(path).name}.meta.{os.getpid()}")
    try:
        onnx.save(model, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- latency
def latency(engines, images, batch_sizes, threads, warmup=3, repeats=10):
    """Median wall-clock per call of each engine at each batch size. Engines run one after another, each with its own
    warm-up (interleaving them lets one engine's idle threads, which spin for a while, slow the next one down).
    engines: name -> callable(tensor batch, numpy batch)."""
    torch.set_num_threads(threads)
    rows = []
    for batch in batch_sizes:
        reps = -(-batch // len(images))
        x = images.repeat(reps, 1, 1, 1)[:batch].contiguous()
        x_np = x.numpy()
        for name, fn in engines.items():
            for _ in range(warmup):
                fn(x, x_np)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                fn(x, x_np)
                times.append(time.perf_counter() - start)
            median = statistics.median(times)
            rows.append({"engine": name, "batch": batch, "median_ms": round(1e3 * median, 3),
                         "min_ms": round(1e3 * min(times), 3), "samples_per_s": round(batch / median, 1),
                         "repeats": repeats, "threads": threads})
    base = {r["batch"]: r["median_ms"] for r in rows if r["engine"] == next(iter(engines))}
    for r in rows:
        r["speedup_vs_first"] = round(base[r["batch"]] / r["median_ms"], 3)
    return rows


def torch_engine(module):
    @torch.inference_mode()
    def run(x, _):
        module(x)
    return run


def ort_engine(sess):
    def run(_, x_np):
        sess.run(None, {"images": x_np})
    return run


def format_table(rows, sizes):
    """The latency rows and file sizes as a plain-text table."""
    first = rows[0]["engine"] if rows else ""
    lines = [f"{'engine':<18} {'batch':>5} {'median ms':>11} {'samples/s':>11} {'vs ' + first:>22}"]
    for r in rows:
        lines.append(f"{r['engine']:<18} {r['batch']:>5} {r['median_ms']:>11.2f} {r['samples_per_s']:>11.1f} "
                     f"{r['speedup_vs_first']:>21.2f}x")
    for name, size in sizes.items():
        lines.append(f"{name:<18} {size / 1e6:>10.2f} MB")
    return "\n".join(lines)
