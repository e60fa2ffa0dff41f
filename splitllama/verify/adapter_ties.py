"""The mlp adapter's ReLU in the bfloat16 comparison: ties at zero.

ReLU's gradient jumps at 0. Where the exact pre-activation of a unit lies within bf16
rounding of 0, a correct bf16 model may take either branch, and a unit that is open in
production but closed in the float32/64 reference sends a different gradient into every
weight below the adapter. Measured on the tiny model (CPU, bf16, checkpoint seed 1): one
unit at -1.2e-4 (fp64) came out +1.1e-4 in production, on a pre-activation tensor of
scale 0.14 whose bf16 error is 8e-4 for production and oracle alike; the lower stack's
q/k gradients were then 77% off while the bf16 oracle, which happened to keep the unit
closed, was 1% off. With the reference taking production's branch at that unit, the
same micro-batches passed at 0.52 of the bound.

So, in the bf16 comparison only, a tie is a unit whose reference pre-activation is within
the error-ratio rule's own band of 0 (the error the rule allows on that micro-batch's
pre-activations, given the bf16 oracle's error there); at ties the reference AND
the bf16 oracle take production's branch, so both measure rounding, not a branch choice.
Everywhere else production's gate must equal the reference's: a unit on the other side
of 0 beyond the band is a failure of its own row. The data that crosses over is
production's gate bits, observed by hooks; the oracle's computation stays its own.

Order (``run_parity``): production (gates recorded) -> ``record_oracle_preactivations``
on the bf16 oracle (forward only) -> the reference with ``take_production_branch_at_ties``
(finds the ties) -> the bf16 oracle with the same.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from collections.abc import Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from splitllama import weight_names as wn
from splitllama.layers import Adapter


def _oracle_module(oracle, weight_name: str) -> torch.nn.Module:
    return oracle.get_submodule(weight_name.removesuffix(".weight"))


@dataclass
class AdapterTies:
    """Gates and ties of the mlp adapter's ReLU, per micro-batch, at valid tokens
    (row-major, the packed order): every tensor here is ``[T, h_hi]``."""

    masks: list[torch.Tensor]  # [B, S] validity of each micro-batch
    # the bf16 rule: (bf16 oracle's max-abs error, max|ref|) -> allowed max-abs error
    allowed_error: Callable[[float, float], float]
    production_gates: list[torch.Tensor] = field(default_factory=list)
    low_preactivations: list[torch.Tensor] = field(default_factory=list)
    ties: list[torch.Tensor] = field(default_factory=list)
    # per micro-batch: (units on the other side of 0 beyond the band, ties, ties where
    # production's branch differs from the reference's own)
    verdicts: list[tuple[int, int, int]] = field(default_factory=list)

    # ---- production ------------------------------------------------------------------------
    @contextlib.contextmanager
    def record_production(self, chunks: list[torch.nn.Module], h_hi: int):
        """Around production's run: its ReLU gates, gathered over TP / PP onto every rank."""
        local: list[torch.Tensor] = []
        # packed classes hand the adapter [T_pad, 1, h]; the padded class [S_pad, B, h]
        self._packed = getattr(chunks[0], "packed", True)
        adapters = [m for chunk in chunks for m in chunk.modules() if isinstance(m, Adapter) and m.mlp]
        # linear_1 is column-parallel over h_hi, on the whole (SP-gathered) sequence
        handles = [a.linear_1.register_forward_hook(lambda mod, args, out: local.append(out[0].detach() > 0))
                   for a in adapters]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        self.production_gates = self._gather(local, h_hi)

    def _gather(self, local: list[torch.Tensor], h_hi: int) -> list[torch.Tensor]:
        # 0: not on this rank (other stage or TP shard); 1: closed; 2: open. MAX over all
        # ranks fills each unit from a rank that computed it (data-parallel copies agree).
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        assert not local or len(local) == len(self.masks), (len(local), len(self.masks))
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        gates = []
        for k, mask in enumerate(self.masks):
            tokens = int(mask.sum())
            code = torch.zeros(tokens, h_hi, dtype=torch.uint8, device=device)
            if local:
                mine = local[k]
                if self._packed:
                    assert mine.dim() == 3 and mine.shape[1] == 1 and mine.shape[0] >= tokens, mine.shape
                    valid = mine[:tokens, 0]
                else:  # row-major valid tokens, the packed order
                    valid = mine[: mask.shape[1]].transpose(0, 1)[mask.to(mine.device)]
                width = mine.shape[-1]
                code[:, tp_rank * width:(tp_rank + 1) * width] = 1 + valid.to(device, torch.uint8)
            dist.all_reduce(code, op=dist.ReduceOp.MAX)
            assert bool((code > 0).all()), "an adapter unit was computed on no rank"
            gates.append((code == 2).cpu())
        return gates

    # ---- oracles ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def record_oracle_preactivations(self, oracle):
        """Around a forward-only run of the bf16 oracle: its pre-activations."""
        self.low_preactivations = []

        def keep(mod, args, out):
            valid = self.masks[len(self.low_preactivations)].to(out.device)
            self.low_preactivations.append(out.detach()[valid].cpu())

        handle = _oracle_module(oracle, wn.ADAPTER_MLP_1).register_forward_hook(keep)
        try:
            yield
        finally:
            handle.remove()

    @contextlib.contextmanager
    def take_production_branch_at_ties(self, oracle, reference: bool):
        """Around an oracle's run: at ties its ReLU takes production's branch. The reference
        (``reference=True``, run first) finds the ties and judges production's gates."""
        calls = [0]
        gate_BSH: list[torch.Tensor] = []
        pre: list[torch.Tensor] = []
        if reference:
            self.ties, self.verdicts = [], []

        def after_linear_1(mod, args, out):  # out: the pre-activation [B, S, h_hi]
            k = calls[0]
            calls[0] += 1
            valid = self.masks[k].to(out.device)
            own_T = out.detach()[valid] > 0
            prod_T = self.production_gates[k].to(out.device)
            if reference:
                self.ties.append(self._ties(out.detach()[valid], self.low_preactivations[k]).cpu())
                tie_T = self.ties[k].to(out.device)
                beyond = int((prod_T != own_T)[~tie_T].sum())
                self.verdicts.append((beyond, int(tie_T.sum()), int((prod_T != own_T)[tie_T].sum())))
            tie_T = self.ties[k].to(out.device)
            gate = out.detach() > 0
            gate[valid] = torch.where(tie_T, prod_T, own_T)
            gate_BSH.append(gate)
            pre.append(out)

        def before_linear_2(mod, args):  # replaces relu(pre-activation) by pre-activation * gate
            return (pre.pop() * gate_BSH.pop().to(args[0].dtype),)

        handles = [_oracle_module(oracle, wn.ADAPTER_MLP_1).register_forward_hook(after_linear_1),
                   _oracle_module(oracle, wn.ADAPTER_MLP_2).register_forward_pre_hook(before_linear_2)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _ties(self, ref_TH: torch.Tensor, low_TH: torch.Tensor) -> torch.Tensor:
        """Units whose reference pre-activation is within the rule's band of 0."""
        if not ref_TH.numel():
            return torch.zeros_like(ref_TH, dtype=torch.bool)
        ref64, low64 = ref_TH.double(), low_TH.to(ref_TH.device, torch.float64)
        band = self.allowed_error(float((low64 - ref64).abs().max()), float(ref64.abs().max()))
        return ref64.abs() <= band
