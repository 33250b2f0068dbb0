"""The run skeleton: what every entry script does around its loop, written once (helpers and one context object).

`Run` owns the run folder `<out_dir>/<name>/`: it refuses a folder that holds a run of another config (naming the
keys that differ), writes `config.yaml` and `run_info.json`, resumes from the newest verified checkpoint, saves
every `run.checkpoint_every` steps and wherever the script says (the end of an epoch) keeping the newest
`run.keep_checkpoints`, turns SIGTERM/SIGUSR1 into "checkpoint, then exit 0", keeps the metrics log, writes
`result.json` atomically (never over a finished run's result when this invocation trained nothing) and prints the
storage report. `run_script` is the `if __name__ == "__main__":` of every script: `--help`, config errors and
user errors as one line. The loop itself stays in the script (train_dynvision.py is the full example):

    with Run(cfg, info, may_change=MAY_CHANGE) as run:        # folder, config check, config.yaml, run_info.json
        state = run.resume(info.device)                        # newest verified checkpoint, or None
        if state is not None:
            checkpoint.restore_training(state, model, optimizer, step_fn, counters, info.rank, cfg.run.seed)
        snapshot = lambda: checkpoint.training_state(model, optimizer, step_fn, counters, to_dict(cfg))
        for epoch in range(counters["epoch"], cfg.run.epochs):
            for x, y, _ in loader:                             # (loader.set_epoch(epoch, start_batch=...))
                ...the step; counters["step"] += 1; run.metrics.write(kind="train", ...) on log steps
                run.save_if_due(counters["step"], snapshot)    # every run.checkpoint_every steps
                if run.should_stop(counters["step"]): break    # SIGTERM/SIGUSR1 (collective under torchrun)
            if run.should_stop():
                run.preempted(counters["step"], snapshot)      # checkpoint, one message, raise Preempted
            run.save(counters["step"], snapshot)               # the end of each epoch
        return run.finish(summary, did_work=counters["step"] > run.start_step)   # result.json + storage report

    if __name__ == "__main__":
        run_script(main, Config(), __doc__)

`Preempted` is a SystemExit with code 0: it unwinds every caller (a compare loop, a test's main()) and the
process exits 0 with the one message `preempted` printed. Under torchrun every rank builds the same Run (all
read the folder; rank 0 writes it) and calls should_stop at the same steps.
"""
import ast
import dataclasses
import inspect
import io
import json
import shutil
import sys
import textwrap
import tokenize
from pathlib import Path

import yaml

from lib import checkpoint, dist
from lib.config import ConfigError, merge, parse, to_dict, write_run_info
from lib.loop import MetricsLog, NonFiniteLossError
from lib.storage import StorageError, atomic_write_json, disk_full_error, format_report, run_report

# errors whose message says what to fix (bad config, missing data or checkpoint, full disk, diverged loss)
USER_ERRORS = (ConfigError, FileNotFoundError, checkpoint.CheckpointError, StorageError, NonFiniteLossError)

# keys that change how a run is carried out, not what it computes: a resumed run may change them
MAY_CHANGE = ("run.resume", "run.out_dir", "run.name", "run.device", "run.keep_checkpoints", "run.checkpoint_every",
              "loop.log_every", "data.workers", "data.prefetch", "data.download")

# what makes a run folder hold a run: a completed checkpoint or a result
WORK = ("checkpoints/step-*/COMPLETE", "result.json")


class Preempted(SystemExit):
    """A preemption signal stopped the run after its checkpoint was written: exit status 0, rerun to resume."""

    def __init__(self, message, result=None):
        super().__init__(0)
        self.message, self.result = message, result


# ----------------------------------------------------------------------------- the config of a used folder
def _covered(key, keys):
    return any(key == k or key.startswith(k + ".") for k in keys)


def _sections(cfg, prefix=""):
    """Dotted names of the dataclass sections: their values are compared key by key, plain dicts as one value."""
    names = set()
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            names.add(prefix + f.name)
            names |= _sections(value, f"{prefix}{f.name}.")
    return names


def _leaves(data, sections, prefix=""):
    out = {}
    for k, v in data.items():
        key = prefix + str(k)
        if key in sections and isinstance(v, dict):
            out.update(_leaves(v, sections, key + "."))
        else:
            out[key] = v
    return out


def config_differences(saved: dict, current: dict, may_change=(), defaults: dict | None = None, sections=()):
    """['key: saved -> current', ...] for the keys not in `may_change` whose values differ.

    A key the saved config lacks (added to the code since) counts as its default (`defaults`), so code updates do
    not block a resume; a key the code no longer has is ignored. `sections` names the nested mappings compared
    key by key (others, such as data.resize_schedule, compare as one value).
    """
    sections = set(sections)
    old, new = _leaves(saved, sections), _leaves(current, sections)
    base = _leaves(defaults, sections) if defaults is not None else {}
    diffs = []
    for key, value in new.items():
        if _covered(key, may_change):
            continue
        before = old.get(key, base.get(key, value))
        if before != value:
            diffs.append(f"{key}: {before!r} -> {value!r}")
    return diffs


def refuse_other_config(run_dir, cfg, may_change=MAY_CHANGE, work=WORK):
    """ConfigError if run_dir holds a run (`work` globs match) written with another config; names the keys."""
    run_dir = Path(run_dir)
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file() or not any(any(run_dir.glob(pattern)) for pattern in work):
        return  # a fresh folder, or one whose run never got far enough to keep anything
    try:
        saved = yaml.safe_load(saved_path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{saved_path} is not valid YAML ({e}); it records the config of the run in {run_dir}: "
                          f"restore it, or use another run.name") from None
    diffs = config_differences(saved, to_dict(cfg), may_change, to_dict(type(cfg)()), _sections(cfg))
    if diffs:
        shown = "; ".join(diffs[:8]) + (f"; and {len(diffs) - 8} more" if len(diffs) > 8 else "")
        marked = sorted(run_dir.glob("checkpoints/step-*/COMPLETE"))
        start_from = f" (to start from its checkpoint: --run.resume={marked[-1].parent})" if marked else ""
        raise ConfigError(
            f"{run_dir} holds a run with another config ({shown}); resuming it would mix two runs. Use another "
            f"run.name{start_from}, or delete the folder to start over. Keys that may change between a run and its "
            f"resume: {', '.join(may_change)}")


# ----------------------------------------------------------------------------- the context object
class Run:
    """One run folder, its checkpoints, its preemption signal, its metrics and its result (see the module doc).

    cfg.run must have name, out_dir and resume; checkpoint_every and keep_checkpoints are optional (0 and 3).
    `run_dir` overrides <out_dir>/<name> (e.g. one variant of a comparison); `work` lists the globs that mark a
    folder as holding a run (checked against `may_change`).
    """

    def __init__(self, cfg, info, may_change=MAY_CHANGE, run_dir=None, work=WORK, log=None):
        self.cfg, self.info = cfg, info
        self.dir = Path(run_dir) if run_dir is not None else Path(cfg.run.out_dir) / cfg.run.name
        self.ckpt_dir = self.dir / "checkpoints"
        self.main = dist.is_main()
        self.log = log or (lambda *a: print(*a, flush=True))
        self.start_step = 0
        self.every = getattr(cfg.run, "checkpoint_every", 0)
        self.keep = getattr(cfg.run, "keep_checkpoints", 3)
        refuse_other_config(self.dir, cfg, may_change, work)  # every rank reads the folder: they all agree
        dist.barrier()  # ... before rank 0 rewrites its config.yaml
        if self.main:
            removed = checkpoint.remove_partial(self.ckpt_dir)  # what a killed save left behind
            if removed:
                self.say(f"[{self.dir.name}] removed {len(removed)} incomplete checkpoint folder(s) of a killed save")
            for tmp in self.dir.glob(".*.tmp.*"):  # temp files of atomic writes (result.json, ...) cut short
                tmp.unlink(missing_ok=True)
            write_run_info(self.dir, cfg, info.device)
        self.metrics = MetricsLog(self.dir / "metrics.jsonl", enabled=self.main)
        self.preempt = checkpoint.PreemptionHandler()
        self.stopped = False

    def say(self, *args):
        if self.main:
            self.log(*args)

    # ---- resume and checkpoints
    def resume(self, map_location="cpu"):
        """The newest verified checkpoint's state (run.resume: auto | none | <path>), or None to start at step 0.

        Checkpoints that all fail verification are a CheckpointError, never a silent restart.
        """
        path = checkpoint.resolve_resume(self.cfg.run.resume, self.ckpt_dir)
        if path is None:
            return None
        state = checkpoint.load(path, map_location=map_location)
        self.start_step = int(state.get("step", 0))
        self.say(f"[{self.dir.name}] resumed from {path} at step {self.start_step}")
        return state

    def save(self, step, state_fn):
        """Checkpoint `state_fn()` (a dict of plain data) as step `step`; rank 0 writes, keep the newest k."""
        if self.main:
            checkpoint.save(self.ckpt_dir, step, state_fn(), keep=self.keep)

    def save_if_due(self, step, state_fn):
        """Checkpoint every run.checkpoint_every steps (0: only where the script calls save)."""
        if self.every and step % self.every == 0:
            self.save(step, state_fn)

    # ---- preemption
    def should_stop(self, step=None, collective=True):
        """Has a preemption signal arrived? With `step`, under torchrun the ranks agree every loop.log_every steps
        (a collective: call it at the same steps on every rank); without, they agree now (an epoch boundary).
        collective=False: this rank's own flag (ranks that never communicate, e.g. encode_stream)."""
        if self.stopped:
            return True
        if not collective or not self.info.distributed:
            self.stopped = self.preempt.requested
        elif step is None:
            self.stopped = self.preempt.sync_requested(self.info.device)
        else:
            every = getattr(getattr(self.cfg, "loop", None), "log_every", 1)
            self.stopped = self.preempt.stop_now(step, every, self.info.device)
        return self.stopped

    def preempted(self, step=None, state_fn=None, result=None):
        """Checkpoint (when given a step and state), say so, and raise Preempted: the process exits 0."""
        if state_fn is not None:
            self.save(step, state_fn)
        where = f" at step {step}: checkpoint written" if step is not None else ""
        message = (f"[{self.dir.name}] stopped by {self.preempt.received or 'a preemption signal on another rank'}"
                   f"{where}; run the same command again to resume")
        self.say(message)
        raise Preempted(message, result)

    # ---- the end
    def previous_result(self):
        """result.json of this folder, or None."""
        path = self.dir / "result.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def finish(self, summary, did_work=True, report=True):
        """Write result.json atomically (rank 0) and print the storage report; returns the result on record.

        did_work=False (this invocation trained nothing, e.g. a rerun of a finished run) keeps and returns an
        existing result.json instead of overwriting it.
        """
        previous = None if did_work else self.previous_result()
        if previous is not None:
            self.say(f"[{self.dir.name}] finished before: nothing left to do, result.json kept")
            summary = previous
        elif self.main:
            atomic_write_json(self.dir / "result.json", summary)
        if report and self.main:
            self.log(format_report(run_report(self.dir)))
        return summary

    def close(self):
        self.metrics.close()
        self.preempt.restore()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


# ----------------------------------------------------------------------------- variants back to back
@dataclasses.dataclass
class CompareConfig:
    enabled: bool = False           # train the listed variants back to back into one run folder; compare.md / .csv
    runs: dict[str, dict] = dataclasses.field(default_factory=dict)  # name -> overrides of this config, e.g.
                                    # {random: {ast: {mode: random, match: ast}}}; empty = the script's defaults
                                    # (train_ast: full, ast, random, budget, curriculum; train_dynvision: full,
                                    # checkpoint, compress, stream)
    seeds: int = 1                  # every variant with seeds run.seed, run.seed + 1, ...: mean +- std and a paired
                                    # t-test of each variant - its control over seeds in compare.md
    warmup_steps: int = 20          # CUDA only: steps of a throwaway run before the first variant, so one-time
                                    # costs (CUDA/cuDNN start-up, autotuning, kernel compilation) go to no variant

    def validate(self):
        if self.seeds < 1:
            raise ConfigError(f"compare.seeds must be >= 1, got {self.seeds}")
        if self.warmup_steps < 0:
            raise ConfigError(f"compare.warmup_steps must be >= 0, got {self.warmup_steps}")


def run_variants(cfg, variants, train_variant, may_change=MAY_CHANGE, seeds=1, warmup_steps=0, warmup_run=None,
                 log=None, effective=None):
    """Train the variants ({name: overrides of cfg}) back to back, per seed, into one folder; reuse finished ones.

    Variant `name` of seed s is cfg merged with its overrides, compare.enabled off and run.seed = s, trained into
    <out_dir>/<name>/<variant>/ (several seeds: <out_dir>/<name>/seed-<s>/<variant>/). A variant whose result.json
    exists is not retrained (a preempted or rerun comparison goes on where it stopped) if the config in its folder
    equals this one's, else a ConfigError names the keys that differ; run.resume=none trains every variant again.
    train_variant(vcfg, run_dir, reference) trains one and returns its summary (reference: the summaries of this
    seed's variants so far). warmup_steps > 0: before the first variant that trains, a throwaway copy of it trains
    that many steps in <out_dir>/<name>/.warmup/ (removed after; run overrides `warmup_run` on top), so one-time costs
    (CUDA/cuDNN start-up, autotuning, kernel compilation) are charged to no variant;
    effective(vcfg, run_dir), if given, is the config a finished variant really ran with (what it is checked against:
    train_ast's memory fallback may have changed it).
    Returns ({seed: {name: summary}}, {(seed, name): run_dir}).
    """
    say = log or (lambda *a: print(*a, flush=True))
    root = Path(cfg.run.out_dir) / cfg.run.name
    seed_list = [cfg.run.seed + s for s in range(seeds)]
    # every variant's config first: a bad override fails before anything trains
    configs = {(seed, name): merge(merge(cfg, overrides), {"compare": {"enabled": False}, "run": {"seed": seed}})
               for seed in seed_list for name, overrides in variants.items()}
    results, dirs = {}, {}
    for seed in seed_list:
        folder = root if len(seed_list) == 1 else root / f"seed-{seed}"
        results[seed] = {}
        for name in variants:
            vcfg, run_dir = configs[seed, name], folder / name
            done_file = run_dir / "result.json"
            if done_file.is_file() and vcfg.run.resume != "none":
                refuse_other_config(run_dir, effective(vcfg, run_dir) if effective else vcfg, may_change)
                results[seed][name] = json.loads(done_file.read_text())  # finished before: keep it
                if dist.is_main():
                    say(f"[{name}] already finished, reusing {done_file}")
            else:
                if warmup_steps:
                    _throwaway_run(vcfg, root / ".warmup", train_variant, warmup_steps, warmup_run)
                    warmup_steps = 0
                results[seed][name] = train_variant(vcfg, run_dir, results[seed])
            dirs[seed, name] = run_dir
    return results, dirs


def _throwaway_run(vcfg, scratch, train_variant, steps, run_overrides):
    wcfg = merge(vcfg, {"run": {"max_steps": steps, "resume": "none", "eval_every": 10 ** 6, **(run_overrides or {})}})
    try:
        train_variant(wcfg, scratch, {})
    finally:
        if dist.is_main():
            shutil.rmtree(scratch, ignore_errors=True)


# ----------------------------------------------------------------------------- the entry point
def field_comments(cls) -> dict:
    """{field name: its `# ...` comment} from the dataclass source (a comment line below a field, indented past the
    field's name, continues it)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments = {}  # row -> (col, text, alone on its line)
    code_rows = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = (tok.start[1], tok.string.lstrip("#").strip(), tok.start[0] not in code_rows)
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code_rows.update(range(tok.start[0], tok.end[0] + 1))
    out = {}
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        parts = [comments[r][1] for r in range(node.lineno, node.end_lineno + 1)
                 if r in comments and not comments[r][2]]
        row = node.end_lineno + 1
        while row in comments and comments[row][2] and comments[row][0] > node.col_offset:
            parts.append(comments[row][1])
            row += 1
        if parts:
            out[node.target.id] = " ".join(parts)
    return out


def _show(value):
    if isinstance(value, str):
        return value if value else '""'
    return json.dumps(value)


def config_help(defaults, prefix="") -> list[str]:
    """One line per config key: `section.key = default    # comment`, sections in declaration order."""
    lines = []
    comments = field_comments(type(defaults))
    for f in dataclasses.fields(defaults):
        value = getattr(defaults, f.name)
        note = comments.get(f.name, "")
        if dataclasses.is_dataclass(value):
            lines.append(f"  [{prefix}{f.name}]" + (f"  # {note}" if note else ""))
            lines += config_help(value, f"{prefix}{f.name}.")
        else:
            entry = f"    {prefix}{f.name} = {_show(value)}"
            lines.append(f"{entry:<44}  # {note}" if note else entry)
    return lines


def help_text(defaults, doc) -> str:
    """The script's docstring and every config key with its default and comment."""
    return "\n".join([(doc or "").strip(), "",
                      "Config keys and their defaults (set them in a --config file.yaml or as --section.key=value;",
                      "the command line wins over the file, the file over the defaults):"] + config_help(defaults))


def run_script(main, defaults, doc, argv=None, aliases=None, extra_errors=()):
    """The `if __name__ == "__main__":` of every script: --help/-h, config, main(cfg); user errors as one line.

    aliases maps a bare flag to an override, e.g. {"--compare": "--compare.enabled=true"}; extra_errors are the
    script's own exception types whose message tells the user what to do.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(help_text(defaults, doc))
        sys.exit(0)
    argv = [(aliases or {}).get(a, a) for a in argv]
    try:
        cfg = parse(defaults, argv)
    except ConfigError as err:
        sys.exit(f"config error: {err}")
    try:
        return main(cfg)
    except USER_ERRORS + tuple(extra_errors) as err:  # what the user must fix: one clear line, no traceback
        sys.exit(f"error: {err}")
    except Exception as err:
        full = disk_full_error(err)
        if full is None:
            raise
        sys.exit(f"error: disk full ({full.strerror or full}); nothing written before was lost: free space or point "
                 f"run.out_dir to a larger disk, then run the same command again")
