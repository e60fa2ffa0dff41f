"""The already packed ("thd") call megatron's and verl's engines make, against the same
tokens through the model's own packed call (whose parity with the oracle
test_parity.py proves): logits, and, with ``labels`` and ``temperature`` (verl's
``use_fused_kernels``), the fused head's ``TokenLogProbs`` and their gradients.

A thd row holds documents back to back, each padded at its end (verl pads every sequence
to a multiple of TP) and possibly empty; positions restart in every document.
"""

from __future__ import annotations

import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams

from splitllama.batches import TokenLogProbs
from splitllama.verify.runner import agree
from tests.integration.conftest import DEVICE, DTYPE
from tests.integration.layouts import layouts
from tests.integration.test_input_validation import loaded_model

DOCUMENTS = (5, 0, 3, 1)  # token counts; one empty document
TEMPERATURE = 0.75
# Both paths run the same production code on the same tokens, packed with other padding:
# rounding only (bf16 on GPUs: GEMMs of other shapes may tile and round differently).
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _thd_row(vocab: int, multiple: int):
    """(ids [1, T], labels [1, T], cu_seqlens, per-document (start, length) of the real tokens)."""
    gen = torch.Generator().manual_seed(3)
    ids, labels, bounds, docs = [], [], [0], []
    for n in DOCUMENTS:
        padded = -(-n // multiple) * multiple
        doc = torch.randint(0, vocab, (n,), generator=gen)
        docs.append((bounds[-1], n))
        ids.append(torch.cat([doc, torch.zeros(padded - n, dtype=torch.long)]))
        labels.append(torch.cat([doc.roll(-1), torch.zeros(padded - n, dtype=torch.long)]))
        bounds.append(bounds[-1] + padded)
    cu = torch.tensor(bounds, dtype=torch.int32)
    return torch.cat(ids)[None], torch.cat(labels)[None], cu, docs


def thd_matches_packed(ckpt: str, layout) -> bool:
    model = loaded_model(ckpt, layout, "lm")
    multiple = layout.tp if layout.sp else 1
    ids, labels, cu, docs = _thd_row(model.hf_config.vocab_size, multiple)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu.to(DEVICE), cu_seqlens_kv=cu.to(DEVICE),
                             cu_seqlens_q_padded=cu.to(DEVICE), cu_seqlens_kv_padded=cu.to(DEVICE),
                             max_seqlen_q=max(DOCUMENTS), max_seqlen_kv=max(DOCUMENTS))
    model.zero_grad(set_to_none=True)
    out = model(ids.to(DEVICE), packed_seq_params=params, labels=labels.to(DEVICE), temperature=TEMPERATURE)
    ok = isinstance(out, TokenLogProbs) and out.log_probs.shape == out.entropy.shape == ids.shape
    weights = torch.randn(2, ids.shape[1], generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    real = torch.zeros(ids.shape[1], dtype=torch.bool)
    for start, n in docs:
        real[start:start + n] = True
    thd = torch.stack([out.log_probs[0], out.entropy[0]])[:, real]
    (thd * weights[:, real].to(thd)).sum().backward()
    thd_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    # the same documents as rows of a padded batch, through the packed call
    rows = [(ids[0, s:s + n], labels[0, s:s + n]) for s, n in docs]
    width = max(DOCUMENTS)
    batch_ids = torch.zeros(len(rows), width, dtype=torch.long)
    batch_labels, mask = torch.zeros_like(batch_ids), torch.zeros(len(rows), width, dtype=torch.bool)
    for i, (doc, lab) in enumerate(rows):
        batch_ids[i, :len(doc)], batch_labels[i, :len(doc)], mask[i, :len(doc)] = doc, lab, True
    model.zero_grad(set_to_none=True)
    lp, ent = model.log_probs_and_entropy(batch_ids.to(DEVICE), mask.to(DEVICE), batch_labels.to(DEVICE),
                                          temperature=TEMPERATURE)
    packed = torch.stack([lp[mask.to(DEVICE)], ent[mask.to(DEVICE)]])
    (packed * weights[:, real].to(packed)).sum().backward()
    tol = TOLERANCE[DTYPE]
    ok = ok and bool(((thd - packed).abs().max() <= tol * packed.abs().max()).item())
    for name, p in model.named_parameters():
        ok = ok and bool(((thd_grads[name] - p.grad).abs().max() <= tol * p.grad.abs().max().clamp(min=1e-30)).item())
    return agree(ok)


@pytest.mark.parametrize("layout", layouts("tp1", "tp2_sp"))
def test_thd_call_with_labels_and_temperature(layout, checkpoint_factory):
    assert thd_matches_packed(checkpoint_factory("lm", False), layout)
