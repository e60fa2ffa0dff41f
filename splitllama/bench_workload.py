"""The benchmark's workload, CPU-testable: documents drawn from an RL length distribution,
one batch of them, the step an RL actor times (and the oracle's), the real Llama-3.1 shapes,
and the useful-FLOP model (Megatron's count over real tokens, causal attention halved; the
figures are worked out in docs/verification.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from splitllama.config import CustomSplitLlamaConfig, llama_preset

# The actor loss weighs entropy as RL trainers' entropy bonus does; any non-zero weight
# makes the backward go through the entropy.
ENTROPY_COEF = 1e-3


def rl_lengths(tokens: int, gen: torch.Generator, median: int = 512, sigma: float = 0.9,
               max_len: int = 4096) -> list[int]:
    """Document lengths of RL rollouts (prompt + response): log-normal around ``median``,
    clipped to [16, max_len], drawn until ``tokens`` real tokens."""
    lengths: list[int] = []
    while sum(lengths) < tokens:
        draw = math.exp(math.log(median) + sigma * float(torch.randn(1, generator=gen)))
        lengths.append(int(min(max(draw, 16), max_len)))
    return lengths


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    lengths: list[int]

    @property
    def padding_fraction(self) -> float:
        return 1.0 - sum(self.lengths) / self.attention_mask.numel()


def make_batch(lengths: list[int], vocab: int, gen: torch.Generator, device: str) -> Batch:
    """One document per row (as rollouts are), right-padded to the longest."""
    seq = max(lengths)
    mask = torch.zeros(len(lengths), seq, dtype=torch.bool)
    for row, length in enumerate(lengths):
        mask[row, :length] = True
    ids = torch.randint(0, vocab, mask.shape, generator=gen)
    return Batch(ids.to(device), mask.to(device), ids.roll(-1, 1).to(device), lengths)


def useful_flops(config: CustomSplitLlamaConfig, lengths: list[int]) -> float:
    """Forward + backward FLOPs of the real tokens (Megatron's count, causal halved)."""
    tokens = sum(lengths)
    s_bar = sum(n * n for n in lengths) / tokens
    per_token = 0.0
    for sub, count in ((config.lower, config.num_lower), (config.upper, config.num_upper)):
        h, d, nh, nkv = sub.hidden_size, sub.head_dim, sub.num_attention_heads, sub.num_key_value_heads
        params = h * (nh + 2 * nkv) * d + nh * d * h + 3 * h * sub.intermediate_size
        per_token += count * (6 * params + 6 * nh * d * s_bar)
    per_token += 6 * config.h_lo * config.h_hi + (6 * config.h_hi ** 2 if config.mlp else 0)
    per_token += 6 * config.h_hi * config.vocab_size
    return per_token * tokens


def bench_config(family: str, num_lower: int, num_upper: int) -> CustomSplitLlamaConfig:
    """Real shapes: ``mixed`` = 8B lower + 70B upper (the product); ``8b`` / ``70b`` = both
    stacks of one shape (for TP scaling per layer shape)."""
    lower = {"mixed": "llama3.1-8b", "8b": "llama3.1-8b", "70b": "llama3.1-70b"}[family]
    upper = {"mixed": "llama3.1-70b", "8b": "llama3.1-8b", "70b": "llama3.1-70b"}[family]
    return CustomSplitLlamaConfig.from_llama_configs(
        llama_preset(lower, num_hidden_layers=num_lower),
        llama_preset(upper, num_hidden_layers=num_upper),
        num_lower, num_upper,
    )


def actor_step(model, batch: Batch, entropy: bool = True):
    """Forward, next-token log-probs and entropy, backward: what an RL actor's update does."""
    def step():
        model.zero_grad(set_to_none=True)
        log_probs, ent = model.log_probs_and_entropy(batch.input_ids, batch.attention_mask, batch.labels,
                                                     entropy=entropy)
        loss = (log_probs * batch.attention_mask).sum()
        if ent is not None:
            loss = loss + ENTROPY_COEF * (ent * batch.attention_mask).sum()
        loss.backward()
    return step


def oracle_step(model, batch: Batch):
    def step():
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        log_probs = torch.log_softmax(logits, -1).gather(-1, batch.labels[..., None])[..., 0]
        (log_probs * batch.attention_mask).sum().backward()
    return step
