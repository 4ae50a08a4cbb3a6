"""Training recipes: a YAML file read into typed dataclasses, with dotted ``key=value`` overrides.

A recipe names where the prepared model comes from (``prepared:`` a directory written by
``qcorda prepare``, or ``init:`` the :class:`~qcorda.config.InitConfig` to prepare on the fly),
the data, the trainer settings, and (for the planner) the model's architecture numbers.
Every unknown key is an error, so a recipe cannot silently rot.

The recipes shipped with the package live in ``qcorda/recipes/`` (``<model>/<method>-<task>.yaml``,
plus accelerate configs under ``accelerate/``); wherever a recipe is accepted, a shipped recipe's
name (``llama3-8b/qcorda-ipm-metamath``) works as well as a path (:func:`resolve_recipe`).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from .config import CalibConfig, ConfigError, InitConfig, Template, one_of, positive
from .lr import QLORA_LR

Optim = Literal["paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit", "adamw_torch"]
QuantStorage = Literal["auto", "uint8", "bfloat16", "float16", "float32"]
#: The measurements ``learning_rate: probe`` can take (:mod:`qcorda.probe`).
LrProbe = Literal["update", "sharpness", "direction", "range"]
#: The measurement ``learning_rate: probe`` takes unless ``train.lr_probe`` says otherwise: ``sharpness``, the
#: one candidate whose lr lands within 2x of the grid-best lr for all eight inits of eval/results/finetune.md
#: with its constant anchored on qlora alone (0.55-1.50x; ``update`` 7/8, ``range`` 6/8, ``direction`` 5/8:
#: eval/results/lr_probe.md, section 1).
DEFAULT_LR_PROBE: LrProbe = "sharpness"


@dataclass(frozen=True)
class DataConfig:
    """Training (and evaluation) records and how they become prompt/completion pairs."""

    source: str = "gsm8k-train"
    """A local .jsonl/.json/.csv/.parquet/.txt file, a dataset name, or a bundled alias. Recipe: ``data.source``."""
    fields: tuple[str, ...] = ()
    """Record fields; the last is the completion (the only part with loss). Recipe: ``data.fields``."""
    template: Template = "alpaca"
    """Prompt template, the same :func:`qcorda.data.format_record` calibration uses. Recipe: ``data.template``."""
    split: str = "train"
    """Split of a dataset name. Recipe: ``data.split``."""
    limit: int | None = None
    """Use the first N records (None: all). Recipe: ``data.limit``."""
    eval_source: str | None = None
    """Evaluation records; None: hold out the last ``eval_limit`` training records. Recipe: ``data.eval_source``."""
    eval_split: str = "test"
    """Split of ``eval_source`` when it is a dataset name. Recipe: ``data.eval_split``."""
    eval_limit: int = 0
    """Number of evaluation records; 0 disables evaluation. Recipe: ``data.eval_limit``."""

    def __post_init__(self) -> None:
        one_of("template", self.template, Template)
        if self.limit is not None:
            positive("limit", self.limit)
        positive("eval_limit", self.eval_limit, 0)


@dataclass(frozen=True)
class TrainConfig:
    """Trainer settings (mapped onto TRL's ``SFTConfig``)."""

    max_steps: int = 1000
    """Optimizer steps. Recipe: ``train.max_steps``."""
    learning_rate: float | Literal["auto", "probe"] = "auto"
    """Peak learning rate; ``auto``: the method's factor (:data:`qcorda.lr.LR_FACTORS`) times
    ``base_learning_rate``; ``probe``: measured on this recipe's model, init and data before training
    (:mod:`qcorda.probe`, method ``lr_probe``, at most 5 % of the run's compute, seeded by ``seed``; the
    result is saved in ``qcorda_train.json``). An explicit value more than 3x the method's recommended
    one is warned about. Recipe: ``train.learning_rate``."""
    lr_probe: LrProbe = DEFAULT_LR_PROBE
    """What ``learning_rate: probe`` measures: ``sharpness`` (the default), the top eigenvalue of the
    Adam-preconditioned Hessian (lr = c/λ); ``update``, the size of Adam's first weight-space update
    (lr = τ/u); ``direction``, the curvature along Adam's first step (lr = the quadratic model's minimum / c);
    ``range``, an lr range test (lr = lr_min / c). Each constant is anchored on QLoRA's grid-best lr
    (:mod:`qcorda.probe`). Recipe: ``train.lr_probe``."""
    base_learning_rate: float = QLORA_LR
    """QLoRA's learning rate for this setup, which ``learning_rate: auto`` scales per method (2e-4:
    QLoRA's on GPUs). Set it to the rate QLoRA trains best at here: a short run wants more, and below it
    the 0.1x inits train far too slowly (eval/results/finetune.md). Recipe: ``train.base_learning_rate``."""
    lr_scheduler: str = "cosine"
    """transformers scheduler name (cosine, linear, constant, constant_with_warmup). Recipe: ``train.lr_scheduler``."""
    warmup_ratio: float = 0.03
    """Fraction of steps spent warming up. Recipe: ``train.warmup_ratio``."""
    batch_size: int = 4
    """Sequences per device per micro-step. Recipe: ``train.batch_size``."""
    grad_accum: int = 4
    """Micro-steps per optimizer step. Recipe: ``train.grad_accum``."""
    max_length: int = 512
    """Tokens per sequence (longer ones are truncated). Recipe: ``train.max_length``."""
    optim: Optim = "paged_adamw_8bit"
    """Optimizer; the paged ones fall back to non-paged on the CPU. Recipe: ``train.optim``."""
    weight_decay: float = 0.0
    """Decoupled weight decay. Recipe: ``train.weight_decay``."""
    max_grad_norm: float = 0.3
    """Gradient clipping (QLoRA's 0.3). Recipe: ``train.max_grad_norm``."""
    gradient_checkpointing: bool = True
    """Recompute activations in backward (trades ~30% time for memory). Recipe: ``train.gradient_checkpointing``."""
    bf16: bool | Literal["auto"] = "auto"
    """bf16 autocast; auto: on a CUDA GPU that supports it. Recipe: ``train.bf16``."""
    packing: bool = False
    """Pack several records into one sequence. Recipe: ``train.packing``."""
    eval_steps: int | None = None
    """Evaluate every N steps (needs ``data.eval_limit`` > 0). Recipe: ``train.eval_steps``."""
    save_steps: int = 200
    """Checkpoint (adapter + optimizer + scheduler + RNG) every N steps. Recipe: ``train.save_steps``."""
    save_total_limit: int | None = 2
    """Keep at most N checkpoints. Recipe: ``train.save_total_limit``."""
    logging_steps: int = 10
    """Log the training loss every N steps. Recipe: ``train.logging_steps``."""
    seed: int = 0
    """Seed of data order and dropout. Recipe: ``train.seed``."""
    stop_on_divergence: bool = True
    """Stop when the loss is NaN/Inf or its smoothed value stays ``divergence_margin`` above the first
    loss for ``divergence_patience`` logging steps; the adapter of the last good logging step is kept
    (:mod:`qcorda.guard`). Recipe: ``train.stop_on_divergence``."""
    divergence_margin: float = 0.25
    """Allowed rise of the smoothed training loss above the first one, as a fraction of it. Recipe:
    ``train.divergence_margin``."""
    divergence_patience: int = 3
    """Logging steps in a row above the margin before the run stops. Recipe: ``train.divergence_patience``."""
    quant_storage: QuantStorage = "auto"
    """Dtype the packed NF4 bytes are stored as (``bnb_4bit_quant_storage``; the bits are unchanged).
    auto: the compute dtype when accelerate runs FSDP (FSDP flattens each unit into one tensor of one
    dtype), else uint8. Recipe: ``train.quant_storage``."""
    resume: bool | str = "auto"
    """auto: continue from the newest checkpoint under ``output_dir/checkpoints`` if any;
    true: require one; false: start over; or a checkpoint path. Recipe: ``train.resume``."""

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "max_length", "save_steps", "logging_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ConfigError(f"must be a positive integer, got {v!r}", name)
        if self.learning_rate not in ("auto", "probe") and (isinstance(self.learning_rate, (str, bool)) or not self.learning_rate > 0):
            raise ConfigError(f"must be a positive number, auto or probe, got {self.learning_rate!r}", "learning_rate")
        one_of("lr_probe", self.lr_probe, LrProbe)
        if isinstance(self.base_learning_rate, (str, bool)) or not self.base_learning_rate > 0:
            raise ConfigError(f"must be a positive number, got {self.base_learning_rate!r}", "base_learning_rate")
        if not self.divergence_margin > 0:
            raise ConfigError(f"must be positive, got {self.divergence_margin}", "divergence_margin")
        if not isinstance(self.divergence_patience, int) or self.divergence_patience <= 0:
            raise ConfigError(f"must be a positive integer, got {self.divergence_patience!r}", "divergence_patience")
        one_of("optim", self.optim, Optim)
        one_of("quant_storage", self.quant_storage, QuantStorage)
        if self.bf16 not in (True, False, "auto"):
            raise ConfigError(f"must be true, false or auto; got {self.bf16!r}", "bf16")
        if self.eval_steps is not None and self.eval_steps <= 0:
            raise ConfigError(f"must be positive or null, got {self.eval_steps}", "eval_steps")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"must be in [0, 1), got {self.warmup_ratio}", "warmup_ratio")


#: The projections of a Llama-style decoder block → the submodule that holds them (what ``arch:`` and ``qcorda
#: plan`` model; ``arch.biases`` names them).
BLOCK_PROJECTIONS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
                     "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


@dataclass(frozen=True)
class ArchConfig:
    """The architecture numbers ``qcorda plan`` needs (checked against config.json when readable)."""

    layers: int
    """Decoder blocks (``num_hidden_layers``)."""
    hidden: int
    """Hidden size (``hidden_size``)."""
    intermediate: int
    """MLP width (``intermediate_size``); the MLP is gated (gate, up, down)."""
    heads: int
    """Attention heads (``num_attention_heads``)."""
    kv_heads: int
    """Key/value heads (``num_key_value_heads``)."""
    vocab: int
    """Vocabulary size (``vocab_size``)."""
    tied_embeddings: bool
    """lm_head shares the input embedding (``tie_word_embeddings``)."""
    head_dim: int | None = None
    """Per-head width (``head_dim``); default hidden / heads."""
    experts: int = 0
    """Mixture of experts: routed experts per block (``num_local_experts`` / ``num_experts``), each a gated
    MLP stored in NF4 like every block Linear; 0 (default): one dense MLP per block."""
    experts_per_token: int = 0
    """Mixture of experts: experts each token is routed to (``num_experts_per_tok``); their activations count."""
    expert_intermediate: int | None = None
    """Mixture of experts: one expert's MLP width (``moe_intermediate_size``); default ``intermediate``."""
    shared_expert_intermediate: int = 0
    """Mixture of experts: the MLP width of the shared expert that every token runs through beside its routed
    ones (Qwen2-MoE's ``shared_expert_intermediate_size``), a gated MLP stored in NF4 and targeted like the
    others, with a 1×hidden gate kept in the compute dtype; 0 (default): none."""
    biases: tuple[str, ...] = ()
    """The projections that carry a bias, kept in the compute dtype (one per expert for gate/up/down): Qwen2's
    ``[q_proj, k_proj, v_proj]``, GPT-OSS's all seven; empty (default): none, as Llama. Checked against
    config.json's ``model_type`` and ``attention_bias``."""

    def __post_init__(self) -> None:
        for name in ("layers", "hidden", "intermediate", "heads", "kv_heads", "vocab"):
            if getattr(self, name) <= 0:
                raise ConfigError("must be positive", name)
        if self.shared_expert_intermediate < 0 or (self.shared_expert_intermediate and not self.experts):
            raise ConfigError(f"must be 0, or positive with experts > 0, got {self.shared_expert_intermediate}",
                              "shared_expert_intermediate")
        unknown = [b for b in self.biases if b not in BLOCK_PROJECTIONS]
        if unknown:
            raise ConfigError(f"names no projection: {unknown}; choose from {list(BLOCK_PROJECTIONS)}", "biases")
        if self.experts < 0 or (self.experts > 0 and not 0 < self.experts_per_token <= self.experts):
            raise ConfigError(f"must be between 1 and experts ({self.experts}) for a mixture of experts, got "
                              f"{self.experts_per_token}", "experts_per_token")

    @property
    def expert_width(self) -> int:
        """The MLP width of one expert (of the one MLP, in a dense model)."""
        return self.expert_intermediate or self.intermediate

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.hidden // self.heads


@dataclass(frozen=True)
class Recipe:
    """One fine-tuning run."""

    output_dir: str
    """Where checkpoints, the trained adapter and the log go. Recipe: ``output_dir``."""
    model: str | None = None
    """Original model (HF directory, hub id, or ``gemma-3-270m``); needed with ``init``. Recipe: ``model``."""
    prepared: str | None = None
    """A directory written by ``qcorda prepare``. Recipe: ``prepared``."""
    init: InitConfig | None = None
    """Prepare on the fly with these settings (saved under ``output_dir/prepared``). Recipe: ``init``."""
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    arch: ArchConfig | None = None
    """Architecture numbers for ``qcorda plan`` (offline)."""
    gpu_memory_gb: float | None = None
    """GPU memory the recipe is sized for (24, 48, ...); ``qcorda plan`` says whether it fits. Recipe: ``gpu_memory_gb``."""

    def __post_init__(self) -> None:
        if (self.prepared is None) == (self.init is None):
            raise ConfigError("a recipe needs exactly one of `prepared:` (a qcorda prepare directory) or `init:` (prepare on the fly)")
        if self.init is not None and not self.model:
            raise ConfigError("a recipe with `init:` needs `model:` (HF directory, hub id, or gemma-3-270m)")
        if self.gpu_memory_gb is not None and not self.gpu_memory_gb > 0:
            raise ConfigError(f"must be positive or null, got {self.gpu_memory_gb}", "gpu_memory_gb")
        if self.train.eval_steps is not None and self.data.eval_limit == 0:
            raise ConfigError("train.eval_steps needs evaluation data; set data.eval_limit (and optionally data.eval_source)")

    @property
    def rank(self) -> int | None:
        return self.init.rank if self.init is not None else None


# --------------------------------------------------------------------------- YAML + overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.max_steps=50`` → (["train", "max_steps"], 50); the value is read as YAML."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not KEY=VALUE; write e.g. train.max_steps=50")
    return key.strip().split("."), yaml.safe_load(value) if value.strip() else None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            if node.get(k) is None:
                node[k] = {}
            if not isinstance(node[k], dict):
                raise ConfigError(f"override {text!r}: {k} is not a section")
            node = node[k]
        node[keys[-1]] = value
    return data


def _convert(tp, value, where: str):
    """Build dataclasses from dicts and tuples from lists, following the type hints; a float field
    given as text such as ``1e-4`` (which YAML 1.1 reads as a string) becomes that float."""
    origin = get_origin(tp)
    if isinstance(value, str) and (tp is float or float in get_args(tp)):
        try:
            return float(value)
        except ValueError:
            pass
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return None
        for a in args:
            if dataclasses.is_dataclass(a) or get_origin(a) is tuple:
                return _convert(a, value, where)
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"recipe key {where} must be a list, got {value!r}")
        return tuple(value)
    return value


def build(cls, data: dict | None, where: str = ""):
    """``cls(**data)`` with nested dataclasses; unknown keys raise :class:`ConfigError`."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"recipe section {where or cls.__name__} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"recipe key {where + '.' if where else ''}{unknown[0]} is unknown; known keys: {', '.join(sorted(names))}")
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"recipe section {where or 'top level'}: {e}") from e
    except ConfigError as e:  # a field at fault is shown as its recipe key: init.rank, train.max_steps
        if e.field is None:
            raise
        raise e.renamed(f"{where}.{e.field}" if where else e.field) from None


# --------------------------------------------------------------------------- shipped recipes

#: Where the shipped recipes live (package data).
RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
#: The folder of shipped accelerate configs: files for ``accelerate launch --config_file``, not recipes.
ACCELERATE_DIR = "accelerate"


def shipped(configs: bool = False) -> dict[str, Path]:
    """The shipped recipes by name (the path under ``qcorda/recipes/`` without ``.yaml``), sorted;
    with ``configs`` also the accelerate configs (``accelerate/fsdp_qlora``)."""
    out = {}
    for p in sorted(RECIPES_DIR.rglob("*.yaml")):
        name = p.relative_to(RECIPES_DIR).with_suffix("").as_posix()
        if configs or not name.startswith(ACCELERATE_DIR + "/"):
            out[name] = p
    return out


def shipped_recipe(name: str, configs: bool = False) -> Path:
    """The file of the shipped recipe ``name`` (``gemma3-270m-cpu``, ``llama3-8b/qcorda-ipm-metamath``;
    ``.yaml`` and a leading ``recipes/`` are allowed); with ``configs`` an accelerate config too. An
    unknown name is a :class:`ConfigError` that lists the closest shipped names."""
    import difflib

    known = shipped(configs)
    key = str(name).removeprefix("qcorda/").removeprefix("recipes/").removesuffix(".yaml")
    if key in known:
        return known[key]
    close = difflib.get_close_matches(key, list(known), n=3, cutoff=0.5)
    close = close or [n for n in known if key and key.split("/")[-1] in n][:3]
    hint = f"closest: {', '.join(close)}" if close else f"shipped: {', '.join(list(known)[:3])}, ..."
    raise ConfigError(f"RECIPE {name}: no such file, and no shipped recipe has that name ({hint}); "
                      "`qcorda recipes` lists them")


def resolve_recipe(name_or_path: str | Path, configs: bool = False) -> Path:
    """The file of a recipe given as a path or as a shipped recipe's name (:func:`shipped_recipe`);
    an existing file wins over a name. The one place a recipe argument is turned into a file."""
    path = Path(name_or_path)
    return path if path.is_file() else shipped_recipe(str(name_or_path), configs)


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read ``path`` (YAML; or a shipped recipe's name, :func:`resolve_recipe`), apply ``key=value``
    overrides, return the typed :class:`Recipe`."""
    import yaml

    path = resolve_recipe(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"RECIPE {path}: not valid YAML ({e})") from e
    data = apply_overrides(data, list(overrides))
    try:
        return build(Recipe, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e


def recipe_dict(recipe: Recipe) -> dict:
    """The recipe as plain JSON/YAML data (tuples as lists)."""

    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(recipe))


__all__ = ["ArchConfig", "BLOCK_PROJECTIONS", "CalibConfig", "DataConfig", "InitConfig", "Recipe", "TrainConfig", "load_recipe", "recipe_dict", "resolve_recipe", "shipped", "shipped_recipe"]
