"""Streaming comparison metrics of a candidate model against a reference on the same tokens.

For each scored token t with target y_t, reference logits r_t [V] and candidate logits c_t [V]
(log-probabilities computed in fp32, log p = log_softmax(logits)):

    nll_ref(t)  = -log p_ref(y_t)
    nll_cand(t) = -log p_cand(y_t)
    kl(t)       = sum_v p_ref(v) * (log p_ref(v) - log p_cand(v))     KL(P_ref || P_cand), as llama.cpp's KLD
    agree(t)    = [argmax_v r_t(v) == argmax_v c_t(v)]                top-1 agreement

Over all N scored tokens: ppl = exp(mean_t nll(t)), ppl_ratio = ppl_cand / ppl_ref,
top1_agreement = mean_t agree(t), and mean / median / p90 / p99 / max of kl(t).
A token whose kl(t) is NaN (a NaN or +inf logit: a broken model) is counted in
`nonfinite_tokens`, and makes top1_agreement NaN like every other number: its argmax would
otherwise count as one disagreement, and a top-1 gate pass a candidate that emits NaN.
"""

from __future__ import annotations

import math

import torch

from maverick_quant.errors import InputError

DEFAULT_CHUNK_ELEMENTS = 1 << 22
"""Logit elements (rows x vocab) processed at once: bounds the fp32 temporaries to ~16 MiB each."""

KL_QUANTILES = (("median", 0.5), ("p90", 0.9), ("p99", 0.99))


def quantiles(values: torch.Tensor, qs: tuple[float, ...]) -> list[float]:
    """Quantiles of a 1-D tensor with linear interpolation between order statistics.

    With x_(0) <= ... <= x_(n-1) sorted and position h = q (n - 1):
        Q(q) = x_(floor h) + (h - floor h) * (x_(ceil h) - x_(floor h))
    (numpy's default "linear" method; unlike torch.quantile it has no input-size limit).
    Any NaN makes every quantile NaN, as in numpy: torch's sort puts NaN last, so the quantiles
    of the rest would pass a gate that a broken (NaN) candidate must fail.
    """
    if values.numel() == 0:
        raise ValueError("quantiles of an empty tensor")
    if values.isnan().any():
        return [math.nan] * len(qs)
    ordered = values.reshape(-1).double().sort().values
    out = []
    for q in qs:
        position = q * (ordered.numel() - 1)
        low, high = math.floor(position), math.ceil(position)
        lo_value, hi_value = ordered[low].item(), ordered[high].item()
        out.append(lo_value if high == low or lo_value == hi_value else  # inf - inf would be NaN
                   lo_value + (position - low) * (hi_value - lo_value))
    return out


def _exp(x: float) -> float:
    """exp(x), +inf instead of OverflowError (a broken candidate can have a huge mean NLL)."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def token_metrics(ref_logits: torch.Tensor, cand_logits: torch.Tensor, targets: torch.Tensor,
                  workspace: "Workspace | None" = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token (nll_ref, nll_cand, kl, agree) for logits [T, V] and targets [T], all in fp32.

    Returns four [T] tensors: fp32 NLLs and KL (clamped at 0 against rounding), bool agreement.
    Terms with p_ref(v) = 0 contribute 0 to the KL (the limit of p log p); a token whose log
    probabilities hold a NaN on either side (NaN or +Inf logits) gets KL NaN. The [T, V]
    intermediates (log p_ref, log p_cand, p_ref and a mask) are written into `workspace`
    (one is made when None): a caller scoring many chunks reuses one.
    """
    work = workspace if workspace is not None else Workspace()
    log_ref, log_cand, p_ref, unseen = work.buffers(ref_logits.shape, ref_logits.device)
    torch.log_softmax(ref_logits.float(), -1, out=log_ref)
    torch.log_softmax(cand_logits.float(), -1, out=log_cand)
    index = targets.to(device=log_ref.device, dtype=torch.long).unsqueeze(-1)
    nll_ref = -log_ref.gather(-1, index).squeeze(-1)
    nll_cand = -log_cand.gather(-1, index).squeeze(-1)
    agree = ref_logits.argmax(dim=-1) == cand_logits.argmax(dim=-1)
    # a NaN log-probability anywhere in a row (NaN or +Inf logits, on either side) makes its KL NaN:
    # masked as p_ref = 0 below, it counted 0, and a reference gone NaN passed every KL gate
    broken = torch.ne(log_ref, log_ref, out=unseen).any(dim=-1) | torch.ne(log_cand, log_cand, out=unseen).any(dim=-1)
    torch.exp(log_ref, out=p_ref)
    torch.gt(p_ref, 0, out=unseen).logical_not_()  # p_ref = 0: the term counts 0
    kl = log_ref.sub_(log_cand).mul_(p_ref).masked_fill_(unseen, 0.0).sum(dim=-1).clamp_min(0.0)
    return nll_ref, nll_cand, kl.masked_fill_(broken, math.nan), agree


class Workspace:
    """Three fp32 [T, V] buffers and a bool one for `token_metrics`, kept across calls: scoring
    chunk after chunk then allocates nothing large, so no freed [T, V] temporaries fragment
    the host heap (a fresh set per chunk grew the resident size by a chunk's worth at a time)."""

    def __init__(self) -> None:
        self._tensors: tuple[torch.Tensor, ...] = ()

    def buffers(self, shape: torch.Size, device: torch.device) -> tuple[torch.Tensor, ...]:
        """Views [T, V] of the buffers, made (or grown) for `shape` on `device`."""
        rows, vocab = shape
        first = self._tensors[0] if self._tensors else None
        if first is None or first.device != device or first.shape[1] != vocab or first.shape[0] < rows:
            self._tensors = ()  # free the old buffers before the new ones are made
            self._tensors = tuple(torch.empty(rows, vocab, dtype=dtype, device=device)
                                  for dtype in (torch.float32, torch.float32, torch.float32, torch.bool))
        return tuple(tensor[:rows] for tensor in self._tensors)


class MetricAccumulator:
    """Running sums of the per-token metrics over any number of `update` calls.

    Sums are kept in Python floats (fp64); per-token KL values are kept as fp32 on the CPU
    (4 bytes per token) for the quantiles and the histogram.
    """

    def __init__(self, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> None:
        if chunk_elements < 1:
            raise ValueError(f"chunk_elements={chunk_elements}: expected a positive integer")
        self.chunk_elements = chunk_elements
        self.tokens = 0
        self.nll_ref_sum = 0.0
        self.nll_cand_sum = 0.0
        self.kl_sum = 0.0
        self.agree_count = 0
        self.nonfinite_tokens = 0
        self._kl_chunks: list[torch.Tensor] = []
        self._workspace = Workspace()

    @torch.no_grad()
    def update(self, ref_logits: torch.Tensor, cand_logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Score T tokens: ref_logits and cand_logits [T, V] (any float dtype), targets [T] int.

        Rows are processed max(1, chunk_elements // V) at a time so fp32 temporaries stay bounded.
        """
        if ref_logits.dim() != 2 or ref_logits.shape != cand_logits.shape:
            raise ValueError(f"logits must both be [T, V]; got {tuple(ref_logits.shape)} and {tuple(cand_logits.shape)}")
        if targets.shape != ref_logits.shape[:1]:
            raise ValueError(f"targets must be [T={ref_logits.shape[0]}]; got {tuple(targets.shape)}")
        rows = max(1, self.chunk_elements // max(1, ref_logits.shape[1]))
        for start in range(0, ref_logits.shape[0], rows):
            span = slice(start, start + rows)
            self._add(*token_metrics(ref_logits[span], cand_logits[span], targets[span], self._workspace))

    def _add(self, nll_ref: torch.Tensor, nll_cand: torch.Tensor, kl: torch.Tensor, agree: torch.Tensor) -> None:
        """Fold one chunk's per-token values [t] into the running sums."""
        self.tokens += int(kl.numel())
        self.nll_ref_sum += nll_ref.double().sum().item()
        self.nll_cand_sum += nll_cand.double().sum().item()
        self.kl_sum += kl.double().sum().item()
        self.agree_count += int(agree.sum().item())
        self.nonfinite_tokens += int(kl.isnan().sum().item())
        self._kl_chunks.append(kl.detach().to(device="cpu", dtype=torch.float32))

    def kl_values(self) -> torch.Tensor:
        """Per-token KL(P_ref || P_cand), fp32 [N] in the order the tokens were given."""
        if not self._kl_chunks:
            return torch.zeros(0, dtype=torch.float32)
        return torch.cat(self._kl_chunks)

    def summary(self) -> dict:
        """The nested metric dict (see the module docstring for the formulas).

        {"reference": {"ppl", "nll"}, "candidate": {"ppl", "nll"}, "ppl_ratio",
         "kl": {"mean", "median", "p90", "p99", "max"}, "top1_agreement", "tokens", "nonfinite_tokens"}
        """
        if self.tokens == 0:
            raise InputError("no tokens were scored: the evaluation text gave no windows to compare")
        nll_ref, nll_cand = self.nll_ref_sum / self.tokens, self.nll_cand_sum / self.tokens
        values = self.kl_values()
        kl = {"mean": self.kl_sum / self.tokens}
        kl.update(zip((name for name, _ in KL_QUANTILES), quantiles(values, tuple(q for _, q in KL_QUANTILES))))
        kl["max"] = values.max().item()
        return {
            "reference": {"ppl": _exp(nll_ref), "nll": nll_ref},
            "candidate": {"ppl": _exp(nll_cand), "nll": nll_cand},
            "ppl_ratio": _exp(nll_cand - nll_ref),
            "kl": kl,
            "top1_agreement": math.nan if self.nonfinite_tokens else self.agree_count / self.tokens,
            "tokens": self.tokens,
            "nonfinite_tokens": self.nonfinite_tokens,
        }
