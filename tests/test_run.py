"""lib/run.py: refusing another config, verified resume, a finished run's result kept, --help, one-line errors."""
import errno
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from lib import dist
from lib.checkpoint import CheckpointError
from lib.config import ConfigError, parse
from lib.run import Run, config_differences, field_comments, help_text, run_script

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class RunSection:
    name: str = "tiny"              # run folder: <out_dir>/<name>
    out_dir: str = "runs"
    resume: str = "auto"            # auto | none | <path>
    keep_checkpoints: int = 2


@dataclass
class OptimSection:
    lr: float = 0.1                 # peak learning rate
                                    # (for the global batch)
    # a header comment, not the next field's
    schedule: dict[int, float] = field(default_factory=dict)


@dataclass
class TinyConfig:
    run: RunSection = field(default_factory=RunSection)
    optim: OptimSection = field(default_factory=OptimSection)   # the optimizer


def tiny(tmp_path, *args):
    return parse(TinyConfig(), [f"--run.out_dir={tmp_path}", *args])


def info():
    return dist.DistInfo(0, 1, 0, torch.device("cpu"), False)


def save_step(run, step):
    run.save(step, lambda: {"step": step, "weights": torch.full((4,), float(step))})


def test_changed_config_is_refused_naming_the_keys_and_allowed_keys_pass(tmp_path):
    with Run(tiny(tmp_path), info()) as run:
        save_step(run, 1)
    with pytest.raises(ConfigError, match=r"optim.lr: 0.1 -> 0.2.*another run.name"):
        Run(tiny(tmp_path, "--optim.lr=0.2"), info())
    with pytest.raises(ConfigError, match=r"optim.schedule: \{\} -> \{0: 1.0\}"):
        Run(tiny(tmp_path, "--optim.schedule={0: 1.0}"), info())
    with Run(tiny(tmp_path, "--run.keep_checkpoints=5"), info()) as run:  # how the run is kept, not what it is
        assert run.resume()["step"] == 1
    # a folder whose run kept nothing yet takes any config
    with Run(tiny(tmp_path, "--run.name=fresh"), info()):
        pass
    with Run(tiny(tmp_path, "--run.name=fresh", "--optim.lr=0.3"), info()):
        pass


def test_config_differences_treat_new_keys_as_defaults():
    saved = {"run": {"name": "a"}, "optim": {"lr": 0.1, "gone": 1}}
    assert config_differences(saved, {"run": {"name": "a"}, "optim": {"lr": 0.1, "new": 3}},
                              defaults={"optim": {"new": 3}}, sections={"run", "optim"}) == []
    assert config_differences(saved, {"run": {"name": "b"}, "optim": {"lr": 0.1}}, sections={"run", "optim"}) \
        == ["run.name: 'a' -> 'b'"]
    assert config_differences(saved, {"run": {"name": "b"}, "optim": {"lr": 0.1}}, may_change=("run",),
                              sections={"run", "optim"}) == []


def test_resume_takes_the_newest_verified_checkpoint_and_refuses_all_corrupt(tmp_path):
    with Run(tiny(tmp_path), info()) as run:
        for step in (1, 2):
            save_step(run, step)
    ckpt = tmp_path / "tiny" / "checkpoints"
    state_file = ckpt / "step-000002" / "state.pt"
    state_file.write_bytes(state_file.read_bytes()[:-5] + b"xxxxx")   # the newest one rots on disk
    with Run(tiny(tmp_path), info()) as run, pytest.warns(UserWarning, match="step-000002"):
        assert run.resume()["step"] == 1 and run.start_step == 1
    state_file = ckpt / "step-000001" / "state.pt"
    state_file.write_bytes(state_file.read_bytes()[:-5] + b"xxxxx")
    with Run(tiny(tmp_path), info()) as run, pytest.warns(UserWarning):
        with pytest.raises(CheckpointError, match="every checkpoint .* is corrupt"):  # never a silent restart
            run.resume()


def test_a_killed_save_is_cleaned_at_the_next_start(tmp_path):
    with Run(tiny(tmp_path), info()) as run:
        save_step(run, 1)
    ckpt = tmp_path / "tiny" / "checkpoints"
    (ckpt / "step-000002").mkdir()
    (ckpt / "step-000002" / ".state.pt.tmp.123").write_bytes(b"half")          # killed before its marker
    (ckpt / "step-000001" / ".state.pt.tmp.456").write_bytes(b"half")          # killed while re-saving
    (tmp_path / "tiny" / ".result.json.tmp.789").write_bytes(b"{")             # killed while writing the result
    with Run(tiny(tmp_path), info()) as run:
        assert not list((tmp_path / "tiny").glob(".*.tmp.*"))
        assert sorted(p.name for p in ckpt.iterdir()) == ["step-000001"]
        assert sorted(p.name for p in (ckpt / "step-000001").iterdir()) == ["COMPLETE", "state.pt"]
        assert run.resume()["step"] == 1


def test_finish_never_replaces_a_result_when_nothing_was_trained(tmp_path, capsys):
    with Run(tiny(tmp_path), info()) as run:
        assert run.finish({"top1": 0.9}) == {"top1": 0.9}
    assert "storage: " in capsys.readouterr().out
    with Run(tiny(tmp_path), info()) as run:
        assert run.finish({"top1": None}, did_work=False) == {"top1": 0.9}
    assert json.loads((tmp_path / "tiny" / "result.json").read_text()) == {"top1": 0.9}


def test_help_lists_every_key_with_default_and_comment():
    comments = field_comments(OptimSection)
    assert comments == {"lr": "peak learning rate (for the global batch)"}  # the header comment is not attached
    text = help_text(TinyConfig(), "Tiny script.\n\n    python tiny.py")
    assert text.startswith("Tiny script.")
    assert "[optim]  # the optimizer" in text
    lines = {line.split("=")[0].strip(): line for line in text.splitlines() if " = " in line}
    assert lines["run.name"].split("#")[1].strip() == "run folder: <out_dir>/<name>"
    assert "optim.schedule = {}" in lines["optim.schedule"] and "#" not in lines["optim.schedule"]
    assert set(lines) == {"run.name", "run.out_dir", "run.resume", "run.keep_checkpoints", "optim.lr",
                          "optim.schedule"}


def test_entry_point_turns_user_errors_into_one_line(capsys):
    def fails_with(exc):
        def main(cfg):
            raise exc
        with pytest.raises(SystemExit) as stop:
            run_script(main, TinyConfig(), "doc", argv=[])
        return stop.value.code

    assert fails_with(CheckpointError("checkpoint x is corrupt")) == "error: checkpoint x is corrupt"
    full = RuntimeError("[enforce fail at inline_container.cc] unexpected pos")
    full.__context__ = OSError(errno.ENOSPC, "No space left on device")
    assert fails_with(full).startswith("error: disk full (No space left on device)")
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        fails_with(ZeroDivisionError())
    with pytest.raises(SystemExit) as stop:
        run_script(lambda cfg: None, TinyConfig(), "doc", argv=["--optim.lrr=1"])
    assert stop.value.code == "config error: unknown config key 'optim.lrr' (did you mean 'optim.lr'?)"
    with pytest.raises(SystemExit) as stop:
        run_script(lambda cfg: None, TinyConfig(), "The doc.", argv=["--config", "nope.yaml", "-h"])
    assert stop.value.code == 0 and capsys.readouterr().out.startswith("The doc.")


@pytest.mark.parametrize("script", ["train_ast", "train_dynvision", "encode_stream"])
def test_every_script_prints_its_doc_and_keys_on_help(script, capsys):
    module = __import__(script)
    with pytest.raises(SystemExit) as stop:
        run_script(module.main, module.Config(), module.__doc__, argv=["-h"])
    out = capsys.readouterr().out
    assert stop.value.code == 0 and out.startswith(module.__doc__.strip().splitlines()[0])
    assert "    run.name = " in out and "  [data]" in out and "    data.name = " in out


def test_the_main_blocks_answer_help_and_typos_from_the_command_line():
    """`python train_ast.py --help` exits 0 with the keys; a typo is one line on stderr and exit status 1."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    calls = {"help": [sys.executable, "train_ast.py", "--help"],
             "typo": [sys.executable, "encode_stream.py", "--run.nmae=x"]}
    procs = {k: subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k, c in calls.items()}
    out = {k: (*p.communicate(timeout=300), p.returncode) for k, p in procs.items()}
    stdout, stderr, rc = out["help"]
    assert rc == 0 and stdout.startswith("Adaptive Sparse Training") and "    ast.mode = batch" in stdout, stderr
    stdout, stderr, rc = out["typo"]
    assert rc == 1 and stderr.strip() == "config error: unknown config key 'run.nmae' (did you mean 'run.name'?)"


def test_dynvision_rerun_keeps_the_result_and_a_changed_config_is_refused(tmp_path):
    """A finished run rerun: nothing trained, the same result (not nulls); another lr: refused, keys named."""
    import train_dynvision

    def cfg(*extra):
        return parse(train_dynvision.Config(), ["--config", str(ROOT / "configs/dynvision_debug.yaml"),
                                                f"--run.out_dir={tmp_path}", "--run.max_steps=3",
                                                "--run.eval_batches=1", "--run.epochs=1", *extra])

    first = train_dynvision.main(cfg())
    result_file = tmp_path / "dynvision_debug" / "result.json"
    stored = result_file.read_bytes()
    assert first["final_accuracy"] is not None
    again = train_dynvision.main(cfg("--data.workers=3", "--loop.log_every=1"))  # allowed to change
    assert again == json.loads(stored) and result_file.read_bytes() == stored
    with pytest.raises(ConfigError, match=r"optim.lr: 0.003 -> 0.01"):
        train_dynvision.main(cfg("--optim.lr=0.01"))
    with pytest.raises(ConfigError, match=r"memory.strategy: 'checkpoint' -> 'full'"):
        train_dynvision.main(cfg("--memory.strategy=full"))
    assert result_file.read_bytes() == stored


def test_run_variants_warms_up_once_in_a_throwaway_folder(tmp_path):
    import train_ast
    from lib.config import merge
    from lib.run import run_variants
    cfg = merge(train_ast.Config(), {"run": {"out_dir": str(tmp_path), "name": "cmp", "max_steps": 0}})
    calls = []

    def train_variant(vcfg, run_dir, reference):
        calls.append((Path(run_dir).name, vcfg.run.max_steps, vcfg.run.resume, vcfg.run.eval_every,
                      Path(run_dir).exists()))
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        return {"name": Path(run_dir).name}

    variants = {"a": {"ast": {"mode": "full"}}, "b": {"ast": {"mode": "batch"}}}
    results, dirs = run_variants(cfg, variants, train_variant, warmup_steps=3, warmup_run={"eval_every": 7})
    # the throwaway copy of the first variant trains 3 steps, never resumes, and its folder is gone afterwards
    assert calls[0] == (".warmup", 3, "none", 7, False) and [c[0] for c in calls[1:]] == ["a", "b"]
    assert calls[1][1] == 0 and not (tmp_path / "cmp" / ".warmup").exists()
    assert set(results[cfg.run.seed]) == {"a", "b"} and dirs[cfg.run.seed, "b"] == tmp_path / "cmp" / "b"
