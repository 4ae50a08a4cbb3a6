"""``qcorda plan``: estimate the peak memory of a training recipe before anything is downloaded.

Everything here is arithmetic on the recipe's ``arch:`` numbers (pure functions, no torch, no
model). The terms, in bytes, for a decoder of ``L`` blocks, hidden size ``h``, MLP width ``m``,
``n_q`` query heads and ``n_kv`` key/value heads of width ``d``, vocabulary ``V``, rank ``r``,
micro-batch ``B``, sequence length ``T`` and activation width ``a`` bytes (2 for bf16, 4 for fp32):

* **NF4 weights**: every block Linear of ``n`` weights (a target's residual, or W itself for a
  non-target: ``prepare`` stores the whole base in 4-bit, as QLoRA) stores ``ceil(n/2)`` bytes
  (two 4-bit codes per byte), exactly as ``bitsandbytes.functional.quantize_4bit`` packs it.
* **double-quant constants**: one absmax per 64-weight block, itself quantized to 8 bits
  (``ceil(n/64)`` bytes), plus one fp32 absmax per 256 such blocks, plus per tensor the fp32
  offset (4 B), the 16-entry NF4 code (64 B) and the 256-entry 8-bit code (1024 B).
* **unquantized parameters** in the compute dtype: input embedding ``V·h`` (counted once when
  tied), ``lm_head`` ``V·h`` when untied, norms (≤ 4 per block + q/k norms + the final one),
  and every block Linear named by ``init.keep_full_precision``.
* **adapter**: ``r·(in + out)`` per target, fp32 (qcorda keeps prepare's exact fp32 init);
  gradients the same; AdamW states 8 B/param (32-bit) or 2 B/param + one fp32 absmax per
  256-value block per state (8-bit; bitsandbytes keeps tensors under 4096 values in 32-bit).
* **activations under gradient checkpointing** (one checkpoint per decoder block):
  the ``L`` block inputs ``B·T·h·a``; one block's recompute working set during its backward
  (norm inputs/outputs, q/k/v/o, the gated MLP's four ``m``-wide tensors, the rank-``r`` LoRA
  intermediates, their gradients, attention scores ``B·n_q·T²`` when the attention kernel
  materializes them, and one dequantized weight); and the **LM head + loss**: TRL's SFTTrainer
  computes the loss with its fused, tiled log-prob kernel, so the ``B·T·V`` logits (which would be
  ``B·T·262144`` for Gemma) never exist at once: one ``4096 × 32768`` tile buffer and the fp32
  hidden-state gradient on a GPU, about 8 fp32 tiles on the CPU (:func:`lm_head_bytes`).
* **mixture of experts** (``arch.experts`` E > 0, each token routed to ``experts_per_token`` k experts of
  width ``m_e = expert_intermediate``): gate, up and down are per expert, so their NF4 weights, constants,
  adapters, gradients and optimizer states count E times (``prepare`` stores every expert in NF4 and gives
  each targeted expert its own adapter); the router ``E·h`` per block stays in the compute dtype; a token's
  MLP activations are those of its k active experts (``4·k·m_e`` instead of ``4·m``) plus E router logits.
  A shared expert of width ``m_s`` (Qwen2-MoE) is one more gated MLP per block that every token runs through
  (``4·m_s`` activations), with its 1×h gate in the compute dtype.
* **biases** (``arch.biases``: Qwen2's q/k/v, GPT-OSS's every projection): ``out`` values per Linear that has
  one, in the compute dtype.
* **CUDA context**: the driver/cuBLAS/kernels allowance (0 on the CPU).

The result is an estimate of ``torch.cuda.max_memory_allocated`` plus the context; see
``eval/plan_vs_measured.py`` for how it compares with measurement.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .config import ConfigError
from .recipe import BLOCK_PROJECTIONS as _PARENT
from .recipe import ArchConfig, Recipe

GB = 1024**3
PROJECTIONS = tuple(_PARENT)
#: NF4 per-tensor constants: fp32 offset (4 B) + 16-entry fp32 NF4 code + 256-entry fp32 8-bit code.
NF4_TENSOR_CONSTANTS = 4 + 16 * 4 + 256 * 4
BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256
OPT8_BLOCKSIZE = 256
OPT8_MIN_SIZE = 4096
CUDA_CONTEXT_GB = 0.75
#: TRL's chunked log-prob kernel tiles (trl/kernels/chunked_logprob.py: TOKEN_CHUNK_SIZE, chunk_size).
LM_HEAD_TOKEN_TILE = 4096
LM_HEAD_VOCAB_TILE = 32768
#: tile-sized fp32 temporaries of its torch fallback (CPU), counted from ``_backward_tile``.
CPU_TILE_TEMPORARIES = 8
#: GPU sizes the table reports on.
GPU_SIZES_GB = (24, 48)

Device = Literal["cuda", "cpu"]


def projection_shapes(arch: ArchConfig, width: int | None = None) -> dict[str, tuple[int, int]]:
    """``(out_features, in_features)`` of each projection of one block (of one expert, for gate/up/down of a
    mixture of experts; of an MLP ``width`` wide when given)."""
    h, m, d = arch.hidden, width or arch.expert_width, arch.dim_head
    q, kv = arch.heads * d, arch.kv_heads * d
    return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
            "gate_proj": (m, h), "up_proj": (m, h), "down_proj": (h, m)}


def block_linears(arch: ArchConfig) -> list[tuple[str, tuple[int, int], int]]:
    """Every block Linear of the model as ``(projection, (out_features, in_features), count)``: the attention's
    four once per block; gate/up/down once per block (dense), once per expert of every block (a mixture of
    experts), plus once per block at the shared expert's width (Qwen2-MoE)."""
    L, E = arch.layers, arch.experts
    out = [(name, shape, L * (E if E and _PARENT[name] == "mlp" else 1)) for name, shape in projection_shapes(arch).items()]
    if arch.shared_expert_intermediate:
        shared = projection_shapes(arch, arch.shared_expert_intermediate)
        out += [(name, shared[name], L) for name in PROJECTIONS if _PARENT[name] == "mlp"]
    return out


def target_projections(patterns: tuple[str, ...]) -> tuple[str, ...]:
    """Which of the seven projections ``patterns`` select (the same matching as ``prepare``)."""
    from .targets import _matches  # targets imports torch; the planner runs without it

    names = {p: f"model.layers.0.{_PARENT[p]}.{p}" for p in PROJECTIONS}
    out = [p for p in PROJECTIONS if any(pat == "all-linear" or _matches(names[p], pat) for pat in patterns)]
    if not out:
        raise ConfigError(f"init.target_modules {list(patterns)} selects none of {', '.join(PROJECTIONS)}; "
                          "qcorda plan models Llama-style blocks (use all-linear or projection names)")
    return tuple(out)


def nf4_bytes(numel: int) -> tuple[int, int]:
    """``(packed, constants)`` bytes that ``quantize_4bit(blocksize=64, compress_statistics=True)``
    stores for a tensor of ``numel`` weights."""
    blocks = math.ceil(numel / BLOCKSIZE)
    packed = math.ceil(numel / 2)
    constants = blocks + 4 * math.ceil(blocks / NESTED_BLOCKSIZE) + NF4_TENSOR_CONSTANTS
    return packed, constants


def adam_state_bytes(numel: int, optim: str) -> int:
    """Bytes of AdamW's two states for one tensor of ``numel`` fp32 parameters."""
    if optim.endswith("8bit") and numel >= OPT8_MIN_SIZE:
        return 2 * (numel + 4 * math.ceil(numel / OPT8_BLOCKSIZE))
    return 2 * 4 * numel


@dataclass(frozen=True)
class PlanInput:
    """What the estimate depends on (derived from a recipe by :func:`plan_input`)."""

    arch: ArchConfig
    rank: int
    targets: tuple[str, ...]
    """Projections with an adapter (the others are NF4 without one, unless kept)."""
    batch_size: int
    seq_len: int
    optim: str
    compute_bytes: int
    """Bytes per element of the compute dtype (unquantized weights, activations)."""
    device: Device = "cuda"
    gradient_checkpointing: bool = True
    attention_scores: bool = False
    """The attention kernel materializes ``B·n_q·T²`` scores (eager / CPU sdpa); flash and
    memory-efficient attention on a GPU do not."""
    kept: tuple[str, ...] = ()
    """Non-target projections kept in the compute dtype (``init.keep_full_precision``)."""


@dataclass(frozen=True)
class MemoryPlan:
    """Estimated peak memory terms in bytes (see the module docstring for each formula)."""

    nf4_weights: int
    quant_constants: int
    unquantized: int
    adapter: int
    adapter_grads: int
    optimizer: int
    checkpoints: int
    layer_working_set: int
    lm_head_loss: int
    cuda_context: int
    trainable_params: int
    quantized_params: int

    TERMS = ("nf4_weights", "quant_constants", "unquantized", "adapter", "adapter_grads", "optimizer",
             "checkpoints", "layer_working_set", "lm_head_loss", "cuda_context")

    @property
    def static(self) -> int:
        """Weights, adapter, gradients and optimizer states (present from the first step on)."""
        return self.nf4_weights + self.quant_constants + self.unquantized + self.adapter + self.adapter_grads + self.optimizer

    @property
    def activations(self) -> int:
        return self.checkpoints + self.layer_working_set + self.lm_head_loss

    @property
    def total(self) -> int:
        return self.static + self.activations + self.cuda_context

    def fits(self, gb: float) -> bool:
        return self.total <= gb * GB


def plan_memory(p: PlanInput) -> MemoryPlan:
    """The :class:`MemoryPlan` of one training micro-step at peak (pure arithmetic)."""
    a, L, h, V = p.compute_bytes, p.arch.layers, p.arch.hidden, p.arch.vocab
    E, k, shared = p.arch.experts, p.arch.experts_per_token, p.arch.shared_expert_intermediate
    nf4 = consts = qparams = 0
    unq_linear = trainable = opt = 0
    linears = block_linears(p.arch)
    for name, (o, i), n in linears:
        if name in p.arch.biases:
            unq_linear += n * o
        if name in p.targets:
            packed, c = nf4_bytes(o * i)
            nf4, consts, qparams = nf4 + n * packed, consts + n * c, qparams + n * o * i
            trainable += n * p.rank * (o + i)
            opt += n * (adam_state_bytes(p.rank * i, p.optim) + adam_state_bytes(p.rank * o, p.optim))
        elif name in p.kept:
            unq_linear += n * o * i
        else:  # the rest of the 4-bit base: NF4(W), no adapter
            packed, c = nf4_bytes(o * i)
            nf4, consts, qparams = nf4 + n * packed, consts + n * c, qparams + n * o * i
    unq_linear += L * E * h + (L * h if shared else 0)  # the routers and shared-expert gates: never quantized
    d = p.arch.dim_head
    norms = L * (4 * h + 2 * d) + h
    embeddings = V * h * (1 if p.arch.tied_embeddings else 2)
    unquantized = (embeddings + norms + unq_linear) * a

    BT = p.batch_size * p.seq_len
    q, kv, m = p.arch.heads * d, p.arch.kv_heads * d, p.arch.expert_width
    active = k if E else 1  # a token runs through its k experts' MLPs
    mlp_targets = sum(1 for t in p.targets if _PARENT[t] == "mlp")
    # one block's saved tensors per token: norm in/out (4h), q, k, v before and after RoPE,
    # attention output, o_proj output, the MLP's gate, up, act(gate), act(gate)*up, down output (per
    # active expert, + the router logits), the residual adds, and the rank-r LoRA intermediates of each target
    per_token = 8 * h + 3 * q + 4 * kv + active * 4 * m + E + p.rank * (len(p.targets) + (active - 1) * mlp_targets)
    if shared:  # every token also runs through the shared expert and its 1-wide gate
        per_token += 4 * shared + 1 + p.rank * mlp_targets
    scores = p.batch_size * p.arch.heads * p.seq_len**2 * 2 if p.attention_scores else 0  # scores + probs
    biggest = max(o * i for _, (o, i), _ in linears)
    # saved tensors + gradients of the same size flowing back through the block, + one dequantized weight
    working = (2 * BT * per_token + scores) * a + biggest * a
    checkpoints = L * BT * h * a if p.gradient_checkpointing else (L - 1) * BT * per_token * a + L * BT * h * a
    lm_head_loss = lm_head_bytes(BT, h, V, a, p.device)
    return MemoryPlan(
        nf4_weights=nf4,
        quant_constants=consts,
        unquantized=unquantized,
        adapter=trainable * 4,
        adapter_grads=trainable * 4,
        optimizer=opt,
        checkpoints=checkpoints,
        layer_working_set=working,
        lm_head_loss=lm_head_loss,
        cuda_context=int(CUDA_CONTEXT_GB * GB) if p.device == "cuda" else 0,
        trainable_params=trainable,
        quantized_params=qparams,
    )


def lm_head_bytes(tokens: int, hidden: int, vocab: int, a: int, device: Device) -> int:
    """Peak bytes of TRL's fused LM head + loss (``SFTTrainer`` calls the model with ``fused_lm_head=True``,
    ``trl/kernels/chunked_logprob.py``), which never materializes the ``(B, T, V)`` logits: it projects
    tiles of ``min(tokens, 4096)`` rows × ``min(V, 32768)`` vocabulary columns into one buffer in the
    compute dtype and folds them into per-token statistics, and its backward accumulates the hidden-state
    gradient in fp32 (``tokens × h``). On a GPU the fold is a Triton kernel working in place on the
    buffer. Without Triton (the CPU) the fold is torch ops on the tile: counted from ``_backward_tile``,
    about 8 tile-sized fp32 tensors are alive at once (the fp32 view, z, log p, p, grad, the target mask
    as float and two products)."""
    tile = min(tokens, LM_HEAD_TOKEN_TILE) * min(vocab, LM_HEAD_VOCAB_TILE)
    grad_hidden = tokens * hidden * 4
    if device == "cuda":
        return tile * a + grad_hidden
    return tile * a + tile * 4 * CPU_TILE_TEMPORARIES + grad_hidden


def compute_bytes(recipe: Recipe, device: Device) -> int:
    """Activation/unquantized width: the recipe's compute dtype; ``auto`` is bf16 on a GPU, fp32 on the CPU."""
    name = recipe.init.compute_dtype if recipe.init is not None else "auto"
    if name == "auto":
        name = "bfloat16" if device == "cuda" else "float32"
    return {"float32": 4, "bfloat16": 2, "float16": 2}[name]


def plan_input(recipe: Recipe, device: Device = "cuda", attention_scores: bool | None = None) -> PlanInput:
    """The :class:`PlanInput` of a recipe (its ``arch:``, ``init.rank``/``target_modules`` and ``train:``)."""
    if recipe.arch is None:
        raise ConfigError("qcorda plan needs the recipe's `arch:` section (layers, hidden, intermediate, heads, "
                          "kv_heads, vocab, tied_embeddings) to plan offline")
    if recipe.init is None:
        raise ConfigError("qcorda plan needs `init:` (rank and target_modules) in the recipe")
    t = recipe.train
    return PlanInput(
        arch=recipe.arch,
        rank=recipe.init.rank,
        targets=target_projections(recipe.init.target_modules),
        batch_size=t.batch_size,
        seq_len=t.max_length,
        optim=t.optim,
        compute_bytes=compute_bytes(recipe, device),
        device=device,
        gradient_checkpointing=t.gradient_checkpointing,
        attention_scores=(device == "cpu") if attention_scores is None else attention_scores,
        kept=_kept_projections(getattr(recipe.init, "keep_full_precision", ())),
    )


def _kept_projections(patterns: tuple[str, ...]) -> tuple[str, ...]:
    """Which of the seven projections ``init.keep_full_precision`` names (the target-pattern matching)."""
    from .targets import _matches

    names = {p: f"model.layers.0.{_PARENT[p]}.{p}" for p in PROJECTIONS}
    return tuple(p for p in PROJECTIONS if any(_matches(names[p], pat) for pat in patterns))


# --------------------------------------------------------------------------- config.json check

#: recipe key → config.json key
ARCH_KEYS = {
    "layers": "num_hidden_layers",
    "hidden": "hidden_size",
    "intermediate": "intermediate_size",
    "heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "vocab": "vocab_size",
    "tied_embeddings": "tie_word_embeddings",
}


def read_model_config(model: str | None) -> dict | None:
    """The text-model part of ``config.json`` of a local directory, the cached bundled alias, or a
    hub id already in the local HF cache; None when it cannot be read offline (nothing is downloaded)."""
    if not model:
        return None
    from .models import GEMMA3_270M, gemma3_270m_dir  # models imports torch; the planner runs without it

    path = gemma3_270m_dir() if model == GEMMA3_270M else Path(model)
    data = None
    if (path / "config.json").is_file():
        data = json.loads((path / "config.json").read_text())
    elif "/" in model and not Path(model).exists():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model, "config.json")
        except Exception:  # pragma: no cover - depends on the hub client
            cached = None
        if isinstance(cached, str):
            data = json.loads(Path(cached).read_text())
    if data is None:
        return None
    return data.get("text_config", data) if isinstance(data.get("text_config"), dict) else data


#: recipe key → config.json keys (the first present), mixtures of experts
MOE_KEYS = {
    "experts": ("num_local_experts", "num_experts"),
    "experts_per_token": ("num_experts_per_tok",),
    "expert_intermediate": ("moe_intermediate_size",),
    "shared_expert_intermediate": ("shared_expert_intermediate_size",),
}


def config_biases(config: dict) -> tuple[str, ...]:
    """The projections that carry a bias in the model ``config`` describes: ``attention_bias`` (q/k/v/o),
    ``mlp_bias`` (gate/up/down), and what the architecture hard-codes (Qwen2 and Qwen2-MoE: q/k/v; GPT-OSS:
    its experts' gate/up/down)."""
    attn, mlp = PROJECTIONS[:4], PROJECTIONS[4:]
    have = set(attn if config.get("attention_bias") else ()) | set(mlp if config.get("mlp_bias") else ())
    have |= set({"qwen2": attn[:3], "qwen2_moe": attn[:3], "gpt_oss": mlp}.get(config.get("model_type"), ()))
    return tuple(p for p in PROJECTIONS if p in have)


def check_arch(arch: ArchConfig, config: dict, source: str = "config.json") -> None:
    """Raise :class:`ConfigError` naming the recipe key whose value differs from ``config``."""
    tied_default = config.get("tie_word_embeddings", True)

    def mismatch(key: str, ours, ckey: str, theirs) -> ConfigError:
        return ConfigError(f"recipe key arch.{key} = {ours} but {source} has {ckey} = {theirs}; "
                           f"set arch.{key}: {json.dumps(theirs)} in the recipe")

    for key, ckeys in MOE_KEYS.items():
        ckey = next((c for c in ckeys if config.get(c)), None)
        theirs = config[ckey] if ckey else (None if key == "expert_intermediate" else 0)
        if getattr(arch, key) != theirs and (key != "expert_intermediate" or arch.experts):
            raise mismatch(key, getattr(arch, key), ckey or ckeys[0], theirs)
    if arch.experts and (config.get("mlp_only_layers") or (config.get("decoder_sparse_step") or 1) != 1):
        raise ConfigError(f"{source} mixes dense and mixture-of-experts blocks (mlp_only_layers = "
                          f"{config.get('mlp_only_layers')}, decoder_sparse_step = {config.get('decoder_sparse_step')}); "
                          "qcorda plan models every block as a mixture of experts, so it would overcount: not planned")
    if set(arch.biases) != set(config_biases(config)):
        raise ConfigError(f"recipe key arch.biases = {list(arch.biases)} but {source} gives biases to "
                          f"{list(config_biases(config))}; set arch.biases: {json.dumps(list(config_biases(config)))} in the recipe")
    for key, ckey in ARCH_KEYS.items():
        ours = getattr(arch, key)
        if key == "head_dim":
            theirs = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
            ours = arch.dim_head
        elif key == "kv_heads":
            theirs = config.get(ckey, config.get("num_attention_heads"))
        elif key == "tied_embeddings":
            theirs = bool(config.get(ckey, tied_default))
        else:
            if ckey not in config:
                continue
            theirs = config[ckey]
        if ours != theirs:
            raise mismatch(key, ours, ckey, theirs)


@dataclass(frozen=True)
class PlanResult:
    plan: MemoryPlan
    input: PlanInput
    checked_against: str | None
    """Where the arch numbers were verified (None: config.json not readable offline)."""


def plan_recipe(recipe: Recipe, device: Device = "cuda", check: bool = True) -> PlanResult:
    """Plan ``recipe``; when the model's config.json is readable offline, check ``arch:`` first."""
    inp = plan_input(recipe, device)
    checked = None
    if check:
        config = read_model_config(recipe.model)
        if config is not None:
            check_arch(recipe.arch, config, f"{recipe.model}/config.json")
            checked = f"{recipe.model}/config.json"
    return PlanResult(plan_memory(inp), inp, checked)


def plan_rows(plan: MemoryPlan) -> list[list]:
    return [[name.replace("_", " "), round(getattr(plan, name) / GB, 3)] for name in MemoryPlan.TERMS] + [
        ["total", round(plan.total / GB, 3)]
    ]


__all__ = ["MemoryPlan", "PlanInput", "PlanResult", "block_linears", "check_arch", "config_biases", "nf4_bytes", "plan_input", "plan_memory",
           "plan_recipe", "read_model_config", "target_projections"]
