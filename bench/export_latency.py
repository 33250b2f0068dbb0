"""CPU inference after export: PyTorch eager fp32 vs onnxruntime fp32 vs onnxruntime int8, in the same run.

    python bench/export_latency.py --threads=16      # ResNet-50, RViT-B/16 encoder, DyRCNNx4; JSON lines on stdout
    python bench/export_latency.py --smoke           # CPU, seconds: tiny models, checks the script runs
    python bench/export_latency.py --threads=16 --variants   # + ResNet-50 int8 settings side by side
    # the int8 agreement bar needs a trained classifier: ResNet-50 on synthetic 224 px images generated on the CPU
    # (data.loader=dataloader), as export_onnx regenerates them; train on one GPU, then benchmark on the CPU
    python train_ast.py --run.name=r50_synthetic --run.epochs=6 --data.name=synthetic --data.loader=dataloader \
        --data.workers=8 --data.image_size=224 --data.num_classes=100 --data.train_samples=10240 \
        --data.test_samples=512 --model.name=resnet50 --ast.mode=full --loop.global_batch=256 --loop.precision=bf16 \
        --optim.lr=0.1 --optim.warmup_steps=40
    python bench/export_latency.py --threads=16 --classifier_checkpoint runs/r50_synthetic

Each model is saved the way its script saves it (a train_ast.py / train_dynvision.py checkpoint, an encode_stream.py
run folder) and goes through export_onnx.main as a user's would: export, fp32 parity, int8 quantization, latency at
batch 1 and 32. The models:
  resnet50   224 px, 100 classes: random-init convolutions, BatchNorm statistics from, and a ridge-regression
             classifier fitted on, lib.data's synthetic structured images. Fine for latency, not for int8 agreement:
             random features barely separate the classes (measured: 2.3% test accuracy, 76 of 100 classes
             predicted), so the margins are tiny and int8 noise flips most predictions. For the agreement bar pass
             a trained classifier: --classifier_checkpoint runs/<train_ast run> (commands above).
             int8: static QDQ, per-channel weights, calibrated on train-split images; agreement on test-split images.
  rvit_b16   the encoder of configs/encode_imagenet.yaml (224 px, patch 16, width 768, 2 blocks x 6 loops), seeded
             random init as encode_stream.py builds it without weights; int8: dynamic. Outputs embedding and
             loop_embeddings; agreement is the cosine similarity of int8 and fp32 embeddings.
  dyrcnn_x4  DyRCNNx4 at 32 px, delays 5/3: 20 stimulus + 20 residual steps unrolled (configs/dynvision_cifar100.yaml),
             DynVision init, readout fitted by ridge regression on the last step's IT rates; int8: static QDQ.
Latency: median of --repeats calls after --warmup calls, each engine in turn, --threads intra-op threads for torch
and onnxruntime. Relative error = max |onnxruntime - torch| / max |torch| per output (worst output and model).
A model that fails (export, parity, quantization) gets a line {"model": ..., "failed": true, "error": ...}; the
others still run, the summary lists it under failed_models and the exit status is 1.
The last line is {"summary": true, "max_abs_err_fp32": e, "int8_top1_agreement_resnet50": a,
"int8_vs_fp32_ort_speedup_b32_resnet50": s, "device": ...}; bars: e <= 1e-4, a >= 0.99, s >= 2.0.
"""
import argparse
import contextlib
import dataclasses
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import encode_stream  # noqa: E402
import export_onnx  # noqa: E402
import train_ast  # noqa: E402
import train_dynvision  # noqa: E402
from lib import checkpoint, export, onnx_check  # noqa: E402
from lib.config import merge, to_dict  # noqa: E402
from lib.data import build_data, in_order  # noqa: E402
from lib.dynvision import DyRCNN  # noqa: E402
from lib.models import build_model  # noqa: E402

BARS = {"max_abs_err_fp32": 1e-4, "int8_top1_agreement_resnet50": 0.99, "int8_vs_fp32_ort_speedup_b32_resnet50": 2.0}


def emit(**record):
    print(json.dumps(record), flush=True)


def device_name(threads):
    """CPU model and the int8 instruction sets onnxruntime can use (VNNI, AMX), with the thread count."""
    name, flags = platform.processor() or "cpu", set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return f"CPU {name} ({', '.join(isa) or 'no AVX2'}), {threads} threads"


def samples(data_cfg, count, seed=0):
    data = build_data(dataclasses.replace(data_cfg, augment=False, loader="resident"), "cpu", batch_size=64, seed=seed)
    xs, ys = [], []
    for x, y, _ in in_order(data.train):
        xs.append(x.float().contiguous())
        ys.append(y)
    return data, torch.cat(xs)[:count], torch.cat(ys)[:count]


def ridge(features, labels, classes, strength=0.1):
    """Linear classifier (weight (K, D), bias (K,)) by ridge regression on centred features scaled by one number:
    a per-feature scale would hand near-constant features huge weights, and the int8 error of those features would
    then decide the logits."""
    mean, scale = features.mean(0), features.std().clamp_min(1e-6)
    z = ((features - mean) / scale).double()
    targets = torch.nn.functional.one_hot(labels, classes).double() - 1.0 / classes
    gram = z.T @ z + strength * len(z) * torch.eye(z.shape[1], dtype=z.dtype)
    w = torch.linalg.solve(gram, z.T @ targets) / scale.double()  # (D, K) in the features' own units
    return w.T.float().contiguous(), (-mean.double() @ w).float()


@torch.no_grad()
def classifier_checkpoint(folder, name, size, classes, fit_samples, test_samples, width=64):
    """A train_ast.py checkpoint: random convolutions, BatchNorm statistics and a ridge head from synthetic data."""
    cfg = merge(train_ast.Config(), {"run": {"name": name, "out_dir": str(folder)},
                                     "data": {"name": "synthetic", "image_size": size, "num_classes": classes,
                                              "train_samples": fit_samples, "test_samples": test_samples},
                                     "model": {"name": name, "width": width}, "ast": {"mode": "full"}})
    data, x, y = samples(cfg.data, fit_samples)
    torch.manual_seed(0)
    model = build_model(cfg.model, data.in_channels, data.num_classes, data.image_size)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches below
    model.train()
    for i in range(0, len(x) // 2, 64):  # BatchNorm statistics from the first half
        model(x[i:i + 64])
    model.eval()
    head = model.fc if hasattr(model, "fc") else model.head
    captured = []
    hook = head.register_forward_pre_hook(lambda _, args: captured.append(args[0]))
    for i in range(0, len(x), 64):
        model(x[i:i + 64])
    hook.remove()
    weight, bias = ridge(torch.cat(captured), y, classes)
    head.weight.copy_(weight)
    head.bias.copy_(bias)
    run = Path(folder) / name
    checkpoint.save(run / "checkpoints", 1, {"model": checkpoint.model_state(model), "config": to_dict(cfg)})
    return run


@torch.no_grad()
def dyrcnn_checkpoint(folder, size, classes, fit_samples, test_samples, model_overrides):
    """A train_dynvision.py checkpoint: DynVision's init, the readout fitted by ridge on the last step's IT rates."""
    cfg = merge(train_dynvision.Config(), {"run": {"name": "dyrcnn_x4", "out_dir": str(folder)},
                                           "data": {"name": "synthetic", "image_size": size, "num_classes": classes,
                                                    "train_samples": fit_samples, "test_samples": test_samples},
                                           "model": {"preset": "x4", **model_overrides}})
    data, x, y = samples(cfg.data, fit_samples)
    torch.manual_seed(0)
    model = DyRCNN(dataclasses.replace(cfg.model, num_classes=classes, in_channels=3, channels_last=False)).eval()
    features = []
    for i in range(0, len(x), 32):
        _, rates = model(x[i:i + 32], record=True)  # IT (B, T, C, H, W); the readout at step T-1 reads T-1-d_ff
        features.append(rates["IT"][:, -1 - model.d_ff].mean(dim=(2, 3)))
    weight, bias = ridge(torch.cat(features), y, classes)
    model.classifier.weight.copy_(weight)
    model.classifier.bias.copy_(bias)
    run = Path(folder) / "dyrcnn_x4"
    checkpoint.save(run / "checkpoints", 1, {"model": checkpoint.model_state(model), "config": to_dict(cfg)})
    return run


def encoder_run(folder, model_section, size):
    """An encode_stream.py run folder of a random-init encoder: its config.yaml is all export_onnx needs."""
    cfg = merge(encode_stream.Config(), {"run": {"name": "rvit", "out_dir": str(folder)},
                                         "data": {"name": "synthetic", "num_classes": 100, "train_samples": 64,
                                                  "test_samples": 64},
                                         "model": {**model_section, "image_size": size},
                                         "encode": {"outputs": ["embedding", "loop_embeddings"]}})
    run = Path(folder) / "rvit"
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return run


def export_run(run, out, args, samples_count):
    cfg = merge(export_onnx.Config(), {"checkpoint": str(run), "out": str(out), "samples": samples_count,
                                       "calibration_samples": args.calibration, "threads": args.threads,
                                       "int8_calibration": args.calibration_method,
                                       "warmup": args.warmup, "repeats": args.repeats})
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON lines only
        return export_onnx.main(cfg)


def speedup(report, engine, base, batch):
    rows = {(r["engine"], r["batch"]): r["median_ms"] for r in report["latency"]}
    return round(rows[(base, batch)] / rows[(engine, batch)], 3)


def model_line(name, report):
    parity, int8 = report["parity_fp32"], report["int8"]
    line = {"model": name, "family": report["family"], "inputs": parity["inputs"],
            "fp32_max_abs_err": parity["max_abs_err"], "fp32_rel_err": parity["rel_err"],
            "fp32_top1_agreement": parity.get("top1_agreement"),
            "distinct_predictions": parity.get("distinct_predictions"),
            "accuracy_fp32": int8.get("accuracy_fp32"), "accuracy_int8": int8.get("accuracy_int8"),
            "int8_top1_agreement": int8.get("top1_agreement"), "int8_rel_err": int8["rel_err"],
            "int8_settings": int8["settings"], "int8_quantized_ops": int8["quantized_ops"],
            "file_bytes": report["file_bytes"], "threads": report["threads"]}
    line.update({k: v for k, v in int8.items() if k.startswith("cosine_")})
    for batch in sorted({r["batch"] for r in report["latency"]}):
        line[f"ort_fp32_vs_torch_b{batch}"] = speedup(report, "ort fp32", "torch eager fp32", batch)
        line[f"int8_vs_fp32_ort_speedup_b{batch}"] = speedup(report, "ort int8", "ort fp32", batch)
    line["latency"] = report["latency"]
    return line


VARIANTS = {  # static int8 settings of ResNet-50 to compare against the default (the first); the calibration ones
              # first, since agreement is the bar at risk (a 170 s run reached only the first four of the older order)
    "QDQ, per-channel, uint8 activations (default)": {},
    "QDQ, per-channel, percentile calibration (99.999%)": {"calibration_method": "percentile"},
    "QDQ, per-channel, first conv and classifier in fp32": {"fp32_ends": True},
    "QDQ, per-channel, percentile, first conv and classifier in fp32": {"calibration_method": "percentile",
                                                                        "fp32_ends": True},
    "QDQ, per-channel, entropy calibration": {"calibration_method": "entropy"},
    "QOperator (QLinearConv), per-channel": {"quant_format": "QOperator"},
    "QDQ, per-tensor weights": {"per_channel": False},
    "QDQ, per-channel, reduce_range (7-bit weights)": {"reduce_range": True},
    "QDQ, per-channel, int8 activations": {"activations": "int8"},
}


def int8_variants(run, fp32_path, args):
    """Each VARIANTS setting: quantized, checked against fp32 (top-1 agreement) and timed at batch 32 against the same
    fp32 session, to see what the default's speedup depends on."""
    source = export.load_source(str(run))
    family = export.find_family(source.config)
    needed = max(args.eval_samples, args.calibration)
    data, _ = export.try_build_data(export.samples_data_config(family.data_config(source.config), 0, needed), needed)
    model = family.build(source, data)
    tests = onnx_check.sample_inputs(data, "test", args.eval_samples, model.input_shape)
    calibration = onnx_check.sample_inputs(data, "train", args.calibration, model.input_shape)
    fp32 = onnx_check.session(fp32_path, args.threads)
    reference = onnx_check.run_session(fp32, tests.images)
    for index, (name, settings) in enumerate(VARIANTS.items()):
        path = fp32_path.with_name(f"variant{index}.int8.onnx")
        with contextlib.redirect_stdout(sys.stderr):
            described = onnx_check.quantize("static", fp32_path, path, calibration.images, **settings)
        int8 = onnx_check.session(path, args.threads)
        agreement = onnx_check.compare(reference, onnx_check.run_session(int8, tests.images), ["logits"],
                                       "logits")["top1_agreement"]
        rows = onnx_check.latency({"ort fp32": onnx_check.ort_engine(fp32), "ort int8": onnx_check.ort_engine(int8)},
                                  tests.images, [32], args.threads, args.warmup, args.repeats)
        emit(variant=name, model=model.name, settings=described, int8_top1_agreement=agreement,
             fp32_ms_b32=rows[0]["median_ms"], int8_ms_b32=rows[1]["median_ms"],
             int8_vs_fp32_ort_speedup_b32=rows[1]["speedup_vs_first"], quantized_ops=onnx_check.quantized_ops(path),
             threads=args.threads)
        path.unlink()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU, seconds")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0 = the cores this process may use)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--eval_samples", type=int, default=512, help="test images for parity and int8 agreement")
    parser.add_argument("--calibration", type=int, default=128, help="train images that calibrate static int8")
    parser.add_argument("--calibration_method", default="minmax", choices=onnx_check.CALIBRATIONS,
                        help="static int8 activation ranges (export_onnx's int8_calibration)")
    parser.add_argument("--keep", default="", help="folder to keep the checkpoints and .onnx files in")
    parser.add_argument("--models", default="resnet50,rvit_b16,dyrcnn_x4", help="comma-separated subset to run")
    parser.add_argument("--classifier_checkpoint", default="",
                        help="a train_ast.py run or step folder: the classifier, instead of the fitted ResNet-50")
    parser.add_argument("--variants", action="store_true",
                        help="also time other static int8 settings of the classifier (format, per-channel, range)")
    args = parser.parse_args(argv)
    args.threads = args.threads or export_onnx.threads_available()
    if args.smoke:
        args.warmup, args.repeats, args.eval_samples, args.calibration = 1, 2, 32, 16
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="export_latency-"))
    folder.mkdir(parents=True, exist_ok=True)
    chosen = args.models.split(",")
    builders = {  # name -> (smoke, full): each makes the checkpoint or run folder that export_onnx reads
        "resnet50": (lambda: classifier_checkpoint(folder, "small_cnn", 16, 10, 128, args.eval_samples, width=8),
                     lambda: classifier_checkpoint(folder, "resnet50", 224, 100, 512, args.eval_samples)),
        "rvit_b16": (lambda: encoder_run(folder, {"patch_size": 4, "width": 32, "heads": 2, "blocks": 1,
                                                  "loops": 2}, 16),
                     lambda: encoder_run(folder, {"patch_size": 16, "width": 768, "heads": 12, "blocks": 2,
                                                  "loops": 6}, 224)),
        "dyrcnn_x4": (lambda: dyrcnn_checkpoint(folder, 16, 10, 64, args.eval_samples, {
            "channels": [4, 6, 8, 10], "n_timesteps": 1, "forward_delay_steps": 1, "recurrent_delay_steps": 1}),
                      lambda: dyrcnn_checkpoint(folder, 32, 100, 512, args.eval_samples, {
            "n_timesteps": 20, "forward_delay_steps": 5, "recurrent_delay_steps": 3})),
    }
    unknown = [m for m in chosen if m not in builders]
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {', '.join(builders)}")
    runs = {}
    for name in chosen:  # smoke: the same path at toy sizes, a small CNN standing in for ResNet-50
        if name == "resnet50" and args.classifier_checkpoint:
            runs[name] = Path(args.classifier_checkpoint)
        else:
            runs[name] = builders[name][0 if args.smoke else 1]()
    lines = {}
    # the encoder has no classes to agree on: its cosine similarities need fewer samples than a top-1 agreement
    counts = {"resnet50": args.eval_samples, "rvit_b16": min(args.eval_samples, 64), "dyrcnn_x4": args.eval_samples}
    failed = {}
    for name, run in runs.items():
        try:
            report = export_run(run, folder / f"{name}.onnx", args, counts[name])
        except (Exception, SystemExit) as e:  # noqa: BLE001 - one model's failure is a result: report it, go on
            failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:500] if str(e) else ''}"
            emit(model=name, failed=True, error=failed[name])
            continue
        lines[name] = model_line(report["model"], report)
        emit(**lines[name])
        if name == "resnet50" and args.variants:
            int8_variants(run, folder / f"{name}.onnx", args)
    first = lines.get("resnet50", {})
    summary = {"summary": True,
               "max_abs_err_fp32": max((line["fp32_rel_err"] for line in lines.values()), default=None),
               "max_abs_err_fp32_definition": "max |onnxruntime - torch| / max |torch| per output, worst output and "
                                              "model (fp32, test-split inputs)",
               "int8_top1_agreement_resnet50": first.get("int8_top1_agreement"),
               "int8_vs_fp32_ort_speedup_b32_resnet50": first.get("int8_vs_fp32_ort_speedup_b32"),
               "classifier": first.get("model"), "classifier_source": args.classifier_checkpoint or "fitted (see doc)",
               # an agreement means something only for a classifier that predicts many classes, mostly right
               "classifier_accuracy_fp32": first.get("accuracy_fp32"),
               "classifier_distinct_predictions": first.get("distinct_predictions"),
               "models": chosen, "failed_models": failed, "calibration_method": args.calibration_method,
               "eval_samples": {k: counts[k] for k in chosen},
               "threads": args.threads, "smoke": args.smoke, "bars": BARS, "device": device_name(args.threads)}
    if not args.smoke:
        summary["passed"] = {k: (summary[k] <= v if k == "max_abs_err_fp32" else summary[k] >= v)
                             for k, v in BARS.items() if summary[k] is not None}
    emit(**summary)
    if not args.keep:
        import shutil
        shutil.rmtree(folder, ignore_errors=True)
    if failed:  # the summary is out; the exit status still says that a model failed
        sys.exit(f"export_latency: {len(failed)} model(s) failed: {', '.join(failed)} (see their lines)")


if __name__ == "__main__":
    main()
