"""The micro-batches production and the oracle are compared on, and the loss that ties
them: ``sum(observed * probe)`` over valid tokens, a fixed random linear functional of the
outputs, so that every parameter's gradient is exercised."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from splitllama import weight_names as wn


@dataclass
class Microbatch:
    """One micro-batch and the probe defining its share of the loss.

    The loss is ``sum(observed * probe)`` over valid tokens, where ``observed`` is the
    model output (logits ``[B, S, V]`` or values ``[B, S]``), or, when ``labels`` is set
    (LM only), ``[B, S, 2]`` = (log-probability of the label, entropy) of
    ``softmax(logits / temperature)`` (``temperature`` None: 1)."""

    input_ids: torch.Tensor  # [B, S]
    attention_mask: torch.Tensor  # [B, S] bool
    position_ids: torch.Tensor | None
    probe: torch.Tensor  # shaped like what is observed
    name: str = ""
    labels: torch.Tensor | None = None  # [B, S] token ids
    temperature: float | None = None

    def to(self, device) -> Microbatch:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Microbatch(move(self.input_ids), move(self.attention_mask), move(self.position_ids),
                          self.probe, self.name, move(self.labels), self.temperature)


def masked_probe(mb: Microbatch, like: torch.Tensor) -> torch.Tensor:
    """The micro-batch's probe, zero at padded positions, shaped and typed like ``like``."""
    mask = mb.attention_mask.to(like.device)
    probe = mb.probe.to(like.device, like.dtype)
    return probe * mask.reshape(*mask.shape, *([1] * (probe.dim() - 2))).to(like.dtype)


# ---- the check's inputs -----------------------------------------------------------------------
def _probe(shape, head: wn.Head, vocab: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, vocab, generator=gen) if head == "lm" else torch.randn(*shape, generator=gen)


def check_microbatches(vocab: int, head: wn.Head, seed: int = 0, multiple_of: int = 1) -> list[Microbatch]:
    """The CLI's batch: random masks and the edge cases, as separate micro-batches of
    different lengths (rows: left/right/inside padding, empty, single token; an
    all-padding batch; max_seqlen 1; an odd token count; caller position_ids). Random
    right-padded micro-batches are appended until the count is a multiple of
    ``multiple_of`` (megatron's interleaved schedule needs a multiple of the PP size)."""
    gen = torch.Generator().manual_seed(seed)

    def rows(*text):
        return torch.tensor([[c == "1" for c in r] for r in text], dtype=torch.bool)

    masks = {
        "mixed": rows("0011111111", "1111111000", "1101101111", "0000000000", "0000100000"),
        "all_padding": rows("000000", "000000"),
        "max_seqlen_1": rows("1", "1"),
        "odd_tokens": rows("1111111", "0110110"),
        "no_padding": rows("111111111111"),
    }
    out = []
    for name, mask in masks.items():
        ids = torch.randint(0, vocab, mask.shape, generator=gen)
        out.append(Microbatch(ids, mask, None, _probe(mask.shape, head, vocab, gen), name))
    mask = rows("0111111", "1111100")
    ids = torch.randint(0, vocab, mask.shape, generator=gen)
    # Gaps between positions (a constant offset would cancel in rotary attention).
    positions = torch.randint(1, 300, mask.shape, generator=gen).cumsum(-1)
    out.append(Microbatch(ids, mask, positions, _probe(mask.shape, head, vocab, gen), "caller_positions"))
    if head == "lm":
        mask = rows("0011111111", "1111110000", "1110111111")
        ids = torch.randint(0, vocab, mask.shape, generator=gen)
        labels = ids.roll(-1, dims=1)  # next-token targets, as an RL actor scores a rollout
        probe = torch.randn(*mask.shape, 2, generator=gen)
        # sampled at a temperature below 1, as RL rollouts often are; exact in binary
        out.append(Microbatch(ids, mask, None, probe, "log_probs_entropy", labels, temperature=0.75))
    while len(out) % multiple_of:
        lengths = torch.randint(0, 12, (3,), generator=gen)
        mask = torch.arange(12)[None, :] < lengths[:, None]
        ids = torch.randint(0, vocab, mask.shape, generator=gen)
        out.append(Microbatch(ids, mask, None, _probe(mask.shape, head, vocab, gen), f"random{len(out)}"))
    return out
