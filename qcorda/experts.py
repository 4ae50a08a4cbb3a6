"""Fused mixture-of-experts layers as per-expert ``nn.Linear`` layers: every expert an ordinary target.

transformers 5 holds the experts of Mixtral, Qwen2-MoE and Qwen3-MoE as two 3-D parameters per
layer, ``gate_up_proj`` ``(E, 2·I, H)`` and ``down_proj`` ``(E, H, I)``, fused when it loads the
checkpoint's per-expert 2-D tensors (``experts.{e}.gate_proj`` / ``up_proj`` / ``down_proj``,
Mixtral's ``experts.{e}.w1`` / ``w3`` / ``w2``) by a ``WeightConverter`` of its conversion mapping.
:func:`unfuse` undoes that fusion in a model: each fused experts module becomes an
:class:`UnfusedExperts`, a list of per-expert modules whose ``nn.Linear`` layers carry the
checkpoint's own names (``mlp.experts.{e}.w1``), so that

- the covariance hooks see exactly the tokens the model's own router sends to each expert
  (:func:`routed_rows` tells them which rows of the flattened tokens these are);
- the split, NF4 storage, ``Linear4bit`` and PEFT paths of every other layer apply unchanged;
- a prepared directory stores each expert under the checkpoint's per-expert name.

Per expert e, with x the rows routed to it and w_k their routing weights::

    y += w_k · down_e( act(gate_e(x)) ⊙ up_e(x) )      gate_e = gate_up_proj[e][:I], up_e = gate_up_proj[e][I:]

which is the fused forward, expert by expert (tested against it in fp32). GPT-OSS stores its experts
fused on disk (``gate_up_proj`` ``(E, H, 2I)`` with gate and up interleaved, ``down_proj`` ``(E, I, H)``,
biases, its own clamped activation): its experts become ``experts.{e}.gate_up_proj`` ``(2I, H)`` and
``experts.{e}.down_proj`` ``(H, I)`` layers with biases, read as slices of the tensors on disk
(:func:`slices`) and stacked back for ``merge`` (:func:`stack_stored`). Plain transformers
cannot load per-expert NF4 layers (its loader fuses them again into a 3-D parameter, which
bitsandbytes does not quantize; GPT-OSS's model has no per-expert layers to load them into): :func:`unfused_model_class` is the class
:func:`qcorda.prepared.load_prepared` loads them with. :func:`fused_layout` maps per-expert
modules back to the fused parameters (``to-lora``'s PEFT ``target_parameters``).
"""

from __future__ import annotations

import contextvars
import re
from dataclasses import dataclass

import torch

#: The rows of the flattened ``(batch·seq)`` tokens that the expert being called holds, while it runs.
_ROUTED: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("qcorda_routed_rows", default=None)


def routed_rows() -> torch.Tensor | None:
    """Inside an expert's forward: the indices ``(n_e,)`` of the flattened tokens routed to it (its
    input's rows, in order); None elsewhere. The covariance hooks drop padding with them."""
    return _ROUTED.get()


@dataclass(frozen=True)
class ExpertLayout:
    """How the checkpoint names one expert's matrices, from transformers' conversion mapping.

    ``gate_up``: the leaf names concatenated (dim 0 of each expert's slice) into ``gate_up_proj``,
    gate first (``("gate_proj", "up_proj")``, Mixtral ``("w1", "w3")``); ``down``: the leaf of ``down_proj``."""

    gate_up: tuple[str, ...]
    down: str
    stored: bool = False
    """The checkpoint stores the fused 3-D tensors themselves (GPT-OSS): ``gate_up`` is one leaf, a layer of
    the interleaved gate and up (``(2I, H)`` + bias) whose activation is the module's own ``_apply_gate``, and
    each expert's weights are slices of the tensors on disk (:func:`slices`)."""


#: ``.experts.*.w1.weight`` → ``w1``: a per-expert source pattern of a fusing WeightConverter.
_LEAF = re.compile(r"experts\.\*\.(\w+)\.weight$")


#: GPT-OSS's layout: one gate_up_proj (E, H, 2I) + bias, transposed, gate and up interleaved, its own activation.
STORED = ExpertLayout(("gate_up_proj",), "down_proj", stored=True)


def conversion_transforms(model: torch.nn.Module, add_legacy: bool = True) -> list | None:
    """transformers' conversion mapping of ``model``'s architecture (its ``WeightRenaming`` and ``WeightConverter``
    entries; none for a model without a config), or None where this transformers has no such mapping (it then
    reads checkpoints by name). The one import of it: :func:`layout_of`, :func:`qcorda.checkpoint.conversion_map`
    and :func:`qcorda.checkpoint.disk_names` read it."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
    except ImportError:
        return None
    return get_model_conversion_mapping(model, add_legacy=add_legacy) if hasattr(model, "config") else []


def layout_of(model: torch.nn.Module) -> ExpertLayout | None:
    """The :class:`ExpertLayout` of ``model``'s fused experts: the per-expert tensors its conversion mapping
    fuses on load (Mixtral, Qwen-MoE), :data:`STORED` for experts stored fused (GPT-OSS), or None (dense)."""
    if any(_stored(m) for m in model.modules()):
        return STORED
    transforms = conversion_transforms(model)
    if transforms is None:
        return None
    from transformers.core_model_loading import WeightConverter

    fused: dict[str, list[str]] = {}
    for t in transforms:
        if isinstance(t, WeightConverter) and len(t.target_patterns) == 1:
            leaves = [m.group(1) for p in t.source_patterns if (m := _LEAF.search(p))]
            if len(leaves) == len(t.source_patterns):
                fused[t.target_patterns[0].rsplit(".", 1)[-1]] = leaves
    gate_up, down = fused.get("gate_up_proj", []), fused.get("down_proj", [])
    if len(gate_up) != 2 or len(down) != 1:
        return None
    return ExpertLayout((gate_up[0], gate_up[1]), down[0])


def _params3(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    gu, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if isinstance(gu, torch.nn.Parameter) and isinstance(down, torch.nn.Parameter) and gu.dim() == 3 and down.dim() == 3:
        return gu, down
    return None


def _stored(module: torch.nn.Module) -> bool:
    """GPT-OSS's experts: ``gate_up_proj`` ``(E, H, 2I)`` + bias ``(E, 2I)``, ``down_proj`` ``(E, I, H)`` + bias
    ``(E, H)`` (x·W, transposed), gate and up interleaved, activated by the module's ``_apply_gate``."""
    p = _params3(module)
    return (p is not None and getattr(module, "is_transposed", False) and hasattr(module, "_apply_gate")
            and isinstance(getattr(module, "gate_up_proj_bias", None), torch.nn.Parameter)
            and isinstance(getattr(module, "down_proj_bias", None), torch.nn.Parameter)
            and p[0].shape[0] == p[1].shape[0] and p[0].shape[2] == 2 * p[1].shape[1] and p[0].shape[1] == p[1].shape[2])


def is_fused(module: torch.nn.Module) -> bool:
    """``module`` is a fused experts module :func:`unfuse` reproduces: 3-D ``gate_up_proj`` ``(E, 2I, H)``
    and ``down_proj`` ``(E, H, I)``, no biases, not transposed, ``act(gate) ⊙ up`` (Mixtral, Qwen-MoE); or
    GPT-OSS's (:data:`STORED`)."""
    if _stored(module):
        return True
    p = _params3(module)
    return (p is not None and not getattr(module, "is_transposed", False) and not getattr(module, "has_bias", False)
            and not hasattr(module, "gate_up_proj_bias") and hasattr(module, "act_fn")
            and p[0].shape[0] == p[1].shape[0] and p[0].shape[1] == 2 * p[1].shape[2] and p[0].shape[2] == p[1].shape[1])


class Expert(torch.nn.Module):
    """One expert: ``nn.Linear`` layers named as the checkpoint names them (gate ``(I, H)``, up ``(I, H)``,
    down ``(H, I)``; GPT-OSS: gate_up ``(2I, H)`` and down ``(H, I)``, with biases)."""

    def __init__(self, layout: ExpertLayout, hidden: int, inter: int, device, dtype):
        super().__init__()
        self.names = layout
        width = inter * 2 // len(layout.gate_up)  # I each, or 2I for GPT-OSS's one gate_up layer
        for leaf in layout.gate_up:
            self.add_module(leaf, torch.nn.Linear(hidden, width, bias=layout.stored, device=device, dtype=dtype))
        self.add_module(layout.down, torch.nn.Linear(inter, hidden, bias=layout.stored, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, glu) -> torch.Tensor:
        """down(glu(gate(x), up(x))) of ``x`` ``(n, H)``: act(gate) ⊙ up, or GPT-OSS's gate of its one gate_up."""
        return getattr(self, self.names.down)(glu(*(getattr(self, leaf)(x) for leaf in self.names.gate_up)))


class UnfusedExperts(torch.nn.Module):
    """The experts of one layer as a list of :class:`Expert` (``experts.{e}.<leaf>``), computing what the
    fused module computed: ``forward(hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k))``."""

    def __init__(self, fused: torch.nn.Module, layout: ExpertLayout):
        w = fused.gate_up_proj
        E, hidden, inter = (w.shape[0], w.shape[1], w.shape[2] // 2) if layout.stored else (w.shape[0], w.shape[2], w.shape[1] // 2)
        super().__init__()
        for e in range(E):  # children "0", "1", ...: the checkpoint's ``experts.{e}.<leaf>``
            self.add_module(str(e), Expert(layout, hidden, inter, w.device, w.dtype))
        self.num_experts, self.layout = E, layout
        if layout.stored:  # GPT-OSS: its own activation, transformers' code, with its constants
            self.alpha, self.limit, self._apply_gate = fused.alpha, fused.limit, type(fused)._apply_gate
        else:
            self.act_fn = fused.act_fn
        if w.device.type != "meta":
            with torch.no_grad():
                for e, expert in enumerate(self.experts()):
                    if layout.stored:  # x·W + b: the Linear holds Wᵀ
                        expert.gate_up_proj.weight.copy_(fused.gate_up_proj[e].T)
                        expert.gate_up_proj.bias.copy_(fused.gate_up_proj_bias[e])
                        expert.down_proj.weight.copy_(fused.down_proj[e].T)
                        expert.down_proj.bias.copy_(fused.down_proj_bias[e])
                        continue
                    gate, up = fused.gate_up_proj[e].chunk(2, dim=0)
                    getattr(expert, layout.gate_up[0]).weight.copy_(gate)
                    getattr(expert, layout.gate_up[1]).weight.copy_(up)
                    getattr(expert, layout.down).weight.copy_(fused.down_proj[e])

    def glu(self, *parts: torch.Tensor) -> torch.Tensor:
        """act(gate) ⊙ up of (gate, up); GPT-OSS: its ``_apply_gate`` of the interleaved gate_up."""
        return self._apply_gate(self, parts[0]) if self.layout.stored else self.act_fn(parts[0]) * parts[1]

    def experts(self) -> list[Expert]:
        return [self._modules[str(e)] for e in range(self.num_experts)]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self.experts()):
            # the fused loop's order (slot, then token), so that index_add_ sums in the same order
            pos, rows = torch.where(top_k_index.T == e)
            # every expert runs, with zero rows when nothing is routed to it: its covariance then exists (and is zero)
            token = _ROUTED.set(rows)
            try:
                y = expert(hidden_states[rows], self.glu)
            finally:
                _ROUTED.reset(token)
            out.index_add_(0, rows, (y * top_k_weights[rows, pos, None]).to(out.dtype))
        return out


def unfuse(model: torch.nn.Module, layout: ExpertLayout | None = None) -> list[str]:
    """Replace every fused experts module of ``model`` (in place, weights copied; a ``meta`` model stays
    weightless) by its :class:`UnfusedExperts`. Returns the replaced module names; none without a layout."""
    layout = layout or layout_of(model)
    if layout is None:
        return []
    names = [n for n, m in model.named_modules() if n and is_fused(m)]
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, UnfusedExperts(getattr(owner, child), layout))
    return names


def slices(model: torch.nn.Module) -> dict[str, tuple[str, int, bool]]:
    """Per-expert keys of an unfused ``model`` whose checkpoint stores the fused tensors (:data:`STORED`):
    key → (fused key, expert e, transposed): ``experts.{e}.gate_up_proj.weight`` = ``experts.gate_up_proj[e]ᵀ``,
    ``experts.{e}.gate_up_proj.bias`` = ``experts.gate_up_proj_bias[e]`` (and down_proj alike)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, UnfusedExperts) and m.layout.stored:
            for e in range(m.num_experts):
                for leaf in (*m.layout.gate_up, m.layout.down):
                    out[f"{name}.{e}.{leaf}.weight"] = (f"{name}.{leaf}", e, True)
                    out[f"{name}.{e}.{leaf}.bias"] = (f"{name}.{leaf}_bias", e, False)
    return out


def stack_stored(model: torch.nn.Module, specs: dict, produce):
    """``(specs, produce)`` of a checkpoint of the unfused ``model`` with each expert tensor stored fused on disk
    (:func:`slices`, GPT-OSS) stacked back: ``experts.gate_up_proj`` ``(E, H, 2I)`` = [W_eᵀ for each e] in the
    place of its first expert's key, the biases ``(E, 2I)`` alike; other keys as they are."""
    sl = slices(model)
    members: dict[str, list[str]] = {}
    for key, (whole, _, _) in sl.items():
        if key in specs:
            members.setdefault(whole, []).append(key)
    out = {}
    for key, spec in specs.items():
        whole = sl[key][0] if key in sl else None
        if whole is None:
            out[key] = spec
        elif key == members[whole][0]:
            shape = tuple(reversed(spec.shape)) if sl[key][2] else tuple(spec.shape)
            out[whole] = torch.empty((len(members[whole]), *shape), dtype=spec.dtype, device="meta")

    def stacked(key: str):
        if key not in members:
            return produce(key)
        return torch.stack([produce(m).T if sl[m][2] else produce(m) for m in members[key]]).contiguous()

    return out, stacked


def is_expert(name: str) -> bool:
    """``name`` is a per-expert layer (``...experts.3.w1``)."""
    return re.search(r"(^|\.)experts\.\d+\.\w+$", name) is not None


def layer_type(name: str) -> str:
    """What reports roll a layer up under: its leaf (``q_proj``), every expert of every block as ``experts.<leaf>``."""
    return ("experts." if is_expert(name) else "") + name.rsplit(".", 1)[-1]


def fused_layout(model: torch.nn.Module) -> dict[str, tuple[str, ...]]:
    """``{fused parameter name: per-expert module names}`` of an unfused ``model``, in the fused order:
    ``…experts.gate_up_proj`` ← (``experts.0.w1``, ``experts.0.w3``, ``experts.1.w1``, …) (gate then up per
    expert, E·2 names; GPT-OSS: E), ``…experts.down_proj`` ← (``experts.0.w2``, …) (E names)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, UnfusedExperts):
            out[f"{name}.gate_up_proj"] = tuple(f"{name}.{e}.{leaf}" for e in range(m.num_experts) for leaf in m.layout.gate_up)
            out[f"{name}.down_proj"] = tuple(f"{name}.{e}.{m.layout.down}" for e in range(m.num_experts))
    return out


def _custom(cls: type) -> type:
    """A subclass of ``cls`` that transformers treats as custom code (no conversion mapping of its own)."""
    return type(cls.__name__, (cls,), {"__module__": __name__, "__qualname__": cls.__qualname__})


def mark_unfused(model: torch.nn.Module) -> None:
    """Before PEFT wraps an unfused model: PEFT converts the adapters of MoE models by ``config.model_type``
    (per-expert targets, as transformers 4 named them, into ``target_parameters`` of the fused 3-D
    parameters), which an unfused model no longer has. Its config's ``model_type`` then reads
    ``<type>-unfused``: an instance attribute, so a saved config keeps its class's. Call it after every
    checkpoint-name mapping (transformers finds a model's conversion mapping by that name too)."""
    if any(isinstance(m, UnfusedExperts) for m in model.modules()):
        model.config.model_type = f"{type(model.config).model_type}-unfused"


def _register_outputs(model) -> None:
    """What ``post_init`` does for a model's class: transformers finds the outputs a model records (router
    logits, for the load-balancing loss) by the name of its class, which :func:`_custom` changed."""
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:
        return
    # keyed by the class's name in every release that has it: a plain dict in transformers 5.17 (its item
    # assignment would key by the module object, and no router logits were recorded: TRL then failed on an int
    # aux loss), a dict whose __setitem__ takes the model in 5.25
    dict.__setitem__(_CAN_RECORD_REGISTRY, str(model.__class__), model._can_record_outputs)


def unfused_model_class(cls: type, layout: ExpertLayout) -> type:
    """The model class ``cls`` whose instances are built unfused, for ``from_pretrained`` of a prepared
    directory: its per-expert tensors load into per-expert ``Linear4bit`` layers like every other
    4-bit layer. transformers fuses per-expert tensors by the conversion mapping of the model's
    classes; this class and its base model are custom code to it, so it maps no names (a prepared
    directory is written under the model's own names), and it is :func:`mark_unfused`."""

    def __init__(self, config, *args, **kwargs):
        cls.__init__(self, config, *args, **kwargs)
        for module in self.modules():  # the base model (``model``) is a PreTrainedModel with a mapping too
            if module is not self and hasattr(module, "is_custom_code") and module.__class__.__module__ != __name__:
                module.__class__ = _custom(module.__class__)
                _register_outputs(module)
        unfuse(self, layout)
        mark_unfused(self)

    return type(cls.__name__, (cls,), {"__module__": __name__, "__qualname__": cls.__qualname__, "__init__": __init__})


def loader_class(config, trust_remote_code: bool = False):
    """The class that loads a prepared directory of ``config`` with ``from_pretrained``: ``AutoModelForCausalLM`` itself, or, for a model whose experts
    transformers fuses, its :func:`unfused_model_class`."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    layout = layout_of(model)
    if layout is None or not any(is_fused(m) for m in model.modules()):
        return AutoModelForCausalLM
    return unfused_model_class(type(model), layout)


def pack_lora(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], groups: dict[str, tuple[str, ...]],
              shapes: dict[str, tuple[int, int]], rank: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-expert LoRA factors as PEFT's ``target_parameters`` LoRA of each fused parameter, at ``rank`` R.

    ``factors``: per-expert module name → (B ``(out_m, k)``, A ``(k, in)``), their scale folded in (the delta
    is B·A); ``groups``: :func:`fused_layout`'s fused parameter → its member modules, whose ``(out, in)`` are
    ``shapes`` (a member without factors has no delta). Expert e of ``gate_up_proj`` gets the block
    factors B_e = diag(B_gate, B_up) ``(2I, k_g + k_u)``, A_e = [A_gate; A_up], zero-padded to R. PEFT's
    ``ParamWrapper`` holds A ``(R·E, in)`` with A_e in rows e·R … (e+1)·R − 1 and B ``(out, R·E)`` with
    B_e[:, j] in column j·E + e, and computes ΔW[e] = s·B_e·A_e (``einsum("o r e, e r i -> e o i")``; s = 1
    with α = R). Returns fused parameter → (B, A), for the parameters with factors."""
    out = {}
    for param, members in groups.items():
        if not any(m in factors for m in members):
            continue
        per = len(members) // len({m.rsplit(".", 2)[-2] for m in members})  # matrices per expert: 2 (gate, up) or 1
        Bs, As = [], []
        for first in range(0, len(members), per):
            mine = members[first:first + per]
            B = torch.zeros(sum(shapes[m][0] for m in mine), rank)
            A = torch.zeros(rank, shapes[mine[0]][1])
            row = col = 0
            for m in mine:
                if m in factors:
                    Bm, Am = factors[m]
                    k = Am.shape[0]
                    if col + k > rank:
                        raise ValueError(f"{param}: {m} needs rank {col + k}, more than {rank}")
                    B[row:row + Bm.shape[0], col:col + k], A[col:col + k] = Bm, Am
                    col += k
                row += shapes[m][0]
            Bs.append(B)
            As.append(A)
        out[param] = (torch.stack(Bs, dim=2).reshape(Bs[0].shape[0], rank * len(Bs)), torch.cat(As, dim=0))
    return out


def lora_keys(peft_model) -> dict[str, str]:
    """fused parameter name → the key prefix of its LoRA in a PEFT adapter file (PEFT nests one
    ``ParamWrapper`` per targeted parameter of a module: ``experts.base_layer.`` for the first, ``experts.`` for the last)."""
    out = {}
    inner = peft_model.base_model.model
    for name, m in inner.named_modules():
        param = getattr(m, "parameter_name", None)
        if param is not None and hasattr(m, "lora_A"):
            owner = ".".join(p for p in name.split(".") if p != "base_layer")
            out[f"{owner}.{param}"] = name
    return out
