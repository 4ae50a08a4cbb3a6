"""``qcorda train``: fine-tune the adapter of a prepared model with TRL's SFTTrainer.

Layout of ``output_dir``::

    prepared/            the prepared model when the recipe has ``init:`` (else the recipe's ``prepared:``)
    checkpoints/         Trainer checkpoints (adapter, optimizer, scheduler, RNG) for resuming
    adapter/             the trained PEFT adapter + qcorda_train.json (which prepared directory it belongs to)
    log.jsonl            the Trainer's log history (loss, learning rate, eval loss per logging step)

Only the LoRA matrices train; the NF4 residual and every other parameter stay frozen.
The adapter keeps the dtype ``prepare`` gave it (fp32): TRL casts the adapter of a
quantized model to bf16, which would move the init away from W − deq(Q(W_res)), so
:func:`build_trainer` puts the prepared values back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError
from .data import load_examples
from .guard import DivergenceGuard
from .io import atomic_dir
from .lr import lr_factor, lr_warning
from .prepare import prepare
from .prepared import MANIFEST, OWNER_KEY, TRAIN_FORMAT, TRAIN_MARKER, config_json, load_prepared, manifest_sha256, read_manifest
from .quantize import set_quant_storage
from .recipe import Recipe, recipe_dict



@dataclass(frozen=True)
class TrainResult:
    """What a run did (printed as the summary table, saved in qcorda_train.json)."""

    adapter: Path
    prepared: Path
    global_step: int
    resumed_from: str | None
    first_loss: float | None
    last_loss: float | None
    eval_loss: float | None
    trainable_params: int
    seconds: float
    learning_rate: float = 0.0
    """The learning rate trained at (``learning_rate: auto`` resolved)."""
    adapter_sha256: str = ""
    """sha256 of the trained adapter's parameters (name order); every data-parallel rank prints the same."""
    lr_probe: dict | None = None
    """With ``learning_rate: probe``: what the probe measured (:class:`qcorda.probe.ProbeResult` as a dict)."""


def prepared_model(recipe: Recipe, progress: bool = True):
    """``(peft_model, tokenizer, prepared_dir)``: load ``recipe.prepared``, or prepare from
    ``recipe.init`` once into ``output_dir/prepared`` (by the streamed engine when it stores the
    method: the original model is never whole in memory) and load it from there, so that the first
    run and a resumed one train the very same model."""
    import torch
    from accelerate import PartialState
    from transformers import AutoTokenizer

    # First: under accelerate launch the state gives this rank its own device (cuda:LOCAL_RANK); a bare
    # "cuda" would put every rank's model on GPU 0.
    state = PartialState(cpu=not torch.cuda.is_available())
    device = str(state.device)
    if recipe.prepared is not None:
        prepared = Path(recipe.prepared)
        read_manifest(prepared, flag="prepared:")
        return load_prepared(prepared, device=device), AutoTokenizer.from_pretrained(str(prepared)), prepared
    prepared = Path(recipe.output_dir) / "prepared"
    with state.main_process_first():  # under accelerate launch, rank 0 prepares, the others load it
        return _prepare_or_load(recipe, prepared, progress, device)


def _prepare_or_load(recipe: Recipe, prepared: Path, progress: bool, device: str | None = None):
    from transformers import AutoTokenizer

    if (prepared / MANIFEST).exists():
        saved = read_manifest(prepared)["config"]
        wanted = json.loads(json.dumps(config_json(recipe.init), default=str))
        if saved != wanted:
            diff = sorted(k for k in wanted if saved.get(k) != wanted[k])
            raise ConfigError(
                f"{prepared} was prepared with other init settings ({', '.join(diff)}); "
                "choose another output_dir or delete it to prepare again"
            )
    else:
        prepare(recipe.model, recipe.init, out=prepared, progress=progress)
    return load_prepared(prepared, device=device), AutoTokenizer.from_pretrained(str(prepared)), prepared


def recipe_examples(recipe: Recipe, tokenizer) -> tuple[list, list]:
    """``(train, eval)`` :class:`qcorda.data.Example` lists of the recipe's ``data:`` (eval empty without ``eval_limit``)."""
    d = recipe.data
    examples = load_examples(d.source, d.fields, d.template, d.limit, tokenizer, d.split, flag="data.source", fields_flag="data.fields")
    evals = []
    if d.eval_limit:
        if d.eval_source:
            evals = load_examples(d.eval_source, d.fields, d.template, d.eval_limit, tokenizer, d.eval_split,
                                  flag="data.eval_source", fields_flag="data.fields")
        else:
            if d.eval_limit >= len(examples):
                raise ConfigError(f"data.eval_limit {d.eval_limit} leaves no training records out of {len(examples)}; lower it")
            examples, evals = examples[: -d.eval_limit], examples[-d.eval_limit :]
    return examples, evals


def datasets_of(recipe: Recipe, tokenizer):
    """``(train, eval or None)`` as ``datasets.Dataset`` in TRL's prompt/completion format
    (loss on the completion only); records without a completion become plain ``text``."""
    from datasets import Dataset

    examples, evals = recipe_examples(recipe, tokenizer)

    def to_ds(exs):
        if all(not e.completion for e in exs):
            return Dataset.from_dict({"text": [e.prompt for e in exs]})
        return Dataset.from_dict({"prompt": [e.prompt for e in exs], "completion": [e.completion for e in exs]})

    return to_ds(examples), (to_ds(evals) if evals else None)


def fsdp_enabled() -> bool:
    """True inside ``accelerate launch`` with an FSDP config (accelerate sets ACCELERATE_USE_FSDP)."""
    import os

    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


def quant_storage_dtype(recipe: Recipe, model):
    """The ``bnb_4bit_quant_storage`` dtype for this run (see ``train.quant_storage``)."""
    import torch

    q = recipe.train.quant_storage
    if q == "auto":
        if not fsdp_enabled():
            return torch.uint8
        qcfg = model.get_base_model().config.quantization_config
        compute = qcfg.get("bnb_4bit_compute_dtype") if isinstance(qcfg, dict) else qcfg.bnb_4bit_compute_dtype
        return getattr(torch, compute) if isinstance(compute, str) else compute
    return getattr(torch, q)


def apply_quant_storage(recipe: Recipe, model) -> None:
    """Store the NF4 bytes as ``train.quant_storage``; under FSDP also give the adapter that dtype,
    since FSDP flattens each wrapped unit into one tensor of one dtype (PEFT's FSDP-QLoRA does the
    same; the fp32 init is then rounded to the compute dtype)."""
    dtype = quant_storage_dtype(recipe, model)
    set_quant_storage(model, dtype)
    if fsdp_enabled() and dtype.is_floating_point:
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.data = p.data.to(dtype)


def use_bf16(recipe: Recipe) -> bool:
    import torch

    if recipe.train.bf16 == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)  # V100/T4 emulate it
    return bool(recipe.train.bf16)


class TrainingDiverged(ConfigError):
    """The divergence guard stopped the run (the message says why and what to change)."""


def init_of(recipe: Recipe) -> tuple[str, str]:
    """``(method, cal_start)`` of the recipe's model: from ``init:`` or the ``prepared:`` qcorda.json."""
    if recipe.init is not None:
        return recipe.init.method, recipe.init.cal_start
    cfg = read_manifest(recipe.prepared, flag="prepared:")["config"]
    return cfg["method"], cfg.get("cal_start", "ipm")  # format 1 had no cal_start: it started from IPM


def learning_rate(recipe: Recipe) -> float:
    """``train.learning_rate``, with ``auto`` resolved to the method's recommended learning rate
    (:mod:`qcorda.lr`); an explicit rate far above it is warned about."""
    t = recipe.train
    method, cal_start = init_of(recipe)
    if t.learning_rate == "probe":
        raise ConfigError("train.learning_rate is probe: it is measured on the model (probe_learning_rate), "
                          "not read from the recipe", "learning_rate")
    if t.learning_rate == "auto":
        return lr_factor(method, cal_start).factor * t.base_learning_rate
    warning = lr_warning(method, float(t.learning_rate), t.base_learning_rate, cal_start)
    if warning:
        import warnings

        warnings.warn(warning, stacklevel=2)
    return float(t.learning_rate)


def probe_learning_rate(recipe: Recipe, model, tokenizer):
    """``learning_rate: probe``: measure ``train.lr_probe`` on ``model``'s adapter at its init over the
    recipe's training examples, within 5 % of the run's sequence passes, seeded by ``train.seed``
    (:func:`qcorda.probe.probe_lr`; the adapter is left as it was). Returns the :class:`~qcorda.probe.ProbeResult`."""
    from .probe import probe_budget, probe_lr

    t = recipe.train
    examples, _ = recipe_examples(recipe, tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return probe_lr(model, tokenizer, examples, probe_budget(t.max_steps, t.batch_size, t.grad_accum), t.lr_probe,
                    seed=t.seed, max_length=t.max_length, batch_size=t.batch_size, key="train.learning_rate")


def sft_config(recipe: Recipe, has_eval: bool, lr: float):
    import torch
    from trl import SFTConfig

    t = recipe.train
    return SFTConfig(
        output_dir=str(Path(recipe.output_dir) / "checkpoints"),
        max_steps=t.max_steps,
        learning_rate=lr,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=float(t.warmup_ratio),  # a float in [0, 1) is a ratio of max_steps
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        max_length=t.max_length,
        optim=t.optim,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        bf16=use_bf16(recipe),
        packing=t.packing,
        completion_only_loss=None,  # TRL: True for prompt/completion records
        eval_strategy="steps" if has_eval and t.eval_steps else "no",
        eval_steps=t.eval_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        logging_nan_inf_filter=False,  # a NaN loss must reach the divergence guard, not be averaged away
        seed=t.seed,
        data_seed=t.seed,
        report_to="none",
        dataloader_num_workers=0,
        # without a GPU, processes started by `accelerate launch --multi_gpu` / torchrun run data-parallel
        # on the CPU (gloo); a lone process is unaffected
        use_cpu=not torch.cuda.is_available(),
    )


def build_trainer(recipe: Recipe, peft_model, tokenizer, train_ds, eval_ds=None, lr: float | None = None, callbacks=()):
    """An ``SFTTrainer`` over ``peft_model`` whose trainable parameters are exactly the LoRA
    matrices, with the dtypes and values ``prepare`` gave them. ``lr``: the learning rate
    (default: :func:`learning_rate` of the recipe)."""
    from trl import SFTTrainer

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    for name, p in peft_model.named_parameters():
        if p.requires_grad and "lora_" not in name:
            p.requires_grad_(False)
    init = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    if not init:
        raise ConfigError("the prepared model has no trainable adapter (load it with is_trainable=True)")
    lr = learning_rate(recipe) if lr is None else lr
    trainer = SFTTrainer(model=peft_model, args=sft_config(recipe, eval_ds is not None, lr), train_dataset=train_ds,
                         eval_dataset=eval_ds, processing_class=tokenizer, callbacks=list(callbacks))
    if len(trainer.train_dataset) == 0:
        raise ConfigError(
            f"no training record has a completion token left within train.max_length={recipe.train.max_length}; "
            "raise train.max_length (the prompt template alone may fill it)"
        )
    # TRL casts a quantized model's adapter to bf16; put prepare's exact values back.
    for n, p in trainer.model.named_parameters():
        if n in init:
            p.data = init[n]
    return trainer


def quantization_config_of(model) -> dict | None:
    qcfg = getattr(model.get_base_model().config, "quantization_config", None)
    if qcfg is None:
        return None
    data = dict(qcfg) if isinstance(qcfg, dict) else qcfg.to_dict()
    return json.loads(json.dumps(data, default=lambda v: str(v).removeprefix("torch.")))


def resume_checkpoint(recipe: Recipe) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    r = recipe.train.resume
    ckpts = Path(recipe.output_dir) / "checkpoints"
    last = get_last_checkpoint(str(ckpts)) if ckpts.is_dir() else None
    if r is False:
        return None
    if r == "auto":
        return last
    if r is True:
        if last is None:
            raise ConfigError(f"train.resume=true but {ckpts} holds no checkpoint; use train.resume=auto or false")
        return last
    if not Path(r).is_dir():
        raise ConfigError(f"train.resume {r}: no such checkpoint directory")
    return str(r)


def logged_losses(log_history: list[dict], key: str = "loss") -> list[tuple[int, float]]:
    return [(h["step"], float(h[key])) for h in log_history if key in h]


def save_adapter(recipe: Recipe, model, prepared: Path, result: dict) -> Path:
    """Write ``output_dir/adapter`` (PEFT adapter + qcorda_train.json) atomically."""
    out = Path(recipe.output_dir) / "adapter"
    with atomic_dir(out, overwrite=True) as tmp:
        model.save_pretrained(str(tmp))
        meta = {
            "format": TRAIN_FORMAT,
            "prepared": str(prepared.resolve()),
            OWNER_KEY: manifest_sha256(prepared),
            "recipe": recipe_dict(recipe),
            **result,
        }
        (tmp / TRAIN_MARKER).write_text(json.dumps(meta, indent=2, default=str))
    return out


def read_train_manifest(adapter: str | Path) -> dict:
    """The qcorda_train.json of a trained adapter; checks that its prepared directory still matches."""
    path = Path(adapter) / TRAIN_MARKER
    if not path.exists():
        raise ConfigError(f"{adapter}: not a qcorda-trained adapter (no {TRAIN_MARKER})")
    meta = json.loads(path.read_text())
    prepared = Path(meta["prepared"])
    if (prepared / MANIFEST).exists() and manifest_sha256(prepared) != meta[OWNER_KEY]:
        raise ConfigError(f"{adapter} was trained on a different {prepared} (qcorda.json changed); re-train or point to the right prepared dir")
    return meta


def guard_callback(guard: DivergenceGuard):
    """A ``TrainerCallback`` that feeds each logged loss to ``guard`` and stops training when the
    guard says the run diverged. Before every logged step it copies the adapter to the CPU: the
    parameters that produce that step's loss (the Trainer logs it after the step's update). The
    copy of the last good logged step is ``snapshot``, taken after ``kept_step`` updates."""
    from transformers import TrainerCallback

    class GuardCallback(TrainerCallback):
        reason: str | None = None
        snapshot: dict | None = None
        kept_step: int | None = None
        _candidate: tuple | None = None

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            step = state.global_step + 1
            if model is not None and (step == 1 or step % args.logging_steps == 0):
                copy = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}
                self._candidate = (state.global_step, copy)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs or self.reason is not None:
                return
            self.reason = guard.update(state.global_step, float(logs["loss"]))
            if self.reason is not None:
                control.should_training_stop = True
            elif guard.last_good == state.global_step and self._candidate is not None:
                self.kept_step, self.snapshot = self._candidate

    return GuardCallback()


def _stop_diverged(recipe: Recipe, trainer, callback, prepared: Path, lr: float) -> None:
    """After a guard stop: put the last good adapter back, save it, remove the checkpoints written
    after it (resuming from them would continue the divergence), and raise :class:`TrainingDiverged`."""
    import shutil

    method, cal_start = init_of(recipe)
    advice = lr_factor(method, cal_start)
    rec = advice.factor * recipe.train.base_learning_rate
    kept = "nothing (it diverged at its first logged step)"
    if callback.snapshot is not None and trainer.is_world_process_zero():
        params = dict(trainer.model.named_parameters())
        for n, t in callback.snapshot.items():
            params[n].data.copy_(t.to(params[n].device))
        step = callback.kept_step
        diverged = {"reason": callback.reason, "kept_step": step, "learning_rate": lr, "recommended_lr": rec}
        adapter = save_adapter(recipe, trainer.model, prepared, {"global_step": step, "diverged": diverged})
        kept = f"the adapter after {step} steps, the last good one, in {adapter}"
        ckpts = Path(recipe.output_dir) / "checkpoints"
        for c in ckpts.glob("checkpoint-*") if ckpts.is_dir() else ():
            if c.name.split("-")[-1].isdigit() and int(c.name.split("-")[-1]) > step:
                shutil.rmtree(c)
    raise TrainingDiverged(
        f"training diverged: {callback.reason}. Method {method}"
        + (f" (cal_start {cal_start})" if method == "qcorda-cal" else "")
        + f", learning rate {lr:g}; recommended {rec:g} ({advice.factor:g} x train.base_learning_rate "
        f"{recipe.train.base_learning_rate:g}; {advice.source}). Kept {kept}. Lower train.learning_rate or set it to "
        "auto; train.stop_on_divergence=false trains on regardless"
    )


def train(recipe: Recipe, progress: bool = True) -> TrainResult:
    """Run the recipe end to end; returns the :class:`TrainResult`.

    Raises :class:`TrainingDiverged` when the divergence guard (``train.stop_on_divergence``) stops it."""
    import time

    t0 = time.perf_counter()
    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, tok, prepared = prepared_model(recipe, progress)
    apply_quant_storage(recipe, model)
    train_ds, eval_ds = datasets_of(recipe, tok)
    t = recipe.train
    probe = probe_learning_rate(recipe, model, tok) if t.learning_rate == "probe" else None
    lr = probe.learning_rate if probe is not None else learning_rate(recipe)
    guard = DivergenceGuard(margin=t.divergence_margin, patience=t.divergence_patience)
    callbacks = [guard_callback(guard)] if t.stop_on_divergence else []
    trainer = build_trainer(recipe, model, tok, train_ds, eval_ds, lr=lr, callbacks=callbacks)
    resume = resume_checkpoint(recipe)
    trainer.train(resume_from_checkpoint=resume)
    history = trainer.state.log_history
    if trainer.is_world_process_zero():
        with open(out / "log.jsonl", "w") as f:
            for h in history:
                f.write(json.dumps(h) + "\n")
    if callbacks and callbacks[0].reason is not None:
        _stop_diverged(recipe, trainer, callbacks[0], prepared, lr)
    eval_loss = None
    if eval_ds is not None:
        eval_loss = float(trainer.evaluate()["eval_loss"])
    losses = logged_losses(history)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    summary = {
        "global_step": trainer.state.global_step,
        "resumed_from": resume,
        "first_loss": losses[0][1] if losses else None,
        "last_loss": losses[-1][1] if losses else None,
        "eval_loss": eval_loss,
        "trainable_params": trainable,
        "learning_rate": lr,
        "lr_probe": None if probe is None else dataclasses.asdict(probe),
    }
    meta = {"quantization_config": quantization_config_of(trainer.model), "world_size": trainer.args.world_size}
    adapter = save_adapter(recipe, trainer.model, prepared, {**summary, **meta}) if trainer.is_world_process_zero() else out / "adapter"
    return TrainResult(adapter=adapter, prepared=prepared, seconds=time.perf_counter() - t0,
                       adapter_sha256=adapter_fingerprint(trainer.model), **summary)


def adapter_fingerprint(model) -> str:
    """sha256 over the trainable parameters' bytes in name order (ranks of a data-parallel run agree)."""
    import torch

    h = hashlib.sha256()
    for n, p in sorted(model.named_parameters()):
        if p.requires_grad:
            h.update(n.encode())
            h.update(p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()

