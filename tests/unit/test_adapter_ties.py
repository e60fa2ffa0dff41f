"""The bf16 comparison's handling of ReLU ties in the mlp adapter (splitllama.adapter_ties),
on a stand-in oracle whose adapter pre-activations are set by hand."""

from __future__ import annotations

import torch
from torch import nn

from splitllama.verify.adapter_ties import AdapterTies
from splitllama.verify.rules import BF16_FLOOR_ROUNDINGS, BF16_RATIO, BF16_UNIT_ROUNDOFF, bf16_allowed_error

H = 4


class StandInOracle(nn.Module):
    """Only the oracle's adapter, under the checkpoint names; linear_1 is the identity, so
    the input IS the pre-activation ``[B, S, H]``."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.adapter_linear_1 = nn.Linear(H, H, bias=False, dtype=torch.float64)
        self.model.adapter_linear_2 = nn.Linear(H, H, bias=False, dtype=torch.float64)
        with torch.no_grad():
            self.model.adapter_linear_1.weight.copy_(torch.eye(H))
            self.model.adapter_linear_2.weight.copy_(torch.arange(1.0, H * H + 1).reshape(H, H))

    def forward(self, pre_BSH: torch.Tensor) -> torch.Tensor:
        return self.model.adapter_linear_2(torch.relu(self.model.adapter_linear_1(pre_BSH)))


# one row of 3 slots, the middle one padding: valid tokens are slots 0 and 2
MASK = torch.tensor([[True, False, True]])
PRE = torch.tensor([[[0.5, -0.8, 1e-4, -1e-4],
                     [9.0, 9.0, 9.0, 9.0],
                     [-0.6, 0.7, 0.3, -0.2]]], dtype=torch.float64)
# the bf16 oracle's pre-activations at the valid tokens: off by at most 1e-3
LOW_TH = PRE[MASK] + torch.tensor([[1e-3, 0, 0, 0], [0, -5e-4, 0, 0]], dtype=torch.float64)
BAND = BF16_RATIO * 1e-3 + BF16_FLOOR_ROUNDINGS * BF16_UNIT_ROUNDOFF * 0.8


def make_ties(production_gates_TH: torch.Tensor) -> AdapterTies:
    ties = AdapterTies([MASK], bf16_allowed_error)
    ties.production_gates = [production_gates_TH]
    ties.low_preactivations = [LOW_TH]
    return ties


def run(oracle: StandInOracle, ties: AdapterTies | None, reference: bool = True):
    oracle.zero_grad(set_to_none=True)
    pre = PRE.clone().requires_grad_()
    if ties is None:
        out = oracle(pre)
    else:
        with ties.take_production_branch_at_ties(oracle, reference=reference):
            out = oracle(pre)
    out.sum().backward()
    return out.detach(), pre.grad


def test_ties_are_the_units_within_the_rules_band_of_zero():
    ties = make_ties(PRE[MASK] > 0)._ties(PRE[MASK], LOW_TH)
    assert BAND < 0.2  # the 0.2 unit must lie outside the band for this test to mean anything
    assert ties.tolist() == [[False, False, True, True], [False, False, False, False]]


def test_same_branches_change_nothing():
    oracle = StandInOracle()
    plain = run(oracle, None)
    ties = make_ties(PRE[MASK] > 0)
    forced = run(oracle, ties)
    assert torch.equal(plain[0], forced[0]) and torch.equal(plain[1], forced[1])
    assert ties.verdicts == [(0, 2, 0)]


def test_at_a_tie_the_reference_takes_productions_branch():
    oracle = StandInOracle()
    gates = PRE[MASK] > 0
    gates[0, 3] = True  # production opened the unit at -1e-4
    ties = make_ties(gates)
    out, grad = run(oracle, ties)
    w2 = oracle.model.adapter_linear_2.weight.detach()
    # token 0 (slot 0): units 0, 2 open as before, and unit 3 now passes -1e-4 through
    expected = w2 @ torch.tensor([0.5, 0.0, 1e-4, -1e-4], dtype=torch.float64)
    torch.testing.assert_close(out[0, 0], expected, rtol=0, atol=1e-12)
    assert grad[0, 0, 3] == w2[:, 3].sum()  # the gradient flows through the opened unit
    assert grad[0, 1].abs().sum() > 0  # padding slot keeps plain ReLU (9 > 0: open)
    assert ties.verdicts == [(0, 2, 1)]


def test_the_bf16_oracle_takes_the_same_branch_at_the_same_ties():
    oracle = StandInOracle()
    gates = PRE[MASK] > 0
    gates[0, 3] = True
    ties = make_ties(gates)
    reference = run(oracle, ties, reference=True)
    low = run(oracle, ties, reference=False)
    assert torch.equal(reference[0], low[0]) and torch.equal(reference[1], low[1])


def test_a_gate_on_the_other_side_beyond_the_band_is_counted():
    oracle = StandInOracle()
    gates = PRE[MASK] > 0
    gates[1, 3] = True  # -0.2 is far outside the band: a real discrepancy
    gates[0, 0] = False  # and 0.5
    ties = make_ties(gates)
    out, _ = run(oracle, ties)
    assert ties.verdicts == [(2, 2, 0)]
    # the reference keeps its own branch there: what production did is judged, not adopted
    assert torch.equal(out, run(StandInOracle(), None)[0])
