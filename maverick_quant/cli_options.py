"""Options shared by several `maverick-quant` commands, and the specs they parse into.

calibrate, quantize, plan and imatrix take the same window options, quantize and plan the same
grid, MoE and AWQ options: the decorators here keep one spelling, default and help text per
setting, and the *_spec functions turn the parsed values into the frozen specs of
maverick_quant.recipe (which `run`'s recipe files parse into too). The refusals name options a command was given
but would ignore (an option a method never reads, window options beside --calib).
"""

from __future__ import annotations

from pathlib import Path

import click

from maverick_quant.recipe import (GGUF_GRIDS, WINDOW_DRAWS, AWQSpec, CalibSpec, ExpertPolicy, Method, MoESpec,
                                   QuantizeSpec, QuantSpec, settings_unread_by)


def calib_options(func):
    """--samples/--seq-len/--seed/--chat-template/--windows/--bos, shared by calibrate, quantize, plan and imatrix."""
    func = click.option("--bos/--no-bos", default=True, show_default=True,
                        help="Where the tokenizer adds BOS to what it encodes (Llama 3 and 4), make it every window's "
                             "first token, as the model reads text in use; tokenizers that add none are unaffected.")(func)
    func = click.option("--windows", type=click.Choice(WINDOW_DRAWS), default="random", show_default=True,
                        help="random: starts anywhere, windows may overlap (GPTQ's convention); "
                             "disjoint: no two windows share a token.")(func)
    func = click.option("--chat-template", is_flag=True, help="JSONL 'messages' rendered with the model's chat template.")(func)
    func = click.option("--seed", default=0, show_default=True, help="Seed for window positions and self-generated text.")(func)
    func = click.option("--seq-len", default=512, show_default=True, help="Tokens per calibration window.")(func)
    func = click.option("--samples", default=128, show_default=True, help="Number of calibration windows.")(func)
    return func


def calib_spec(samples: int, seq_len: int, seed: int, chat_template: bool, windows: str, bos: bool) -> CalibSpec:
    return CalibSpec(samples=samples, seq_len=seq_len, seed=seed, chat_template=chat_template, windows=windows, bos=bos)


WINDOW_OPTIONS = ("data", "samples", "seq_len", "seed", "chat_template", "windows", "bos")  # what draws calibration windows
# What `plan` reads from its options for a model folder, and from the recipe for a recipe
PLAN_RUN_OPTIONS = ("method", "gguf_grid", "bits", "group_size", "sym", "signed_scale", "clip_search", "act_order", "damp",
                    "keep_float", "bits_overrides", "samples", "seq_len", "moe_policy", "moe_mix", "moe_min_tokens",
                    "moe_require_full_rank", "moe_fallback", "moe_quantize_router", "moe_chunk_mib", "awq_grid", "awq_duo",
                    "awq_clip", "awq_sample_tokens", "batch")


# the setting (recipe key, `settings_unread_by`) each quantize option sets, where a method may not read it
OPTION_SETTINGS = {"act_order": "act_order", "damp": "damp", "true_sequential": "true_sequential", "batch": "batch_windows",
                   "moe_policy": "moe.policy", "moe_mix": "moe.mix", "moe_min_tokens": "moe.min_tokens",
                   "moe_require_full_rank": "moe.require_full_rank", "moe_fallback": "moe.fallback",
                   "awq_grid": "awq.grid", "awq_duo": "awq.duo_scaling", "awq_clip": "awq.clip",
                   "awq_sample_tokens": "awq.sample_tokens"}


def refuse_unread_options(method: str, calibration: tuple[str, ...]) -> None:
    """UsageError naming the options given that `method` never reads (`settings_unread_by`):
    `calibration` (the options that draw windows) under rtn, the GPTQ solve's under awq, AWQ's
    under gptq..."""
    unread = settings_unread_by(Method(method))
    names = [name for name, key in OPTION_SETTINGS.items() if key in unread]
    if ignored := given_options(((*calibration,) if "calibration" in unread else ()) + tuple(names)):
        raise click.UsageError(f"{', '.join(ignored)} would be ignored: --method {method} does not read them "
                               "(drop them, or choose a method that does)")


def given_options(names: tuple[str, ...]) -> list[str]:
    """The options among `names` (parameter names) the user gave, on the command line or in the
    environment, as "--option-name"s (not those left at their defaults)."""
    context = click.get_current_context()
    flags = {param.name: "/".join(param.opts + param.secondary_opts) for param in context.command.params}
    return [flags.get(name, f"--{name.replace('_', '-')}") for name in names
            if context.get_parameter_source(name) in (click.core.ParameterSource.COMMANDLINE,
                                                       click.core.ParameterSource.ENVIRONMENT)]


def refuse_ignored_with_calib(calib: Path | None) -> None:
    """UsageError when `--calib DIR` comes with options that draw windows (--data, --samples...):
    the directory's windows are used as they were drawn, so those options would be ignored."""
    if calib is None:
        return
    if given := given_options(WINDOW_OPTIONS):
        raise click.UsageError(f"--calib {calib} holds windows drawn already, so {', '.join(given)} would be ignored: "
                               "drop them, or draw new windows (calibrate, or --data instead of --calib)")


def quant_options(func):
    """Options of the weight grid and solver."""
    func = click.option("--keep-float", multiple=True, metavar="REGEX",
                        help="Leave linears whose full module name matches REGEX (re.search) unquantized, in the "
                             "model's float dtype, e.g. 'self_attn' or 'layers\\.0\\.'; repeatable. Not routed "
                             "experts.")(func)
    func = click.option("--bits-override", "bits_overrides", multiple=True, metavar="REGEX=BITS",
                        help="Quantize linears whose full module name matches REGEX (re.search) with BITS bits "
                             "instead, e.g. 'self_attn=8'; repeatable, the first match wins. On a --gguf-grid "
                             "Q4_K/Q4_1 run they get the symmetric group-32 grid (8 bits: Q8_0). Not routed experts.")(func)
    func = click.option("--damp", default=0.01, show_default=True, help="GPTQ relative damping (raised automatically on failure).")(func)
    func = click.option("--act-order", is_flag=True, help="GPTQ act-order (static groups, trivial g_idx).")(func)
    func = click.option("--signed-scale", is_flag=True,
                        help="Symmetric grids: llama.cpp Q4_0's scale rule, scale = the group's largest-magnitude "
                             "weight / -2^(bits-1) (exact extreme, finer step, scales of either sign; "
                             "--gguf-grid Q4_0 sets it).")(func)
    func = click.option("--clip-search", is_flag=True,
                        help="Search each group's range (shrunk by up to 79%) for the least |w - q|^2.4 instead "
                             "of its min/max (GPTQ's mse search).")(func)
    func = click.option("--sym/--asym", default=True, show_default=True, help="Symmetric or asymmetric grid.")(func)
    func = click.option("--group-size", default=128, show_default=True, help="Columns per scale: -1, 32, 64, 128 or 256.")(func)
    func = click.option("--bits", default=4, show_default=True, help="Bits per weight, 2-8.")(func)
    func = click.option("--method", type=click.Choice([m.value for m in Method]), default="gptq", show_default=True,
                        help="gptq; awq (scale search, then round to nearest); awq+gptq (AWQ's scales, then GPTQ); "
                             "rtn (round to nearest, no calibration).")(func)
    func = click.option("--gguf-grid", type=click.Choice(sorted(GGUF_GRIDS)),
                        help="Solve on exactly the grid of this llama.cpp type (sets --bits, --group-size, --sym; Q4_0 also --signed-scale), "
                             "so `export --format gguf` is lossless.")(func)
    return func


def moe_options(func):
    """How routed experts are calibrated (see MoESpec); the decisions land in audit.json."""
    policies = [p.value for p in ExpertPolicy]
    func = click.option("--moe-chunk-mib", default=8192, show_default=True,
                        help="Memory budget of one chunk of experts (Maverick: about 2.6 GB per expert).")(func)
    func = click.option("--moe-quantize-router", is_flag=True, help="Quantize the router too (default: kept in float).")(func)
    func = click.option("--moe-fallback", type=click.Choice(["mixed", "rtn"]), default="mixed", show_default=True,
                        help="Policy of experts with fewer than --moe-min-tokens routed tokens.")(func)
    func = click.option("--moe-require-full-rank", is_flag=True,
                        help="Also fall back for experts with fewer routed tokens than a projection's input width "
                             "(a rank-deficient routed Hessian).")(func)
    func = click.option("--moe-min-tokens", default=128, show_default=True, help="Routed tokens below which an expert falls back.")(func)
    func = click.option("--moe-mix", default=0.1, show_default=True, help="Weight of the all-token Hessian in 'mixed'.")(func)
    func = click.option("--moe-policy", type=click.Choice(policies), default="routed", show_default=True,
                        help="routed: tokens routed to the expert; mixed: + all tokens at its score; rtn: no calibration.")(func)
    return func


def awq_options(func):
    """AWQ scale and clip search (see AWQSpec); used by --method awq and awq+gptq."""
    func = click.option("--awq-sample-tokens", default=AWQSpec.sample_tokens, show_default=True,
                        help="Calibration tokens (evenly sampled) in the scale and clip losses.")(func)
    func = click.option("--awq-clip/--no-awq-clip", default=None,
                        help="Also search a clipping range per (row, group) after scaling (default: on for awq, "
                             "off for awq+gptq, whose GPTQ solve then targets the unclipped scaled weights).")(func)
    func = click.option("--awq-duo/--no-awq-duo", default=AWQSpec.duo_scaling, show_default=True,
                        help="Duo scaling: s = mean|x|^a / mean|w|^(1-a).")(func)
    func = click.option("--awq-grid", default=AWQSpec.grid, show_default=True, help="Exponents tried: a = i / grid.")(func)
    return func


def awq_spec(awq_grid, awq_duo, awq_clip, awq_sample_tokens) -> AWQSpec:
    return AWQSpec(grid=awq_grid, duo_scaling=awq_duo, clip=awq_clip, sample_tokens=awq_sample_tokens)


def moe_spec(moe_policy, moe_mix, moe_min_tokens, moe_require_full_rank, moe_fallback, moe_quantize_router,
              moe_chunk_mib) -> MoESpec:
    return MoESpec(policy=ExpertPolicy(moe_policy), mix=moe_mix, min_tokens=moe_min_tokens,
                   require_full_rank=moe_require_full_rank,
                   fallback=ExpertPolicy(moe_fallback), quantize_router=moe_quantize_router, chunk_mib=moe_chunk_mib)


def quantize_spec(method, bits, group_size, sym, signed_scale, clip_search, act_order, damp, batch, true_sequential=True,
                   moe: MoESpec = MoESpec(), awq: AWQSpec = AWQSpec(), gguf_grid: str | None = None,
                   keep_float: tuple[str, ...] = (), bits_overrides: tuple[str, ...] = ()) -> QuantizeSpec:
    grid = {"bits": bits, "group_size": group_size, "sym": sym, "signed_scale": signed_scale, **GGUF_GRIDS.get(gguf_grid, {})}
    weights = QuantSpec(**grid, clip_search=clip_search, act_order=act_order, damp=damp)
    return QuantizeSpec(method=Method(method), weights=weights, batch_windows=batch, true_sequential=true_sequential,
                        moe=moe, awq=awq, keep_float=tuple(keep_float),
                        bits_overrides=tuple(bits_overrides))
