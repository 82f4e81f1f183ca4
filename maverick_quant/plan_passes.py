"""The floating-point work of a layer's passes over the calibration windows, for plan.py.

A pass runs a decoder layer over all S windows of L tokens up to where a hook stops it
(`pass_flops`): 2 T W flops for the W weights of the linears before the stop (T = S L tokens),
plus the attention's own work once the pass is past it (`attention_flops`). GPTQ's passes
(`gptq_passes`): one per linear group solved, true-sequential, those after o_proj's replaying
the attention (attention_replay.py, `replay_starts`); or one for all groups but the values'
(groups.layer_hessians); then the output pass.
"""

from __future__ import annotations

import math

from maverick_quant.attention_replay import in_attention_core, last_core_group
from maverick_quant.recipe import CalibSpec


def attention_flops(config, plan, tokens: float, span: float) -> float:
    """The attention's own work (scores and the weighted values) in one pass of a layer over
    `tokens` tokens in windows of `span`: 2 * 2 * tokens * keys * H_q * head_dim, every query
    against every key of its window, keys = min(span, the layer's attention window). Masked
    keys are counted too: torch's CPU attention computes them (SmolLM2, 16 x 512 tokens: its
    240 SDPA calls took 8.0 s, 145 GFLOP/s so counted, beside a matmul rate of 165)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 4.0 * tokens * min(span, plan.attention_window or span) * heads * head_dim


def pass_flops(config, plan, calib: CalibSpec, stop: str | None = None) -> float:
    """One pass of a layer over the calibration windows that stops where the linear `stop` runs
    (None: the whole layer up to its MoE block): the linears before it and, once past it, the
    attention (LayerPlan.params_before / attends_before)."""
    attention = attention_flops(config, plan, calib.samples * calib.seq_len, calib.seq_len) if plan.attends_before(stop) else 0.0
    return 2.0 * calib.samples * calib.seq_len * plan.params_before(stop) + attention


def gptq_passes(plan, config, calib: CalibSpec, solved: set[str], true_sequential: bool = True,
                attention: str = "self_attn", attention_output: str = "self_attn.o_proj") -> tuple[float, float]:
    """(forward flops, Hessian flops) of GPTQ's dense groups in one layer: the pass of each group
    solved (a linear in `solved`) stops at its input (the values' runs the attention module,
    eager, to its output, the output projection included), then the output pass (to the MoE
    block in an MoE layer); each group solved accumulates 2 T K^2, the values' per KV head the
    attention-mixed form (capture.mixed_hessian_flops).

    True-sequential, once the `attention` module's linears but its `attention_output`
    projection are solved, the first pass keeps the projection's inputs and the later ones and
    the output pass replay them (attention_replay.py): they compute the projection and the
    linears after it only. Not true-sequential, the groups but the values' share one pass, to
    the last one's input (groups.layer_hessians)."""
    from maverick_quant.calibration.capture import mixed_hessian_flops

    tokens = calib.samples * calib.seq_len
    recording = replay_starts(plan, solved, attention, attention_output) if true_sequential else None
    core_params = sum(math.prod(plan.shapes[f"{name}.weight"]) for name in plan.linears  # skipped by a replay
                      if in_attention_core(name, attention, attention_output))
    forward, hessian, last_plain = 0.0, 0.0, None
    for index, group in enumerate(plan.groups):
        if not set(group.linears) & solved:  # every linear kept in float (or rounded): no pass, no Hessian
            continue
        width = plan.shapes[group.linears[0] + ".weight"][1]
        if group.mixed_by_attention:  # the attention module runs whole, its output projection (next group) included
            after = plan.groups[index + 2].linears[0] if index + 2 < len(plan.groups) else None
            forward += 2.0 * tokens * plan.params_before(after) + attention_flops(config, plan, tokens, calib.seq_len)
            kv = config.num_key_value_heads
            hessian += calib.samples * mixed_hessian_flops(kv, config.num_attention_heads // kv, calib.seq_len, width)
            continue
        hessian += 2.0 * tokens * width**2
        last_plain = group.linears[0]
        if not true_sequential:
            continue
        if recording is not None and index > recording:  # replayed: the output projection and what follows it
            forward += 2.0 * tokens * (plan.params_before(last_plain) - core_params)
        else:
            forward += pass_flops(config, plan, calib, last_plain)
    if not true_sequential and last_plain is not None:
        forward += pass_flops(config, plan, calib, last_plain)
    replayed = recording is not None
    output = 2.0 * tokens * (plan.params_before() - core_params) if replayed else pass_flops(config, plan, calib)
    return forward + output, hessian


def replay_starts(plan, solved: set[str], attention: str = "self_attn",
                  attention_output: str = "self_attn.o_proj") -> int | None:
    """The index in plan.groups of the group whose true-sequential pass keeps the attention's
    output projection inputs for the later passes (attention_replay.py): the first group
    solved (a linear in `solved`), not attention-mixed, after the last solved group of the
    `attention` module's linears but its `attention_output`; None where there is none."""
    live = [(index, group) for index, group in enumerate(plan.groups) if set(group.linears) & solved]
    core = last_core_group([group for _, group in live], attention, attention_output)
    return next((index for position, (index, group) in enumerate(live)
                 if position > core and not group.mixed_by_attention), None)
