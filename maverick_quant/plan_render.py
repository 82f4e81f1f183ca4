"""A plan (plan.Plan) as the short Markdown report `maverick-quant plan` prints."""

from __future__ import annotations

from maverick_quant.compute_rates import measured_busy
from maverick_quant.plan import Plan
from maverick_quant.plan_validation import render_validation


def _device_line(plan: Plan, gib) -> str:
    if plan.device == "cpu":
        return "- GPU memory: none (quantize on the CPU)"
    layer = plan.peak_device_layer
    return (f"- peak GPU memory {gib(plan.peak_device_bytes)} (layer {layer.index}: "
            + ", ".join(f"{k} {gib(v)}" for k, v in plan.device_terms(layer).items()) + ")")


def _needs_line(plan: Plan) -> str:
    """What the run needs, rounded up to whole GiB (the CUDA context's ~0.5 GiB included)."""
    host = -(-plan.peak_host_bytes // 2**30)
    if plan.device == "cpu":
        return f"- needs: a host with {host} GiB of free RAM"
    gpu = -(-(plan.peak_device_bytes + 2**29) // 2**30)
    return f"- needs: one GPU with {gpu} GiB of free memory and {host} GiB of free host RAM"


def _fit_here_line(plan: Plan, available: int | None = None) -> list[str]:
    """A warning line when this machine has less host memory available now than the plan's
    peak (`host_memory.available_bytes`, cgroup limits included; nothing where unknown)."""
    from maverick_quant.host_memory import available_bytes

    available = available_bytes() if available is None else available
    if available is None or available >= plan.peak_host_bytes:
        return []
    return [f"- warning: this machine has {available / 2**30:.1f} GiB of host memory available now, less than the "
            f"peak {plan.peak_host_bytes / 2**30:.1f} GiB: the run would not fit here"]


def _busy_line(rates: dict | None) -> list[str]:
    """A warning line when the compute rates were measured while other work shared the cores."""
    if rates is None or not measured_busy(rates):
        return []
    return [f"- warning: the compute rates were measured while other work shared the cores (load "
            f"{rates['load_per_core']:.1f} per core): the times are overstated; `plan --remeasure` when the machine "
            "is idle (a cache measured so is replaced by the first plan made on an idle machine)"]


def _time_line(plan: Plan) -> str:
    disk = plan.disk_seconds
    disk_text = "" if disk is None else (f"disk {sum(disk.values()):.0f} s: read {disk['read']:.0f}, write "
                                         f"{disk['write']:.0f}, sha256 {disk['hash']:.0f}")
    if plan.seconds is None:
        return "- estimated time: not estimated (see assumptions)" + (f"; {disk_text} of it" if disk else "")
    total = plan.total_seconds
    return f"- estimated time {total / 3600:.2f} h ({total:.0f} s: compute {plan.seconds:.0f} s" + \
        (f", {disk_text}" if disk else "") + ")"


def render(plan: Plan) -> str:
    """The plan as a short Markdown report."""
    gib = lambda n: f"{n / 2**30:.2f} GiB"  # noqa: E731
    peak = plan.peak_layer
    lines = [f"# Plan for {plan.model}", "",
             f"- quantize {plan.quantized_tensors} matrices ({plan.quantized_params / 1e9:.3f} B params); "
             f"pass through {plan.passthrough_tensors} tensors ({gib(plan.passthrough_bytes)})",
             f"- peak host memory {gib(plan.peak_host_bytes)} (baseline {gib(plan.baseline_bytes)}; layer {peak.index}: "
             + ", ".join(f"{k} {gib(v)}" for k, v in plan.host_terms(peak).items()) + f"; final tensors {gib(plan.final_bytes)})",
             _device_line(plan, gib),
             _needs_line(plan),
             *_fit_here_line(plan),
             f"- disk {gib(plan.disk_bytes)} (bundle + resumable hidden states + largest export)",
             _time_line(plan), *_busy_line(plan.rates), *(f"- {note}" for note in plan.notes), "",
             "| output | size |", "|---|---|"]
    lines += [f"| {fmt} | {gib(size)} |" for fmt, size in plan.outputs.items()]
    lines += ["", "Assumptions:"] + [f"- {a}" for a in plan.assumptions]
    if plan.validation is not None:
        lines += render_validation(plan.validation, plan.baseline_bytes)
    return "\n".join(lines)
