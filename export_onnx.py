"""Export a trained model to ONNX, prove it computes what PyTorch computes, quantize it to int8, time it on the CPU.

    # a train_ast.py or train_dynvision.py checkpoint: a step folder, or the run folder (its newest checkpoint)
    python export_onnx.py --checkpoint runs/quickstart/checkpoints/step-000580 --out quickstart.onnx
    python export_onnx.py --checkpoint runs/dynvision_debug --out dyrcnn.onnx
    # encode_stream.py's encoder: its run folder (config.yaml + model.weights), or a weights file and that config
    python export_onnx.py --checkpoint runs/encode --out rvit.onnx
    python export_onnx.py --weights /ckpt/rvit_b16.pt --source_config runs/encode/config.yaml --out rvit.onnx
    # export and parity only; or time with 16 threads and more repeats
    python export_onnx.py --checkpoint runs/quickstart --out q.onnx --int8=false --latency=false
    python export_onnx.py --checkpoint runs/quickstart --out q.onnx --threads=16 --repeats=30

The model is rebuilt from the config saved with its weights (which script made it is read from the config's
sections: lib/export.py FAMILIES), exported with the dynamo exporter (opset 18) with a dynamic batch axis, and
checked against PyTorch on real samples of its dataset (the test split of the run's own seed; seeded random inputs
when the data is not available here, and the output says so). A DyRCNN is unrolled for its configured steps
(stimulus + residual) and outputs `logits` at the last step and `logits_per_step` (B, T, classes).

Writes, next to each other: model.onnx (fp32; metadata_props: model, input spec, outputs, source sha256),
model.int8.onnx (static QDQ with calibration samples for conv nets; dynamic for Linear/attention models) and
model.report.json (parity, int8 agreement, latency of PyTorch eager fp32 / onnxruntime fp32 / onnxruntime int8 at
batch 1 and 32, file sizes). A file is only written once its check passed: an fp32 error above `tolerance`
(max |ort - torch| / max |torch|) exits non-zero and leaves no .onnx behind.
"""
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lib import onnx_check
from lib.checkpoint import CheckpointError
from lib.config import ConfigError, parse
from lib.export import (OPSET, ExportError, find_family, load_source, metadata, samples_data_config, try_build_data,
                        write_onnx)
from lib.storage import StorageError, atomic_write_json, check_free_space, format_bytes


# ----------------------------------------------------------------------------- config
@dataclass
class Config:
    # source: a checkpoint, or a weights file with the config.yaml of the run that used it
    checkpoint: str = ""            # runs/<name>/checkpoints/step-N, its state.pt, or a run folder
    weights: str = ""               # a state_dict file (e.g. encode_stream.py's model.weights) ...
    source_config: str = ""         # ... and the config.yaml of the run that used it
    data_root: str = ""             # where the run's dataset is now, if it moved ('' = the saved data.root)
    image_size: int = 0             # px; only needed when the data is unavailable and the config does not say
    # output
    out: str = ""                   # .onnx path ('' = model.onnx next to the checkpoint); .int8.onnx and
                                    # .report.json are written beside it
    # parity (fp32)
    samples: int = 64               # test-split samples through PyTorch and onnxruntime
    tolerance: float = 1e-4         # max |ort - torch| / max |torch| over each output; above it: exit 1, no .onnx
    seed: int = 0                   # seed of the random inputs used when the data is unavailable
    # int8
    int8: bool = True
    calibration_samples: int = 64   # static quantization: train-split samples that set the activation ranges
    per_channel: bool = True        # int8 weight scales per output channel (False: one per tensor)
    int8_calibration: str = "minmax"  # static activation ranges: minmax | percentile (99.999%) | entropy
    int8_min_agreement: float = 0.0  # int8 vs fp32 top-1 agreement below this: exit 1, no .int8.onnx (0 = report)
    # CPU latency
    latency: bool = True
    batch_sizes: list[int] = field(default_factory=lambda: [1, 32])
    threads: int = 0                # intra-op threads of torch and onnxruntime (0 = the cores this process may use)
    warmup: int = 3                 # untimed calls per engine and batch size
    repeats: int = 10               # timed calls per engine and batch size; the median is reported

    def validate(self):
        if self.samples < 2 or self.calibration_samples < 1:
            raise ConfigError("samples must be >= 2 and calibration_samples >= 1")
        if self.int8_calibration not in onnx_check.CALIBRATIONS:
            raise ConfigError(f"int8_calibration must be one of {', '.join(onnx_check.CALIBRATIONS)}, "
                              f"got '{self.int8_calibration}'")
        if not self.tolerance > 0:
            raise ConfigError(f"tolerance must be > 0, got {self.tolerance}")
        if self.out and not self.out.endswith(".onnx"):
            raise ConfigError(f"out must name an .onnx file, got '{self.out}'")
        if not self.batch_sizes or min(self.batch_sizes) < 1 or self.warmup < 0 or self.repeats < 1:
            raise ConfigError("batch_sizes must list sizes >= 1, warmup must be >= 0 and repeats >= 1")


def say(*args):
    print(*args, flush=True)


def threads_available():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# ----------------------------------------------------------------------------- phases
def rebuild(cfg):
    """The source, its model family, the samples' dataset (or None and why) and the rebuilt ExportModel."""
    source = load_source(cfg.checkpoint, cfg.weights, cfg.source_config)
    family = find_family(source.config)
    if cfg.image_size:
        source.config = {**source.config, "data": {**(source.config.get("data") or {}), "image_size": cfg.image_size}}
    needed = max(cfg.samples, cfg.calibration_samples)
    data_cfg = samples_data_config(family.data_config(source.config), 0, needed, cfg.data_root)
    run_seed = (source.config.get("run") or {}).get("seed", 0)  # digits / npz splits depend on the run's seed
    data, unavailable = try_build_data(data_cfg, needed, seed=run_seed)
    model = family.build(source, data)
    model.module = model.module.float().eval()
    return source, data, unavailable, model


def export_fp32(cfg, model, tests, meta, out, threads):
    """Export to a temp name, check parity against PyTorch, rename onto `out` only if it passed."""
    tmp = out.with_name(f".{out.stem}.fp32.tmp.{os.getpid()}")
    try:
        ops = write_onnx(model, tmp, meta, tests.images[:2])
        fp32, reference = onnx_check.parity(model.module, tmp, tests, list(model.output_names), model.class_output,
                                            threads)
        fp32.update(ops=ops, inputs=tests.description, tolerance=cfg.tolerance)
        line = (f"[parity] fp32: max abs err {fp32['max_abs_err']:.3g}, relative {fp32['rel_err']:.3g} of the output "
                f"scale (tolerance {cfg.tolerance:g}), batch sizes {fp32['batch_sizes_checked']}")
        if "top1_agreement" in fp32:
            line += f", top-1 agreement {fp32['top1_agreement']:.4f} ({fp32['distinct_predictions']} classes predicted)"
        say(line)
        if not fp32["rel_err"] <= cfg.tolerance:
            raise ExportError(f"parity failed: onnxruntime differs from PyTorch by {fp32['rel_err']:.3g} of the output "
                              f"scale, above tolerance {cfg.tolerance:g} (worst per output: "
                              f"{ {k: round(v['rel_err'], 8) for k, v in fp32['outputs'].items()} }); nothing written")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return fp32, reference


def export_int8(cfg, model, out, int8_out, tests, calibration, reference, meta, threads):
    """Quantize `out` to a temp name, compare it with PyTorch fp32 on the test samples, rename onto `int8_out`."""
    names = list(model.output_names)
    tmp = int8_out.with_name(f".{int8_out.stem}.int8.tmp.{os.getpid()}")
    try:
        try:
            settings = onnx_check.quantize(model.quantization, out, tmp, calibration.images, cfg.per_channel,
                                           calibration_method=cfg.int8_calibration)
        except Exception as e:  # noqa: BLE001 - the quantizer's errors are internal; say which model and step
            raise ExportError(f"int8 quantization ({model.quantization}) of {out} failed: {type(e).__name__}: "
                              f"{str(e).splitlines()[0][:300]}; {out} itself is complete and checked (pass "
                              f"--int8=false to skip quantization)") from None
        settings["calibration"] = calibration.description if model.quantization == "static" else None
        onnx_check.set_metadata(tmp, {**meta, "frugal.quantization": json.dumps(settings)})
        outputs = onnx_check.run_session(onnx_check.session(tmp, threads), tests.images)
        int8 = onnx_check.compare(reference, outputs, names, model.class_output)
        int8.update(accuracy_int8=onnx_check.accuracy(outputs, names, model.class_output, tests.labels),
                    accuracy_fp32=onnx_check.accuracy(reference, names, model.class_output, tests.labels),
                    settings=settings, quantized_ops=onnx_check.quantized_ops(tmp), compared_to="pytorch fp32")
        agreement = int8.get("top1_agreement")
        say(f"[int8] {settings['mode']}: " + (f"top-1 agreement with fp32 {agreement:.4f}, " if agreement is not None
            else f"cosine similarity with fp32 min {int8[f'cosine_{names[0]}_min']:.4f}, ")
            + f"relative error {int8['rel_err']:.3g}; quantized ops {int8['quantized_ops']}")
        if agreement is not None and agreement < cfg.int8_min_agreement:
            raise ExportError(f"int8 top-1 agreement with fp32 is {agreement:.4f}, below int8_min_agreement="
                              f"{cfg.int8_min_agreement}; {int8_out} not written ({out} is)")
        os.replace(tmp, int8_out)
    finally:
        tmp.unlink(missing_ok=True)
    return int8


# ----------------------------------------------------------------------------- main
def main(cfg):
    """Export, check parity, quantize, time; returns the report (also written to <out>.report.json)."""
    threads = cfg.threads or threads_available()
    torch.set_num_threads(threads)
    source, data, unavailable, model = rebuild(cfg)
    out = Path(cfg.out) if cfg.out else source.path.parent / "model.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    int8_out, report_out = out.with_suffix(".int8.onnx"), out.with_suffix(".report.json")
    for stale in out.parent.glob(f".{out.stem}.*.tmp.*"):  # temp files of a killed export
        stale.unlink(missing_ok=True)
    param_bytes = sum(p.numel() * 4 for p in model.module.parameters())
    if param_bytes > 1.9e9:  # one protobuf file holds at most 2 GB; external weight files are not supported here
        raise ExportError(f"{model.name} has {param_bytes / 1e9:.1f} GB of fp32 weights, over the 2 GB an .onnx file "
                          f"can hold; export_onnx.py writes single-file models only")
    check_free_space(out.parent, 3 * param_bytes + (16 << 20), "ONNX export (fp32 + int8 + a temp copy)",
                     hint="free space or pass --out on a larger disk")

    tests = onnx_check.sample_inputs(data, "test", cfg.samples, model.input_shape, cfg.seed, unavailable)
    input_desc = {"normalized": "per channel: (x - mean) / std, x in 0..1" if data is not None else "as in training"}
    if data is not None and data.mean:
        input_desc.update(mean=[round(m, 6) for m in data.mean], std=[round(s, 6) for s in data.std])
    meta = metadata(model, source, input_desc)
    say(f"[export] {model.family} {model.name} from {source.path} ({source.kind}, sha256 {source.sha256[:12]}) -> "
        f"{out} (opset {OPSET}, batch axis dynamic, {threads} threads)")
    say(f"[export] inputs: {tests.description}")
    fp32, reference = export_fp32(cfg, model, tests, meta, out, threads)
    report = {"model": model.name, "family": model.family, "source": str(source.path), "source_kind": source.kind,
              "source_sha256": source.sha256, "onnx": str(out), "opset": OPSET, "metadata": meta, "threads": threads,
              "parity_fp32": fp32, "versions": _versions()}
    sizes = {"pytorch fp32 params": param_bytes, "onnx fp32": out.stat().st_size}
    engines = {"torch eager fp32": onnx_check.torch_engine(model.module),
               "ort fp32": onnx_check.ort_engine(onnx_check.session(out, threads))}
    if cfg.int8:
        calibration = onnx_check.sample_inputs(data, "train", cfg.calibration_samples, model.input_shape, cfg.seed,
                                               unavailable)
        report["int8"] = export_int8(cfg, model, out, int8_out, tests, calibration, reference, meta, threads)
        report["int8_onnx"] = str(int8_out)
        sizes["onnx int8"] = int8_out.stat().st_size
        engines["ort int8"] = onnx_check.ort_engine(onnx_check.session(int8_out, threads))
    report["file_bytes"] = sizes
    if cfg.latency:
        report["latency"] = onnx_check.latency(engines, tests.images, cfg.batch_sizes, threads, cfg.warmup,
                                               cfg.repeats)
        say(f"[latency] CPU, {threads} threads, median of {cfg.repeats} calls after {cfg.warmup} warm-up calls, "
            f"each engine in turn in this process:")
        say(onnx_check.format_table(report["latency"], sizes))
    else:
        say("[sizes] " + ", ".join(f"{k} {format_bytes(v)}" for k, v in sizes.items()))
    atomic_write_json(report_out, report)
    say(f"[export] wrote {out}" + (f", {int8_out}" if cfg.int8 else "") + f", {report_out}")
    return report


def _versions():
    import onnx
    import onnxruntime
    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


# ----------------------------------------------------------------------------- entry
# Entry plumbing kept in this one block, to be replaced by the shared run skeleton (lib/run.py) once it exists.
USER_ERRORS = (ConfigError, ExportError, CheckpointError, FileNotFoundError, StorageError)

if __name__ == "__main__":
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(__doc__)
        sys.exit(0)
    try:
        config = parse(Config(), sys.argv[1:])
    except ConfigError as err:
        sys.exit(f"config error: {err}")
    try:
        main(config)
    except USER_ERRORS as err:  # what the user must fix: one clear line, no traceback
        sys.exit(f"error: {err}")
