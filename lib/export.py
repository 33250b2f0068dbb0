"""Rebuild a trained model from what a training script saved, and export it to ONNX with a dynamic batch axis.

    source = load_source(checkpoint="runs/ast/checkpoints/step-000100")  # weights + the run's config + sha256
    family = find_family(source.config)                                  # which script made it
    data, why = try_build_data(family.data_config(source.config))        # real samples, or None and the reason
    model = family.build(source, data)                                   # ExportModel: module, input spec, outputs
    write_onnx(model, "model.onnx.tmp", metadata)                        # torch.export -> ONNX, metadata_props

A model family is one entry in FAMILIES: how to recognise its config, which samples it reads and how to rebuild the
module. Adding a model (e.g. another encoder for encode_stream.py) is one more entry.
"""
import contextlib
import dataclasses
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from lib import checkpoint
from lib.config import ConfigError, load_yaml, merge, to_dict
from lib.data import IMAGEFOLDER_DEFAULT_SIZE, DataConfig, build_data
from lib.datasets import SYNTHETIC_DEFAULT_SIZE
from lib.storage import sha256_file

OPSET = 18
BATCH_AXIS = "batch"
MAX_BATCH = 1 << 16                 # upper bound of the dynamic batch axis (torch.export needs one)
NATIVE_SIZE = {"digits": 8, "cifar10": 32, "cifar100": 32, "synthetic": SYNTHETIC_DEFAULT_SIZE,
               "imagefolder": IMAGEFOLDER_DEFAULT_SIZE}  # px when data.image_size = 0


class ExportError(RuntimeError):
    """The model cannot be rebuilt or exported; the message says what is wrong and what to do."""


@dataclass
class Source:
    """What a training script left behind: its resolved config (plain data) and the weights."""
    config: dict
    state_dict: dict | None         # None: the run used random init (encode_stream.py without model.weights)
    path: Path                      # the file the weights came from (or the config, for random init)
    sha256: str                     # of that file
    kind: str                       # checkpoint | weights | random init


@dataclass
class ExportModel:
    """A rebuilt model ready for export: forward(images) returns a tuple in `output_names` order."""
    family: str
    name: str                       # e.g. small_cnn, resnet50, dyrcnn_x4, rvit
    module: nn.Module               # eval mode, fp32, CPU
    input_shape: tuple              # (C, H, W) of one sample; the batch axis is dynamic
    output_names: list
    class_output: str | None        # output whose argmax is the prediction; None for encoders
    quantization: str               # static (QDQ, calibrated: conv nets) | dynamic (Linear / attention)
    strict: bool = False            # torch.export through dynamo (strict) instead of non-strict tracing
    config: dict = field(default_factory=dict)   # the rebuilt model's config (plain data), for the metadata
    tracing: Callable = contextlib.nullcontext  # context to trace the module in
    details: dict = field(default_factory=dict)  # extra metadata (unrolled steps, ...)


@dataclass
class Family:
    name: str
    script: str                     # the script whose runs this family reads
    recognise: str                  # how its config is recognised (for the unknown-type error)
    matches: Callable               # config dict -> bool
    data_config: Callable           # config dict -> DataConfig of the samples it was trained / run on
    build: Callable                 # (Source, Data | None) -> ExportModel


# ----------------------------------------------------------------------------- reading the source
def _read_state(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - zip/pickle/EOF errors all mean a broken file to the user
        detail = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise ExportError(f"weights file {path} is corrupt or truncated ({detail}); export another copy") from None


def _checkpoint_source(step_path):
    """A step folder or state.pt written by lib.checkpoint: loaded, and checked against its COMPLETE marker."""
    state = checkpoint.load(step_path)  # CheckpointError: missing marker, truncated, not plain data
    state_file = step_path / checkpoint.STATE_FILE if step_path.is_dir() else step_path
    digest = sha256_file(state_file)
    marker = state_file.parent / checkpoint.MARKER_FILE
    if marker.is_file():
        try:
            expected = json.loads(marker.read_text()).get("sha256")
        except (OSError, ValueError, AttributeError):
            expected = None
        if expected and expected != digest:
            raise ExportError(f"{state_file} does not match the sha256 in its {checkpoint.MARKER_FILE} marker "
                              f"(corrupted on disk); use another checkpoint")
    if not isinstance(state.get("model"), dict) or not isinstance(state.get("config"), dict):
        raise ExportError(f"{state_file} holds no 'model' and 'config' entries (keys: {sorted(state)[:8]}): it is "
                          f"not a checkpoint of a frugal training script; for a bare state_dict pass --weights "
                          f"with --source_config")
    return Source(state["config"], state["model"], state_file, digest, "checkpoint")


def load_source(checkpoint_path="", weights="", source_config=""):
    """The model's config and weights from a checkpoint (step folder, its state.pt, a run folder) or a weights file
    plus the config.yaml of the run that used it."""
    if checkpoint_path and (weights or source_config):
        raise ConfigError("give either --checkpoint or --weights with --source_config, not both")
    if weights or source_config:
        if not (weights and source_config):
            raise ConfigError("--weights needs --source_config (the config.yaml of the run that used the weights), "
                              "and --source_config needs --weights")
        path = Path(weights)
        if not path.is_file():
            raise ExportError(f"weights file not found: {path}")
        state = _read_state(path)
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]  # one of our checkpoints given as a weights file
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ExportError(f"{path} is not a state_dict (a dict of tensors)")
        return Source(load_yaml(source_config), checkpoint.strip_prefixes(state), path, sha256_file(path), "weights")
    if not checkpoint_path:
        raise ConfigError("nothing to export: pass --checkpoint runs/<name>/checkpoints/step-N (or a run folder), "
                          "or --weights <file> --source_config <run>/config.yaml")
    path = Path(checkpoint_path).expanduser()
    if not path.exists():
        raise ExportError(f"checkpoint not found: {path} (pass runs/<name>/checkpoints/step-N, its state.pt, or the "
                          f"run folder runs/<name>)")
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if path.is_dir() and any(p.name.startswith("step-") for p in folder.iterdir()):
        step = checkpoint.latest(folder)  # a run or checkpoints folder: its newest complete checkpoint
        if step is None:
            raise ExportError(f"{folder} holds no complete checkpoint")
        return _checkpoint_source(step)
    if path.is_dir() and not (path / checkpoint.STATE_FILE).exists() and not path.name.startswith("step-"):
        return _run_folder_source(path)
    return _checkpoint_source(path)


def _run_folder_source(run_dir):
    """A run folder without checkpoints (encode_stream.py): its config.yaml, weights from model.weights."""
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise ExportError(f"{run_dir} is neither a checkpoint nor a run folder (no checkpoints/ and no config.yaml)")
    config = load_yaml(config_file)
    weights = str((config.get("model") or {}).get("weights") or "")
    if not weights:  # the run encoded with a seeded random init: rebuilt the same way
        return Source(config, None, config_file, sha256_file(config_file), "random init")
    path = Path(weights)
    if not path.is_file():
        raise ExportError(f"{run_dir} used model.weights={weights}, which is not found from here; pass "
                          f"--weights <file> --source_config {config_file}")
    return Source(config, checkpoint.strip_prefixes(_read_state(path)), path, sha256_file(path), "weights")


def find_family(config):
    """The family whose training script wrote `config`; ExportError naming the known ones otherwise."""
    for family in FAMILIES:
        if family.matches(config):
            return family
    known = "; ".join(f"{f.name} ({f.script}: {f.recognise})" for f in FAMILIES)
    raise ExportError(f"unknown model type: the config has sections {sorted(config)} and matches no model family. "
                      f"Known: {known}")


def try_build_data(data_cfg, samples, seed=0):
    """(Data, '') with the dataset on the CPU, or (None, reason) when it is not available here."""
    if data_cfg is None:
        return None, "no dataset in the config"
    try:
        return build_data(data_cfg, "cpu", batch_size=samples, seed=seed), ""
    except (FileNotFoundError, ConfigError, OSError) as e:
        return None, str(e).splitlines()[0]


def samples_data_config(section, image_size, samples, root=""):
    """A DataConfig for reading samples in order on the CPU: no augmentation, no worker processes; synthetic
    data regenerated at the needed count only."""
    cfg = merge(DataConfig(), dict(section or {}))
    updates = {"augment": False, "resize_schedule": {}, "workers": 0, "loader": "auto", "download": False}
    if image_size:
        updates["image_size"] = image_size
    if root:
        updates["root"] = root
    if cfg.name == "synthetic":
        updates.update(train_samples=min(cfg.train_samples, samples), test_samples=min(cfg.test_samples, samples))
    return dataclasses.replace(cfg, **updates)


def _image_size(data, data_section, fallback=0):
    if data is not None:
        return data.image_size
    size = (data_section or {}).get("image_size") or fallback or NATIVE_SIZE.get((data_section or {}).get("name"))
    if not size:
        raise ExportError("the input resolution is unknown without the dataset: pass --image_size (px)")
    return int(size)


def _shape_of(state, key, family):
    if key not in state:
        raise ExportError(f"the weights have no '{key}': they are not a {family} model of this config "
                          f"(first keys: {list(state)[:5]})")
    return tuple(state[key].shape)


def _load(model, state, source):
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ExportError(f"the weights in {source.path} do not fit the model rebuilt from its config: "
                          f"{str(e).splitlines()[0][:300]} ...") from None
    return model.eval()


def _no_weights(source):
    return (f"{source.path.parent} has a config.yaml but no checkpoints/ with a complete checkpoint: nothing trained "
            f"to export yet; pass a step folder runs/<name>/checkpoints/step-N")


# ----------------------------------------------------------------------------- families
class _Outputs(nn.Module):
    """Wrap a model so forward returns a tuple of named outputs (what the exporter and onnxruntime see)."""

    def __init__(self, model, pick, **call_kwargs):
        super().__init__()
        self.model, self.pick, self.call_kwargs = model, pick, call_kwargs

    def forward(self, images):
        return self.pick(self.model(images, **self.call_kwargs))


def _classifier_build(source, data):
    """train_ast.py: small_cnn / resnet18 / resnet50 / vit_b16 from lib.models."""
    from lib.models import ModelConfig, build_model
    cfg = source.config
    model_cfg = merge(ModelConfig(), {**cfg["model"], "weights": ""})  # weights: the start point, not the result
    first, last = {"small_cnn": ("stem.0.weight", "head.weight"), "resnet18": ("conv1.weight", "fc.weight"),
                   "resnet50": ("conv1.weight", "fc.weight"),
                   "vit_b16": ("conv_proj.weight", "heads.head.weight")}[model_cfg.name]
    if source.state_dict is None:
        raise ExportError(_no_weights(source))
    stem, head = _shape_of(source.state_dict, first, model_cfg.name), _shape_of(source.state_dict, last, model_cfg.name)
    in_channels, num_classes = stem[1], head[0]
    if model_cfg.name.startswith("resnet"):  # the stem the run had, whatever image size decided it then
        model_cfg = dataclasses.replace(model_cfg, small_input="yes" if stem[-1] == 3 else "no")
    size = _image_size(data, cfg.get("data"))
    model = _load(build_model(model_cfg, in_channels, num_classes, size), source.state_dict, source)
    return ExportModel("classifier", model_cfg.name, _Outputs(model, lambda y: (y,)), (in_channels, size, size),
                       ["logits"], "logits", "dynamic" if model_cfg.name == "vit_b16" else "static",
                       config={**to_dict(model_cfg), "in_channels": in_channels, "num_classes": num_classes})


def _dyrcnn_build(source, data):
    """train_dynvision.py: a DyRCNN unrolled for its configured steps (stimulus + residual)."""
    from lib.dynvision import DyRCNN, ModelConfig
    cfg = source.config
    if source.state_dict is None:
        raise ExportError(_no_weights(source))
    v1 = _shape_of(source.state_dict, "areas.0.conv1.weight", "DyRCNN")
    head = _shape_of(source.state_dict, "classifier.weight", "DyRCNN")
    # classes and channels come from the data at training time; the weights hold them. channels_last only changes
    # the memory layout, not the numbers.
    model_cfg = merge(ModelConfig(), {**cfg["model"], "num_classes": head[0], "in_channels": v1[1],
                                      "channels_last": False})
    size = _image_size(data, cfg.get("data"))
    model = _load(DyRCNN(model_cfg), source.state_dict, source)
    steps = model_cfg.total_steps()
    # logits at the last step (the prediction) and at every step (B, T, classes): the forward computes them all
    wrapped = _Outputs(model, lambda logits: (logits[:, -1], logits))
    return ExportModel("dyrcnn", f"dyrcnn_{model_cfg.preset}", wrapped, (v1[1], size, size),
                       ["logits", "logits_per_step"], "logits", "static", strict=True, config=to_dict(model_cfg),
                       details={"unrolled_steps": steps, "stimulus_steps": model_cfg.n_timesteps,
                                "residual_steps": model_cfg.residual(), "dt_ms": model_cfg.dt_ms})


def _encoder_build(source, data):
    """encode_stream.py: its encoder (model.name: rvit | trm, lib/encoder.py), with the outputs the run wrote."""
    from lib.encoder import MODELS, EncoderConfig, load_encoder
    cfg = source.config
    enc_cfg = merge(EncoderConfig(), {**cfg["model"], "weights": ""})
    model_cls, available = MODELS[enc_cfg.name][1], MODELS[enc_cfg.name][2]
    outputs = list((cfg.get("encode") or {}).get("outputs") or [available[0]])
    if any(o not in available for o in outputs):
        raise ExportError(f"encode.outputs {outputs} names outputs the {enc_cfg.name} encoder does not have "
                          f"({', '.join(available)})")
    if source.state_dict is not None:
        in_channels = _shape_of(source.state_dict, "patch_embed.weight", model_cls.__name__)[1]
        model = _load(model_cls(enc_cfg.model_config(), in_channels), source.state_dict, source)
    else:  # the encoder encode_stream.py built: random init seeded by run.seed alone, channels from the data
        if data is None:
            raise ExportError(f"{source.path}: the run used a random-init encoder, whose channel count comes from its "
                              f"dataset, which is not available here; pass --data_root or export with --weights")
        model = load_encoder(enc_cfg, data.in_channels, seed=(cfg.get("run") or {}).get("seed", 0)).eval()
        in_channels = data.in_channels
    wrapped = _Outputs(model, lambda out: tuple(out[k] for k in outputs), outputs=tuple(outputs))
    return ExportModel("encoder", enc_cfg.name, wrapped, (in_channels, enc_cfg.image_size, enc_cfg.image_size),
                       outputs, None, "dynamic", config={**to_dict(enc_cfg), "in_channels": in_channels})


def _samples_cfg_ast(config):
    return config.get("data")


def _samples_cfg_encode(config):
    return {**(config.get("data") or {}), "image_size": (config.get("model") or {}).get("image_size", 0)}


FAMILIES = [
    Family("classifier", "train_ast.py", "an 'ast' section and model.name",
           lambda c: "ast" in c and "name" in (c.get("model") or {}), _samples_cfg_ast, _classifier_build),
    Family("dyrcnn", "train_dynvision.py", "a 'memory' section and model.preset",
           lambda c: "memory" in c and "preset" in (c.get("model") or {}), _samples_cfg_ast, _dyrcnn_build),
    Family("encoder", "encode_stream.py", "an 'encode' section and an encoder model (model.loops or model.name)",
           lambda c: "encode" in c and ({"loops", "name"} & set(c.get("model") or {})), _samples_cfg_encode,
           _encoder_build),
]


# ----------------------------------------------------------------------------- export
def _describe_failure(err, program=None):
    """One readable paragraph from an exporter error: the op, the module it sits in, the exporter's own words."""
    text = str(err)
    causes = [text]
    c = err.__cause__ or err.__context__
    while c is not None and len(causes) < 6:
        causes.append(f"{type(c).__name__}: {c}")
        c = c.__cause__ or c.__context__
    joined = "\n".join(causes)
    op = re.search(r"target=(torch\.ops\.[\w.]+|aten\.[\w.]+)", joined)
    op = op.group(1) if op else None
    node_name = re.search(r"Error when translating node %(\w+)", joined)
    where = ""
    if program is not None and (op or node_name):
        target = op.removeprefix("torch.ops.") if op else None
        for node in program.graph.nodes:
            if (node_name and node.name == node_name.group(1)) or (target and str(node.target) == target):
                stack = node.meta.get("nn_module_stack") or {}
                if stack:
                    path, cls = list(stack.values())[-1]
                    cls_name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
                    where = f" in module '{path.removeprefix('L__self__.').replace('_modules.', '') or '<top>'}' " \
                            f"({cls_name.rsplit('.', 1)[-1]})"
                break
    reason = next((line.strip() for cause in causes[1:] for line in cause.splitlines()
                   if line.strip() and "See the stack trace" not in line), "")  # the innermost words
    if not reason:
        reason = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    frames = [m for m in re.finditer(r'File "([^"]+)", line (\d+), in (\w+)(?:, code: |\n\s+)(.+)', joined)
              if "site-packages" not in m.group(1) and "/torch/" not in m.group(1)]
    message = f"{f'op {op}{where}' if op else 'the model'} cannot be exported to ONNX: {reason[:400]}"
    if frames:  # the model's own line that the tracer stopped at
        path, line, func, code = frames[-1].groups()
        message += f" (at {Path(path).name}:{line} in {func}: {code.strip()[:120]})"
    return message


def trace(model, example):
    """torch.export with a dynamic batch axis; ExportError naming the failing code on failure."""
    batch = torch.export.Dim(BATCH_AXIS, min=1, max=MAX_BATCH)
    try:
        with torch.no_grad(), warnings.catch_warnings(), model.tracing():
            # DyRCNN's forward keeps a weak reference to its run state (for saved-tensor policies): harmless here
            warnings.filterwarnings("ignore", message="While compiling, we found certain side effects")
            return torch.export.export(model.module, (example,), dynamic_shapes=({0: batch},), strict=model.strict)
    except Exception as e:  # noqa: BLE001 - every tracing failure is reported the same way
        raise ExportError(f"{model.name}: torch.export failed: {_describe_failure(e)}") from None


def write_onnx(model, path, metadata, example):
    """Export `model` to `path` (opset OPSET, batch axis named 'batch', metadata_props); returns the op types."""
    program = trace(model, example)
    try:
        onnx_program = torch.onnx.export(program, dynamo=True, input_names=["images"],
                                         output_names=list(model.output_names), opset_version=OPSET, verbose=False)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"{model.name}: {_describe_failure(e, program)}") from None
    ir_model = onnx_program.model
    _fold_weight_transposes(ir_model)
    _name_batch_axis(ir_model)
    for key, value in metadata.items():
        ir_model.metadata_props[key] = str(value)
    onnx_program.save(str(path), external_data=False)
    return sorted({node.op_type for node in ir_model.graph})


def _fold_weight_transposes(ir_model):
    """The exporter leaves Transpose(weight) in the graph when the weight is large and used more than once (RViT's
    blocks run on every loop): merge the duplicates, then fold them, so each MatMul reads a constant weight, which
    dynamic int8 quantization needs (it skips MatMuls whose weight is computed). The numbers do not change."""
    import onnxscript.optimizer
    from onnx_ir.passes.common import CommonSubexpressionEliminationPass
    CommonSubexpressionEliminationPass()(ir_model)
    onnxscript.optimizer.fold_constants(ir_model)
    onnxscript.optimizer.remove_unused_nodes(ir_model)


def _name_batch_axis(ir_model):
    """torch.export calls the batch axis s0, s77, ...: name it 'batch' on the inputs and outputs."""
    import onnx_ir as ir
    first = ir_model.graph.inputs[0].shape[0]
    symbol = getattr(first, "value", None)
    if not isinstance(symbol, str):
        raise ExportError("the exported graph has a fixed batch size: torch.export specialised the batch axis")
    for value in [*ir_model.graph.inputs, *ir_model.graph.outputs]:
        if value.shape is not None:
            value.shape = ir.Shape([ir.SymbolicDim(BATCH_AXIS) if getattr(d, "value", None) == symbol else d
                                    for d in value.shape])


def metadata(model, source, input_desc):
    """metadata_props written into the ONNX file: model, input spec, outputs, source and its sha256."""
    c, h, w = model.input_shape
    meta = {"frugal.model_name": model.name, "frugal.family": model.family,
            "frugal.script": next(f.script for f in FAMILIES if f.name == model.family),
            "frugal.input": json.dumps({"name": "images", "dtype": "float32", "shape": [BATCH_AXIS, c, h, w],
                                        **input_desc}),
            "frugal.outputs": json.dumps(list(model.output_names)),
            "frugal.source": str(source.path), "frugal.source_kind": source.kind,
            "frugal.source_sha256": source.sha256, "frugal.torch": torch.__version__}
    if model.details:
        meta["frugal.details"] = json.dumps(model.details)
    meta["frugal.model_config"] = json.dumps(model.config, default=str)
    return meta
