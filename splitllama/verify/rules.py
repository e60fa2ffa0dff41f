"""What "equal" means: the per-tensor rules production vs oracle is judged by, and the
report they produce. No model code, no collectives (``runner.py`` runs the models).

* float64 / float32 on CPU: max |prod - ref| <= tol * max |ref| per tensor, tol below;
* bfloat16 on GPU: prod's error against the float32 oracle must be at most twice the error
  of the oracle run in bfloat16 (plus a small floor), the rule flash-attention's tests use;
  where a unit of the mlp adapter's ReLU sits within that rule's band of 0, both oracles
  take production's branch, and its gates must match everywhere else (``adapter_ties``);
* NaN or Inf never passes.

docs/verification.md explains the rules for users.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import torch

# Relative tolerances (of max |ref| per tensor) for CPU comparisons.
TOLERANCE = {
    # float64 throughout; summation order differs (TP splits, packed vs padded attention):
    # measured errors are ~1e-15..1e-13 relative. 1e-9 keeps four orders of margin while any
    # real defect (wrong layout, missing all-reduce, wrong positions) is O(1e-2..1).
    torch.float64: 1e-9,
    # float32 production vs float64 oracle: float32 rounding (eps 1.2e-7) through ~10
    # layers and reductions over <= 4k tokens; measured up to 8.2e-6 relative (gradients;
    # outputs 4.0e-6) over 8 checks (docs/verification.md lists them). 1e-4 is 12x that.
    torch.float32: 1e-4,
}
# bf16 error-ratio rule, in the form of flash-attention's tests:
#   prod_err <= RATIO * oracle_bf16_err + FLOOR_ROUNDINGS * u * max|ref|   (max-abs errors)
# with u = 2^-8, bf16's unit roundoff. The floor is flash-attention's: twice the error of
# rounding the reference to bf16, which they measure at |ref| + 0.3 for O(1) attention
# outputs; here it is taken at the tensor's own scale (gradients span 1e-3..1e2), as the
# rounding bound rather than a measurement, which on tensors of 3-6 values (outputs of a
# short micro-batch) could be ~0 by luck. It replaces a flat 1e-4 of max|ref| that had no
# source and sat ~40x below one rounding; with it, correct tiny models failed the rule
# 17 of 80 times on CPU (BENCHMARKS.md, "GPU parity").
BF16_RATIO = 2.0
BF16_FLOOR_ROUNDINGS = 2.0
BF16_UNIT_ROUNDOFF = torch.finfo(torch.bfloat16).eps / 2  # 2^-8: 8 significand bits


def bf16_allowed_error(oracle_bf16_error: float, scale: float) -> float:
    """The bf16 rule's largest allowed max-abs error, for a tensor of max|ref| ``scale``."""
    return BF16_RATIO * oracle_bf16_error + BF16_FLOOR_ROUNDINGS * BF16_UNIT_ROUNDOFF * scale


@dataclass
class Row:
    name: str
    max_abs: float  # max |prod - ref| over the compared values
    max_rel: float  # max_abs / max |ref| (the model's largest gradient where ref is all zero)
    rel_bound: float  # the largest max_rel allowed for this row: the row passes iff max_rel <= rel_bound
    passed: bool


@dataclass
class Report:
    layout: str
    head: str
    dtype: str
    rows: list[Row] = field(default_factory=list)
    # What else was checked (``check.run_check`` fills these in; the tests' reports leave
    # them None). The printed header and the JSON carry the same fields.
    checkpoint: str | None = None  # the directory, or BUILT_IN_MODEL
    adapter: str | None = None  # "linear" or "mlp"
    recompute: str | None = None  # the production model's activation recompute
    log_probs: str | None = None  # the LM head's log-prob path (a value head has none)
    attention: str | None = None  # the production model's attention backend
    seed: int | None = None  # of the batch (and of a built-in model's weights, a fresh value head)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rows)

    def failures(self) -> list[Row]:
        return [r for r in self.rows if not r.passed]

    def setup(self) -> dict[str, str | int]:
        """What was checked, in the header's order (fields left None are left out)."""
        return {name: getattr(self, name) for name in SETUP_FIELDS if getattr(self, name) is not None}

    def table(self) -> str:
        width = max([len(r.name) for r in self.rows] + [6])
        setup = self.setup()
        key_width = max(map(len, setup))
        lines = [f"{name:<{key_width}}  {value}" for name, value in setup.items()]
        lines += [
            "",
            "abs_err = max |production - oracle|; rel_err = abs_err / max |oracle|; a row passes "
            "when rel_err <= rel_bound",
            f"{'tensor':<{width}}  {'abs_err':>10}  {'rel_err':>10}  {'rel_bound':>10}  result",
        ]
        for r in self.rows:
            lines.append(
                f"{r.name:<{width}}  {r.max_abs:10.3e}  {r.max_rel:10.3e}  {r.rel_bound:10.3e}  "
                f"{'pass' if r.passed else 'FAIL'}"
            )
        lines.append(f"{len(self.rows) - len(self.failures())}/{len(self.rows)} passed: "
                     f"{'PASS' if self.passed else 'FAIL'}")
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps({**self.setup(), "rows": [asdict(r) for r in self.rows], "passed": self.passed},
                          indent=2)


# The header's fields, in its order (the JSON's keys besides "rows" and "passed").
SETUP_FIELDS = ("checkpoint", "head", "adapter", "layout", "dtype", "recompute", "log_probs", "attention", "seed")
BUILT_IN_MODEL = "built-in tiny model"


# ---- comparing ------------------------------------------------------------------------------------
def _row(name: str, prod: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype,
         low_precision_ref: torch.Tensor | None = None, zero_scale: float | None = None,
         pooled: tuple[float, float] | None = None) -> Row:
    """One compared tensor. Errors are relative to max|ref|; a reference that is exactly
    zero (e.g. q/k gradients when every row has at most one valid token: a softmax over
    one key does not depend on q or k) is measured against ``zero_scale`` instead (the
    largest gradient of the model), so rounding noise in a fused kernel's backward
    (seen: 1e-7 from varlen attention on an H200) is judged at the model's scale.

    ``pooled`` (bf16 only): (max|ref|, bf16 oracle's max error) of the tensor this one is a
    slice of; the rule is then the whole tensor's, reported for this slice."""
    # bf16 checks (GPU, real shapes: billions of elements) compare in float32 on the GPU;
    # CPU checks in float64.
    if dtype == torch.bfloat16 and torch.cuda.is_available():
        work, device = torch.float32, "cuda"
    else:
        work, device = torch.float64, "cpu"
    prod_w, ref_w = prod.to(device, work), ref.to(device, work)
    scale = float(ref_w.abs().max()) if ref_w.numel() else 0.0
    if scale == 0.0 and zero_scale:
        scale = zero_scale
    err = float((prod_w - ref_w).abs().max()) if ref_w.numel() else 0.0
    finite = bool(torch.isfinite(prod_w).all())
    denominator = max(scale, 1e-300)
    if dtype == torch.bfloat16:
        low = low_precision_ref.to(device, work)
        base = float((low - ref_w).abs().max()) if ref_w.numel() else 0.0
        if pooled:
            scale, base = pooled
            denominator = max(scale, 1e-300)
        bound = bf16_allowed_error(base, scale) / denominator
    else:
        bound = TOLERANCE[dtype]
    rel = err / denominator if scale else err
    return Row(name, err, rel, bound, finite and not math.isnan(rel) and rel <= bound)


def compare(prod_outputs, ref_outputs, prod_grads, ref_grads, microbatches, layout, head, dtype,
            low_outputs=None, low_grads=None) -> Report:
    """One row per micro-batch output and per gradient, by checkpoint name."""
    report = Report(str(layout), head, str(dtype).replace("torch.", ""))
    valid = [mb.attention_mask.bool() for mb in microbatches]
    pooled = None
    if dtype == torch.bfloat16:
        # The bf16 rule takes the model's output over ALL micro-batches as its tensor, as it
        # does for gradients: a max-error rule on a 3-value slice (single-token rows)
        # compares two maxima of 3 noise samples. Measured on CPU, TP=2, value head: a
        # correct model's one-token values erred 2.2% of their scale where the bf16 oracle
        # happened to err 0.4% (its other slices: 0.9-2.8% for production, 1.1-2.8% for the oracle).
        refs = torch.cat([ref_outputs[k][v].double().flatten() for k, v in enumerate(valid)])
        lows = torch.cat([low_outputs[k][v].double().flatten() for k, v in enumerate(valid)])
        if refs.numel():
            pooled = (float(refs.abs().max()), float((lows - refs).abs().max()))
    for k, mb in enumerate(microbatches):
        label = f"output[{mb.name or k}]"
        low = None if low_outputs is None else low_outputs[k][valid[k]]
        report.rows.append(_row(label, prod_outputs[k][valid[k]], ref_outputs[k][valid[k]], dtype, low,
                                pooled=pooled))
    missing = set(ref_grads) ^ set(prod_grads)
    if missing:
        report.rows.append(Row(f"grad names differ: {sorted(missing)[:5]}", math.inf, math.inf, 0.0, False))
    grad_scale = max((float(g.abs().max()) for g in ref_grads.values() if g.numel()), default=0.0)
    for name in ref_grads:
        if name in prod_grads:
            low = None if low_grads is None else low_grads[name]
            report.rows.append(_row(f"grad {name}", prod_grads[name], ref_grads[name], dtype, low, grad_scale))
    return report
