"""Shared test inputs: Hypothesis strategies for attention masks and named edge cases.

A mask is a ``[batch, seq]`` bool tensor (True = valid token). Rows may be padded on the
left, the right, both sides, inside, not at all, or be all padding (docs/verification.md).
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st

ROW_KINDS = ("none", "left", "right", "both", "inside", "empty", "single")


@st.composite
def mask_rows(draw, seq: int) -> list[bool]:
    kind = draw(st.sampled_from(ROW_KINDS))
    if kind == "none":
        return [True] * seq
    if kind == "empty":
        return [False] * seq
    if kind == "single":
        at = draw(st.integers(0, seq - 1))
        return [i == at for i in range(seq)]
    valid = draw(st.integers(1, seq))
    pad = seq - valid
    if kind == "left":
        return [False] * pad + [True] * valid
    if kind == "right":
        return [True] * valid + [False] * pad
    if kind == "both":
        left = draw(st.integers(0, pad))
        return [False] * left + [True] * valid + [False] * (pad - left)
    holes = draw(st.sets(st.integers(0, seq - 1), max_size=max(seq - 1, 0)))
    row = [i not in holes for i in range(seq)]
    return row if any(row) else [True] + row[1:]


@st.composite
def masks(draw, max_batch: int = 4, max_seq: int = 24, min_seq: int = 1) -> torch.Tensor:
    batch = draw(st.integers(1, max_batch))
    seq = draw(st.integers(min_seq, max_seq))
    rows = [draw(mask_rows(seq)) for _ in range(batch)]
    return torch.tensor(rows, dtype=torch.bool)


def _rows(*rows: str) -> torch.Tensor:
    """Masks written as strings: '1' valid, '0' padding."""
    return torch.tensor([[c == "1" for c in row] for row in rows], dtype=torch.bool)


# Named edge cases every equivalence test runs explicitly (docs/verification.md).
EDGE_MASKS: dict[str, torch.Tensor] = {
    "no_padding": _rows("11111111", "11111111"),
    "batch_1": _rows("0111111"),
    "left_right_inside": _rows("00111111", "11111000", "11011011", "01101100"),
    "empty_row": _rows("111111", "000000", "011100"),
    "all_padding_batch": _rows("00000", "00000"),
    "single_token_rows": _rows("000100", "100000", "000001"),
    "max_seqlen_1": _rows("1", "1", "1"),
    "odd_token_count": _rows("1111111", "1101100", "0000011"),
}
# A token count that TP=2 does not divide (SP padding): 7 + 4 + 2 = 13 valid tokens.
assert int(EDGE_MASKS["odd_token_count"].sum()) % 2 == 1


def long_row_mask(length: int = 4097, batch: int = 2) -> torch.Tensor:
    """One row longer than 4096 tokens beside a short left-padded row."""
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[0] = True
    mask[1:, length - 5:] = True
    return mask


def random_input_ids(mask: torch.Tensor, vocab: int, seed: int) -> torch.Tensor:
    """Token ids on every position (padding too: models must ignore them)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, mask.shape, generator=gen)


def shifted_position_ids(mask: torch.Tensor, seed: int) -> torch.Tensor:
    """Default positions shifted by a random constant per row. Rotary attention sees only
    position differences, so these must give the SAME outputs as the default."""
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.randint(1, 50, (mask.shape[0], 1), generator=gen)
    return (mask.long().cumsum(-1) - 1).clamp(min=0) + offsets


def caller_position_ids(mask: torch.Tensor, seed: int, max_gap: int = 300) -> torch.Tensor:
    """Caller position ids ``[B, S]`` growing by random gaps of 1..max_gap per token. Gaps
    change every query-key distance, so a path that ignores the caller's positions cannot
    match (a constant offset, ``shifted_position_ids``, would be cancelled by rotary)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, max_gap + 1, mask.shape, generator=gen).cumsum(-1)
