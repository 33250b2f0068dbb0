"""export_onnx.py: each model family exported from a real run equals PyTorch in onnxruntime; bad input fails cleanly."""
import contextlib
import io
import json
import runpy
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import export_onnx
from lib import checkpoint, export, onnx_check
from lib.checkpoint import CheckpointError
from lib.config import ConfigError, merge, parse
from lib.storage import sha256_file

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A train_ast.py checkpoint and an encode_stream.py run folder, made by the scripts' main() on CPU."""
    import encode_stream
    import train_ast
    root = tmp_path_factory.mktemp("runs")
    train_ast.main(merge(train_ast.Config(), {
        "run": {"out_dir": str(root), "name": "ast", "device": "cpu", "epochs": 1, "max_steps": 3, "resume": "none"},
        "data": {"name": "digits", "image_size": 8, "loader": "resident"}, "model": {"name": "small_cnn", "width": 8},
        "loop": {"precision": "fp32", "global_batch": 64, "log_every": 10}, "ast": {"mode": "full"}}))
    encode_stream.main(merge(encode_stream.Config(), {
        "run": {"out_dir": str(root), "name": "enc", "device": "cpu"}, "data": {"name": "digits", "loader": "resident"},
        "model": {"image_size": 8, "patch_size": 4, "width": 16, "heads": 2, "blocks": 1, "loops": 2},
        "encode": {"outputs": ["embedding", "loop_embeddings"], "batch_size": 32, "chunk_samples": 64, "limit": 32}}))
    return root


def export_cfg(source, out, **overrides):
    base = {"checkpoint": str(source), "out": str(out), "samples": 16, "calibration_samples": 16, "latency": False}
    return merge(export_onnx.Config(), {**base, **overrides})


def onnx_files(folder):
    return sorted(p.name for p in Path(folder).rglob("*") if ".onnx" in p.name)


def check_dynamic_batch(path, module, shape, names):
    """The graph takes a batch size it was not traced with and gives what PyTorch gives."""
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(5))
    got = onnx_check.session(path, 1).run(None, {"images": x.numpy()})
    with torch.inference_mode():
        ref = module(x)
    for name, g, r in zip(names, got, ref):
        assert g.shape[0] == 3, name
        np.testing.assert_allclose(g, r.numpy(), rtol=1e-4, atol=1e-5 * float(r.abs().max()))


def test_classifier_exports_with_parity_int8_and_latency(runs, tmp_path):
    step = checkpoint.latest(runs / "ast" / "checkpoints")
    cfg = parse(export_onnx.Config(), ["--checkpoint", str(step), "--out", str(tmp_path / "m.onnx"), "--samples=16",
                                       "--calibration_samples=16", "--batch_sizes=[1, 3]", "--warmup=0", "--repeats=1"])
    report = export_onnx.main(cfg)
    parity = report["parity_fp32"]
    assert parity["inputs"].startswith("16 real samples") and parity["rel_err"] <= 1e-4
    assert parity["top1_agreement"] == 1.0 and parity["batch_sizes_checked"] == [16, 1]
    int8 = report["int8"]
    assert int8["settings"]["mode"] == "static" and 0 <= int8["top1_agreement"] <= 1
    assert int8["quantized_ops"].get("QuantizeLinear", 0) > 0
    assert {(r["engine"], r["batch"]) for r in report["latency"]} == {
        (e, b) for e in ("torch eager fp32", "ort fp32", "ort int8") for b in (1, 3)}
    assert json.loads((tmp_path / "m.report.json").read_text())["source_sha256"] == report["source_sha256"]
    model = onnx.load(str(tmp_path / "m.onnx"))
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["frugal.model_name"] == "small_cnn" and meta["frugal.script"] == "train_ast.py"
    assert meta["frugal.source_sha256"] == sha256_file(step / "state.pt")
    assert json.loads(meta["frugal.input"])["shape"] == ["batch", 1, 8, 8]
    assert json.loads(meta["frugal.outputs"]) == ["logits"]
    assert model.opset_import[0].version >= 18
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert onnx_files(tmp_path) == ["m.int8.onnx", "m.onnx"]


def test_encoder_from_run_folder_and_from_weights(runs, tmp_path):
    report = export_onnx.main(export_cfg(runs / "enc", tmp_path / "enc.onnx"))
    assert report["source_kind"] == "random init" and report["parity_fp32"]["rel_err"] <= 1e-4
    assert report["int8"]["settings"]["mode"] == "dynamic" and report["int8"]["cosine_embedding_min"] > 0.9
    assert report["int8"]["quantized_ops"].get("MatMulInteger", 0) > 0
    source = export.load_source(str(runs / "enc"))
    data, _ = export.try_build_data(export.samples_data_config(source.config["data"], 8, 16), 16)
    model = export.find_family(source.config).build(source, data)
    check_dynamic_batch(tmp_path / "enc.onnx", model.module, model.input_shape, model.output_names)


def test_weights_file_source_and_tolerance_breach_leaves_no_onnx(runs, tmp_path):
    """The encoder as a weights file + its run's config; a tolerance no float can meet fails, writing nothing."""
    source = export.load_source(str(runs / "enc"))
    data, _ = export.try_build_data(export.samples_data_config(source.config["data"], 8, 16), 16)
    torch.save(export.find_family(source.config).build(source, data).module.model.state_dict(), tmp_path / "w.pt")
    cfg = export_cfg("", tmp_path / "w.onnx", weights=str(tmp_path / "w.pt"), tolerance=1e-30, int8=False,
                     source_config=str(runs / "enc" / "config.yaml"))
    with pytest.raises(export.ExportError, match="parity failed.*above tolerance 1e-30"):
        export_onnx.main(cfg)
    assert onnx_files(tmp_path) == [] and not (tmp_path / "w.report.json").exists()
    source = export.load_source(weights=str(tmp_path / "w.pt"), source_config=str(runs / "enc" / "config.yaml"))
    assert source.kind == "weights" and source.sha256 == sha256_file(tmp_path / "w.pt")


def test_truncated_missing_and_unknown_checkpoints_fail_clearly(runs, tmp_path, monkeypatch):
    step = checkpoint.latest(runs / "ast" / "checkpoints")
    broken = tmp_path / "step-000001"
    broken.mkdir()
    (broken / "state.pt").write_bytes((step / "state.pt").read_bytes()[:5000])
    (broken / "COMPLETE").write_text((step / "COMPLETE").read_text())
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        export_onnx.main(export_cfg(broken, tmp_path / "x.onnx"))
    with pytest.raises(export.ExportError, match="checkpoint not found"):
        export_onnx.main(export_cfg(tmp_path / "nowhere", tmp_path / "x.onnx"))
    unknown = {"model": {"w": torch.zeros(2)}, "config": {"run": {}, "gan": {"z": 1}}}
    checkpoint.save(tmp_path / "odd" / "checkpoints", 1, unknown)
    with pytest.raises(export.ExportError, match=r"unknown model type.*'gan'.*Known: classifier \(train_ast.py"):
        export_onnx.main(export_cfg(tmp_path / "odd", tmp_path / "x.onnx"))
    assert onnx_files(tmp_path) == []
    # the command line: one clear line (SystemExit's message), non-zero exit
    for argv, start in (([str(broken)], "error: checkpoint"), ([str(tmp_path / "odd"), "--outt=x.onnx"],
                                                              "config error: unknown config key 'outt'")):
        monkeypatch.setattr(sys, "argv", ["export_onnx.py", "--checkpoint", *argv])
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(ROOT / "export_onnx.py"), run_name="__main__")
        message = str(exit_info.value.code)
        assert message.startswith(start) and "\n" not in message, message


class _Cumulative(torch.nn.Module):
    def forward(self, x):
        return torch.cummax(x, dim=1)[0]  # no ONNX translation in the exporter


class _Unexportable(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(1, 2, 3)
        self.running = _Cumulative()

    def forward(self, images):
        return (self.running(self.stem(images)).mean((2, 3)),)


def test_unsupported_op_names_module_and_op(tmp_path):
    model = export.ExportModel("classifier", "odd", _Unexportable().eval(), (1, 8, 8), ["logits"], "logits", "static")
    with pytest.raises(export.ExportError, match=r"aten\.cummax.*module 'running' \(_Cumulative\)"):
        export.write_onnx(model, tmp_path / "odd.onnx", {}, torch.randn(2, 1, 8, 8))
    assert onnx_files(tmp_path) == []


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """bench/export_latency.py --smoke in this process (the exporter is loaded already), its files kept."""
    sys.path.insert(0, str(ROOT / "bench"))
    import export_latency
    folder = tmp_path_factory.mktemp("bench")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        export_latency.main(["--smoke", "--keep", str(folder), "--variants"])
    return folder, [json.loads(line) for line in out.getvalue().strip().splitlines()]


def test_bench_smoke(smoke):
    import export_latency
    _, lines = smoke
    models = [line.get("model") for line in lines if "variant" not in line and not line.get("summary")]
    assert models == ["small_cnn", "rvit", "dyrcnn_x4"]
    variants = [line for line in lines if "variant" in line]  # --variants: every int8 setting quantized and timed
    assert len(variants) == len(export_latency.VARIANTS) and all(0 <= v["int8_top1_agreement"] <= 1 for v in variants)
    ends = [v for v in variants if "first conv and classifier in fp32" in v["variant"]]
    assert len(ends) == 2 and all(len(v["settings"]["kept_fp32"]) == 2 for v in ends)
    summary = lines[-1]
    assert summary["summary"] and summary["max_abs_err_fp32"] <= 1e-4 and summary["device"].startswith("CPU")
    assert 0 <= summary["int8_top1_agreement_resnet50"] <= 1 and summary["int8_vs_fp32_ort_speedup_b32_resnet50"] > 0


def test_bench_reports_a_failing_model_and_still_writes_its_summary(tmp_path, monkeypatch):
    """One model that fails to export is a line of its own; the others run, the summary lists it, exit 1."""
    sys.path.insert(0, str(ROOT / "bench"))
    import export_latency
    real = export_latency.export_run

    def export_run(run, out, args, samples_count):
        if out.stem == "resnet50":
            raise export.ExportError("cannot export aten.odd (module 'x')")
        return real(run, out, args, samples_count)

    monkeypatch.setattr(export_latency, "export_run", export_run)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit, match="1 model.*resnet50"):
        export_latency.main(["--smoke", "--keep", str(tmp_path), "--models=resnet50,rvit_b16"])
    lines = [json.loads(line) for line in out.getvalue().strip().splitlines()]
    assert lines[0] == {"model": "resnet50", "failed": True,
                        "error": "ExportError: cannot export aten.odd (module 'x')"}
    assert lines[1]["model"] == "rvit" and lines[1]["fp32_rel_err"] <= 1e-4
    summary = lines[-1]
    assert summary["summary"] and list(summary["failed_models"]) == ["resnet50"]
    assert summary["int8_top1_agreement_resnet50"] is None and summary["max_abs_err_fp32"] == lines[1]["fp32_rel_err"]


def test_dyrcnn_unrolled_exports_every_step(smoke):
    """The bench's DyRCNN checkpoint (saved as train_dynvision.py saves one: config with the default num_classes,
    weights of 10 classes): unrolled 1 + 4 steps, every step's logits, another batch size."""
    folder, lines = smoke
    report = json.loads((folder / "dyrcnn_x4.report.json").read_text())
    assert report["model"] == "dyrcnn_x4" and report["parity_fp32"]["rel_err"] <= 1e-4
    assert report["int8"]["settings"]["mode"] == "static" and "top1_agreement" in report["int8"]
    assert json.loads(report["metadata"]["frugal.details"])["unrolled_steps"] == 1 + 4  # stimulus + 4 delays
    session = onnx_check.session(folder / "dyrcnn_x4.onnx", 1)
    assert [o.name for o in session.get_outputs()] == ["logits", "logits_per_step"]
    assert session.get_outputs()[1].shape == ["batch", 5, 10]
    source = export.load_source(str(folder / "dyrcnn_x4"))
    model = export.find_family(source.config).build(source, None)
    check_dynamic_batch(folder / "dyrcnn_x4.onnx", model.module, model.input_shape, model.output_names)


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_int8_calibration_methods_give_an_int8_model_close_to_fp32(runs, tmp_path, method):
    report = export_onnx.main(export_cfg(runs / "ast", tmp_path / "m.onnx", int8_calibration=method))
    int8 = report["int8"]
    assert method.split()[0] in int8["settings"]["activations"] or "KL" in int8["settings"]["activations"]
    assert int8["quantized_ops"].get("QuantizeLinear", 0) > 0
    assert int8["rel_err"] < 0.2  # int8 logits stay near fp32's (a broken calibration gives errors near 1)
    with pytest.raises(ConfigError, match="int8_calibration"):
        export_cfg(runs / "ast", tmp_path / "x.onnx", int8_calibration="kl")
