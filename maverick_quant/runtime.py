"""`QuantLinear` and `QuantMoE`: transformers layers that run a bundle's 4-bit weights through
a kernel backend (compress/kernels/) instead of dequantizing them to float, and the loaders
that build them (kept out of compress/, which stays tensors in, tensors out).

- `quantized_layer(bundle, index, backend, dtype)`: decoder layer `index` with every quantized
  linear replaced by a `QuantLinear` and, in a Llama 4 MoE layer, the whole `feed_forward`
  replaced by a `QuantMoE` (float router, quantized shared expert, stacked routed experts).
- `KernelModel`: a `StreamingModel` whose layers are those (what `validate --kernels` runs).
- `load_quantized_model(bundle, backend, dtype)`: the whole transformers CausalLM with those
  layers (what `generate` runs, with transformers' KV cache and `generate`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from maverick_quant.compress.kernels.backends import Backend, get_backend
from maverick_quant.compress.kernels.layout import SYMMETRIC_ZERO, Int4Weight, check_kernel_grid
from maverick_quant.compress.types import QuantizedWeight
from maverick_quant.errors import InputError
from maverick_quant.recipe import offset_grid_name
from maverick_quant.streaming import SequenceLayout, StreamingModel


class QuantLinear(torch.nn.Module):
    """y = x W^T for a 4-bit W [N, K] on `backend`; x [..., K] -> y [..., N] in x's dtype."""

    def __init__(self, weight: Int4Weight, backend: Backend):
        super().__init__()
        self.in_features, self.out_features, self.group_size = weight.in_features, weight.out_features, weight.group_size
        self.backend = backend
        self.prepared = backend.prepare(weight)  # only the backend's form is kept (cpu-int4 repacks it)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.backend.linear(x.reshape(-1, self.in_features), self.prepared)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, group={self.group_size}, " \
               f"backend={self.backend.name}"


class QuantMoE(torch.nn.Module):
    """Llama 4's MoE block on 4-bit experts; the same signature as `Llama4TextMoe`.

    hidden [..., D] -> (out [T, D], router_logits [T, E]) with x = hidden flattened to [T, D]:
    logits = x W_r^T (float router), top-k per token, score = sigmoid(logit) in x's dtype,
    out = shared(x) + sum over the k slots of down_e(act(gate_e(x s)) * up_e(x s)).
    gate_up: stacked [E, 2I, D/2] (gate rows first), down: [E, D, I/2].
    """

    def __init__(self, router_weight: torch.Tensor, shared: torch.nn.Module, gate_up: Int4Weight, down: Int4Weight,
                 top_k: int, activation: str, backend: Backend):
        super().__init__()
        from maverick_quant.calibration.moe import activation as activation_fn

        self.router_weight, self.shared, self.top_k, self.backend = router_weight, shared, top_k, backend
        self.act = activation_fn(activation)
        self.gate_up, self.down = backend.prepare_experts(gate_up), backend.prepare_experts(down)

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = hidden.reshape(-1, hidden.shape[-1])
        logits = torch.nn.functional.linear(x, self.router_weight.to(x.dtype))
        top_value, choice = torch.topk(logits, self.top_k, dim=1)
        scores = torch.sigmoid(top_value.float()).to(x.dtype)
        out = self.shared(x)
        out = out + self.backend.experts(x, choice, scores, self.gate_up, self.down, self.act)
        return out, logits


def _set_submodule(root: torch.nn.Module, path: str, module: torch.nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)



def _runtime_linear(weight: QuantizedWeight, name: str, backend: Backend, dtype: torch.dtype,
                    bundle_bits: int, device: torch.device | str = "cpu") -> torch.nn.Module:
    """A QuantLinear on `backend` with its weight on `device`; a linear a bits override put on
    another width than the bundle's (e.g. 8-bit attention in a 4-bit bundle), which the 4-bit
    kernels do not run, as a plain Linear of its values. A bundle that is not 4-bit itself is
    refused by QuantLinear."""
    if weight.bits == bundle_bits:
        return QuantLinear(Int4Weight.from_quantized(weight, name).to(device), backend)
    linear = torch.nn.Linear(weight.shape[-1], weight.shape[-2], bias=False, device="meta")
    linear.weight = torch.nn.Parameter(weight.dequantize().to(device, dtype), requires_grad=False)
    return linear


def _routed_experts(bundle, index: int) -> dict[str, Int4Weight]:
    """Layer `index`'s routed experts as stacked runtime weights {"gate_up": [E, 2I, D/2], "down": [E, D, I/2]}."""
    prefix = f"{bundle.table.prefix(index)}experts."
    return {"gate_up": _stacked_expert_weight(bundle, index, ("gate_proj", "up_proj"), prefix),
            "down": _stacked_expert_weight(bundle, index, ("down_proj",), prefix)}


def _stacked_expert_weight(bundle, index: int, names: tuple[str, ...], prefix: str) -> Int4Weight:
    """The routed-expert linears `names` of layer `index`, concatenated along N, as one stacked
    Int4Weight [E, sum N, K/2]. The bundle stores 4-bit codes in the runtime layout, so each
    chunk's stored tensors are copied straight into the result, one chunk at a time: peak host
    memory 1.2x the result, where unpacking to a byte per code, stacking and packing again took
    5.6x (benchmarks/expert_load_memory.py). Zero points all 8 make the weight symmetric."""
    moe, grid = bundle.table.plan(bundle.text_config, index).moe, bundle.quant
    chunks = bundle.manifest["layers"][index]["experts"]["chunks"]
    widths = [chunks[0]["shapes"][name][1] for name in names]  # shapes [count, N, K]
    in_features = chunks[0]["shapes"][names[0]][2]
    for name in names:  # before anything is allocated or read
        check_kernel_grid(grid["bits"], grid["group_size"], in_features, prefix + name, offset_grid_name(grid))
    groups = in_features // grid["group_size"]
    packed = torch.empty(moe.num_experts, sum(widths), in_features // 2, dtype=torch.uint8)
    scales = torch.empty(moe.num_experts, sum(widths), groups, dtype=torch.float16)
    zeros = torch.empty(moe.num_experts, sum(widths), groups, dtype=torch.uint8)
    row = 0
    for name, width in zip(names, widths):
        filled = 0
        for first, shape, stored in bundle.stored_expert_linear(index, name):
            rows = slice(first, first + shape[0])
            packed[rows, row:row + width] = stored["codes"]
            scales[rows, row:row + width] = stored["scales"]
            zeros[rows, row:row + width] = stored["zeros"]
            filled += shape[0]
        if filled != moe.num_experts:
            raise ValueError(f"{prefix}{name}: the bundle holds {filled} of {moe.num_experts} routed experts")
        row += width
    symmetric = bool((zeros == SYMMETRIC_ZERO).all())
    return Int4Weight(packed, scales, None if symmetric else zeros, grid["group_size"])


def quantized_layer(bundle, index: int, backend: Backend, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> torch.nn.Module:
    """Decoder layer `index` of `bundle` on `device`, its quantized linears (and MoE block) on `backend`."""
    config = bundle.text_config
    plan = bundle.table.plan(config, index)
    module = bundle.table.build_layer(config, index)
    quantized, passthrough = bundle.quantized_layer(index)
    router = quantized.pop(plan.moe.router, None) if plan.moe is not None else None
    if router is not None:  # --moe-quantize-router: routing reads its weight, so it runs dequantized
        passthrough[f"{plan.moe.router}.weight"] = router.dequantize()
    loaded = module.load_state_dict({k: v.to(device, dtype) for k, v in passthrough.items()}, strict=False, assign=True)
    prefix = bundle.table.prefix(index)
    try:
        for name, weight in quantized.items():
            _set_submodule(module, name, _runtime_linear(weight, prefix + name, backend, dtype, bundle.quant["bits"],
                                                         device))
        experts = ({name: weight.to(device) for name, weight in _routed_experts(bundle, index).items()}
                   if plan.moe is not None else None)
    except ValueError as exc:
        raise InputError(f"{bundle.root}: {exc}") from None
    if plan.moe is not None:
        moe = plan.moe
        block = QuantMoE(module.get_submodule(moe.router).weight, module.get_submodule(moe.shared_module),
                         experts["gate_up"], experts["down"], moe.top_k, moe.activation, backend)
        _set_submodule(module, moe.block, block)
    replaced = tuple(f"{name}." for name in (*quantized, *((plan.moe.block,) if plan.moe is not None else ())))
    left = [name for name in loaded.missing_keys if not name.startswith(replaced)]
    if left:
        raise InputError(f"{bundle.root}: layer {index} has tensors neither quantized nor stored: {left}")
    module.attention_window = plan.attention_window
    return module.eval()


def backend_named(name: str, device: torch.device | str) -> Backend:
    """`get_backend(name, device)`, its refusal (an unknown name, a backend that cannot run on
    `device` or on this machine) as InputError naming it."""
    try:
        return get_backend(name, device)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def _require_bundle(source) -> None:
    from maverick_quant.bundle import Bundle

    if not isinstance(source, Bundle):
        where = getattr(source, "root", None) or getattr(getattr(source, "checkpoint", None), "model_dir", "the candidate")
        raise InputError(f"{where}: the kernels run a quantized bundle "
                         "(exports are validated through their readers, GGUF through llama.cpp)")


class KernelModel(StreamingModel):
    """A bundle streamed layer by layer with its 4-bit weights run by `backend` (never
    dequantized to float); MoE layers run whole (`runs_experts`)."""

    runs_experts = True

    def __init__(self, bundle, backend: Backend | str = "auto", dtype: torch.dtype = torch.float32, batch: int = 8,
                 layout: SequenceLayout | None = None, device: torch.device | str = "cpu"):
        _require_bundle(bundle)
        super().__init__(bundle, dtype=dtype, batch=batch, layout=layout, device=device)
        self.backend = backend_named(backend, self.device) if isinstance(backend, str) else backend

    def layer(self, index: int, tensors: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
        return quantized_layer(self.source, index, self.backend, self.dtype, self.device)


def _use_saved_stop_tokens(model, folder: Path) -> None:
    """The model's BOS / EOS / pad ids from `folder`'s generation_config.json where it has one
    (instruct models list their end-of-turn token there, not in config.json); its sampling
    settings are not taken: generation here is greedy."""
    from transformers import GenerationConfig

    if not (Path(folder) / "generation_config.json").is_file():
        return
    saved = GenerationConfig.from_pretrained(folder, local_files_only=True)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(saved, key, None) is not None:
            setattr(model.generation_config, key, getattr(saved, key))


def load_quantized_model(bundle, backend: Backend | str = "auto", dtype: torch.dtype = torch.bfloat16,
                         device: torch.device | str = "cpu"):
    """The whole transformers CausalLM of `bundle` with kernel-backed layers on `device`, ready
    for `generate` (built on the meta device; every tensor is then assigned from the bundle)."""
    from transformers import AutoModelForCausalLM

    _require_bundle(bundle)
    backend = backend_named(backend, device) if isinstance(backend, str) else backend
    config = bundle.text_config
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    table = bundle.table
    def tensor(name: str) -> torch.nn.Parameter:
        return torch.nn.Parameter(bundle.model_tensor(name).to(device, dtype), requires_grad=False)

    model.model.embed_tokens.weight, model.model.norm.weight = tensor(table.embed), tensor(table.final_norm)
    tied = table.lm_head not in bundle.model_tensor_names()  # one copy of a tied embedding, as transformers ties it
    model.lm_head.weight = model.model.embed_tokens.weight if tied else tensor(table.lm_head)
    _use_saved_stop_tokens(model, bundle.root)
    model.model.rotary_emb = table.build_rotary(config).to(device)
    for index in range(config.num_hidden_layers):
        model.model.layers[index] = quantized_layer(bundle, index, backend, dtype, device)
    left = [name for name, p in [*model.named_parameters(), *model.named_buffers()] if p.is_meta]
    if left:
        raise InputError(f"{bundle.root}: the model has tensors the bundle does not hold: {left[:5]}")
    return model.eval()
