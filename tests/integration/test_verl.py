"""verl 0.9.1's own, unmodified Megatron engine code on a model built by the bridge, against
the oracle.

verl's engine loop (``forward_backward_batch``: micro-batches, megatron's pipeline schedule,
``forward_step``, ``gptmodel_forward_model_engine`` with its thd packing, and the LM head's
logits processor with temperature, entropy and megatron's cross entropy for log-probs)
runs on ``splitllama.bridge``'s chunks, for inference and for a training step; log-probs,
entropy, values and every parameter's gradient must equal the oracle's. ``export_weights``
must yield the checkpoint on disk. Rows have odd lengths and an empty row, so verl's
per-sequence TP padding and zero-length documents are exercised.

Skipped when verl or mbridge is not installed (docs/verl.md says how to install them).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state

pytest.importorskip("mbridge")
pytest.importorskip("verl.workers.engine.megatron.transformer_impl")

from mbridge import AutoBridge  # noqa: E402
from mbridge.utils.post_creation_callbacks import make_value_model  # noqa: E402

import splitllama.bridge  # noqa: E402,F401  (registers custom_split_llama with mbridge)
from splitllama.bridge import SplitLlamaBridge  # noqa: E402
from splitllama.config import CustomSplitLlamaConfig  # noqa: E402
from splitllama.cpu_support import cpu_schedule_context  # noqa: E402
from splitllama.distributed import setup_parallel  # noqa: E402
from splitllama.verify.runner import agree  # noqa: E402
from splitllama.grads import allreduce_sequence_parallel_grads  # noqa: E402
from splitllama.checkpoint.safetensors_io import SafetensorsReader  # noqa: E402
from splitllama.verify import verl_engine  # noqa: E402
from splitllama.verify.rules import TOLERANCE, bf16_allowed_error  # noqa: E402
from splitllama.verify.runner import gather_full_state, load_oracle  # noqa: E402
from splitllama.verify.tiny import tiny_split_config  # noqa: E402
from tests.integration.conftest import DEVICE, DTYPE  # noqa: E402
from tests.integration.layouts import layouts  # noqa: E402

# The layouts verl is run at: TP=1, TP=2 + SP, PP=2 (even split, as the bridge builds it)
# and TP=2 x PP=2 (with VPP 2: four one-layer chunks).
VERL_LAYOUTS = ("tp1", "tp2_sp", "pp2_cut_adapter", "tp2_pp2_vpp2")
# Odd lengths (verl pads each to a multiple of TP), an empty row (a zero-length document)
# and 8 rows in micro-batches of 2: megatron's interleaved schedule on CPU needs at
# least 2 * pp micro-batches.
ROW_LENGTHS = (5, 0, 3, 7, 1, 4, 2, 6)
MICRO_BATCH = 2
# Below 1 so verl's in-place division of the logits matters (and would overflow an
# unsuitable padded-column value); exact in binary, as verl holds temperatures in float32.
TEMPERATURE = 0.75
ODD_VOCAB = 301  # no TP > 1 divides it: the LM head has padded columns


def _rows(vocab: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(0, vocab, (n,), generator=gen) for n in ROW_LENGTHS]


def _probes(rows, what: tuple[str, ...]) -> dict[str, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(11)
    return {k: [torch.randn(len(r), generator=gen, dtype=torch.float64) for r in rows] for k in what}


def _scored(head: str, rows) -> dict[str, list[torch.Tensor]]:
    """Which positions of each row are compared: log-probs of the next token of the row
    (verl's label at a row's last token is whatever follows it in the packed buffer, which
    no RL loss reads), entropy and values everywhere."""
    if head == "value":
        return {"values": [torch.ones(len(r), dtype=torch.bool) for r in rows]}
    last = [torch.arange(len(r)) < len(r) - 1 for r in rows]
    return {"log_probs": last, "entropy": [torch.ones(len(r), dtype=torch.bool) for r in rows]}


def _oracle(ckpt: str, head: str, rows, dtype, probes, scored):
    """Oracle outputs per row and its gradients of ``sum(output * probe)`` at scored positions."""
    model = load_oracle(ckpt, head, dtype, DEVICE)
    seq = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), seq, dtype=torch.long)
    mask = torch.zeros(len(rows), seq, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, True
    out = model(input_ids=ids.to(DEVICE), attention_mask=mask.to(DEVICE)).logits
    observed: dict[str, list[torch.Tensor]] = {}
    if head == "value":
        observed["values"] = [out[i, : len(r), 0] for i, r in enumerate(rows)]
    else:
        log_softmax = torch.log_softmax(out / TEMPERATURE, dim=-1)
        labels = torch.roll(ids, -1, dims=1).to(DEVICE)
        lp = log_softmax.gather(-1, labels[..., None])[..., 0]
        ent = -(log_softmax.exp() * log_softmax).sum(-1)
        observed["log_probs"] = [lp[i, : len(r)] for i, r in enumerate(rows)]
        observed["entropy"] = [ent[i, : len(r)] for i, r in enumerate(rows)]
    loss = sum((o * probes[k][i].to(o) * scored[k][i].to(o.device)).sum()
               for k, per_row in observed.items() for i, o in enumerate(per_row))
    loss.backward()
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().cpu()
             for n, p in model.named_parameters()}
    return {k: [o.detach().cpu() for o in v] for k, v in observed.items()}, grads


def run_verl(ckpt: str, layout, head: str, dtype, rows, probes, scored, forward_only: bool,
             make_vocab_size_divisible_by: int | None = None):
    """verl's engine on the bridge's model: per-row outputs (every rank) and, unless
    ``forward_only``, gradients by checkpoint name. ``make_vocab_size_divisible_by``:
    mbridge's bridge argument (the LM head's rows padded to a multiple of it times TP)."""
    setup_parallel(layout, DEVICE)
    config = CustomSplitLlamaConfig.from_pretrained(ckpt)
    bridge = AutoBridge.from_config(config, dtype=dtype, make_vocab_size_divisible_by=make_vocab_size_divisible_by)
    bridge.set_extra_args(sequence_parallel=layout.sp)
    callbacks = [make_value_model] if head == "value" else []  # how verl asks for a critic
    chunks = bridge.get_model(post_model_creation_callbacks=callbacks, wrap_with_ddp=False)
    bridge.load_weights(chunks, ckpt)
    engine = verl_engine.engine(bridge, chunks, value=head == "value")
    data = verl_engine.batch(rows, micro_batch_size=MICRO_BATCH, temperature=TEMPERATURE)
    data["row"] = torch.arange(len(rows))
    key = "values" if head == "value" else None

    def loss_function(model_output, data, dp_group):
        loss = 0.0
        for k in scored:
            for row, out in zip(data["row"].tolist(), model_output[key or k].unbind()):
                loss = loss + (out * probes[k][row].to(out) * scored[k][row].to(out.device)).sum()
        return loss, {}

    with cpu_schedule_context():
        result = engine.forward_backward_batch(data, None if forward_only else loss_function,
                                               forward_only=forward_only)
    holder = [None]
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        holder = [{k: [t.detach().cpu() for t in v.unbind()] for k, v in result["model_output"].items()}]
    last = parallel_state.get_pipeline_model_parallel_last_rank()
    dist.broadcast_object_list(holder, src=last, group=parallel_state.get_pipeline_model_parallel_group())
    grads = None
    if not forward_only:
        allreduce_sequence_parallel_grads(chunks)
        grads = gather_full_state(chunks, "grad")
    return holder[0], grads, (bridge, chunks)


def _tolerance(name: str, head: str, dtype: torch.dtype) -> float:
    # verl's log-probs go through megatron's vocab-parallel cross entropy, which computes in
    # float32 whatever the logits' dtype (measured 7e-7 relative against the float64
    # oracle); every LM gradient flows through it. Everything else keeps the model's dtype.
    if dtype == torch.float64 and head == "lm" and name != "entropy":
        return TOLERANCE[torch.float32]
    return TOLERANCE[dtype] if dtype in TOLERANCE else math.nan


def _errors(prod: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    if not bool(torch.isfinite(prod).all()):
        return math.inf, float(ref.abs().max()) if ref.numel() else 0.0
    return float((prod.double() - ref.double()).abs().max()) if ref.numel() else 0.0, \
        float(ref.abs().max()) if ref.numel() else 0.0


def verl_agrees(ckpt: str, layout, head: str, forward_only: bool = False, dtype: torch.dtype = DTYPE,
                make_vocab_size_divisible_by: int | None = None) -> tuple[bool, list[str]]:
    """verl's engine vs the oracle: (verdict agreed by every rank, failing rows). ``dtype``:
    the model's (the tests' DTYPE unless asked), for ``run_verl`` with
    ``make_vocab_size_divisible_by``."""
    config = CustomSplitLlamaConfig.from_pretrained(ckpt)
    rows = _rows(config.vocab_size)
    scored = _scored(head, rows)
    probes = _probes(rows, tuple(scored))
    outs, grads, _ = run_verl(ckpt, layout, head, dtype, rows, probes, scored, forward_only,
                              make_vocab_size_divisible_by)
    ref_dtype = torch.float64 if DEVICE == "cpu" else torch.float32
    ref_out, ref_grads = _oracle(ckpt, head, rows, ref_dtype, probes, scored)
    low_out = low_grads = None
    if dtype == torch.bfloat16:  # the bf16 rule: compare with the oracle's own bf16 error
        low_out, low_grads = _oracle(ckpt, head, rows, dtype, probes, scored)
    pairs = {}
    for k, mask in scored.items():
        pairs[k] = tuple(None if per_row is None else torch.cat([o[m] for o, m in zip(per_row[k], mask)])
                         for per_row in (outs, ref_out, low_out))
    if grads is not None:
        if set(grads) != set(ref_grads):
            return agree(False), [f"gradient names differ: {sorted(set(grads) ^ set(ref_grads))}"]
        pairs.update({f"grad {n}": (grads[n], ref_grads[n], low_grads[n] if low_grads else None) for n in ref_grads})
    failures = []
    for name, (prod, ref, low) in pairs.items():
        err, scale = _errors(prod, ref)
        bound = (bf16_allowed_error(_errors(low, ref)[0], scale) if low is not None
                 else _tolerance(name.split(" ")[0], head, dtype) * max(scale, 1e-30))
        if not err <= bound:
            failures.append(f"{name}: max abs error {err:.3g} > {bound:.3g} (max |ref| {scale:.3g})")
    return agree(not failures), failures


def export_matches(ckpt: str, layout, head: str) -> tuple[bool, list[str]]:
    """``export_weights`` on every rank: each checkpoint tensor exactly once, equal to disk."""
    setup_parallel(layout, DEVICE)
    config = CustomSplitLlamaConfig.from_pretrained(ckpt)
    bridge = AutoBridge.from_config(config, dtype=DTYPE)
    bridge.set_extra_args(sequence_parallel=layout.sp)
    chunks = bridge.get_model(value=head == "value")
    bridge.load_weights(chunks, ckpt)
    reader = SafetensorsReader(ckpt)
    seen, problems = set(), []
    for name, tensor in bridge.export_weights(chunks):
        if name in seen:
            problems.append(f"{name} exported twice")
        seen.add(name)
        if name not in reader:
            problems.append(f"{name} is not in the checkpoint")
        elif not torch.equal(tensor.cpu(), reader.read(name).to(tensor.dtype)):
            problems.append(f"{name} differs from the checkpoint")
    problems += [f"{name} not exported" for name in sorted(set(reader.names()) - seen)]
    return agree(not problems), problems


@pytest.mark.parametrize("forward_only", [True, False], ids=["infer", "train"])
@pytest.mark.parametrize("head", ["lm", "value"])
@pytest.mark.parametrize("layout", layouts(*VERL_LAYOUTS))
def test_verl_engine_matches_oracle(layout, head, forward_only, checkpoint_factory):
    ok, failures = verl_agrees(checkpoint_factory(head, False), layout, head, forward_only)
    assert ok, "\n".join(failures) or "another rank failed"


@pytest.mark.parametrize("layout", layouts("tp2_sp", "tp2_pp2_vpp2"))
def test_verl_padded_vocabulary(layout, checkpoint_factory):
    """Vocabulary 301 at TP=2: the last rank's logits end in padded columns, which verl's
    entropy and cross entropy must see as probability 0 (finite, never -inf)."""
    config = tiny_split_config()
    config.vocab_size = ODD_VOCAB
    ok, failures = verl_agrees(checkpoint_factory("lm", False, config=config, name="odd_vocab"), layout, "lm")
    assert ok, "\n".join(failures) or "another rank failed"


def float32_temperature_agrees(ckpt: str, layout) -> tuple[bool, list[str]]:
    """verl's inference on a float32 model with padded vocabulary columns (``ckpt``'s
    vocabulary ODD_VOCAB) at TEMPERATURE < 1, against the oracle. verl divides the float32
    logits by the temperature in place: the padded columns' value must stay finite there
    (float32's most negative value overflows to -inf, and verl's entropy turns NaN). In
    float64, where the CPU tests run the model otherwise, no such overflow can show; float32
    is how verl's float32 runs hold the logits. At TP=1 the columns are padded through
    mbridge's ``make_vocab_size_divisible_by`` (64: 320 rows)."""
    return verl_agrees(ckpt, layout, "lm", forward_only=True, dtype=torch.float32,
                       make_vocab_size_divisible_by=64 if layout.tp == 1 else None)


@pytest.mark.parametrize("layout", layouts("tp1", "tp2"))
def test_verl_float32_logits_at_temperature_below_one(layout, checkpoint_factory):
    config = tiny_split_config()
    config.vocab_size = ODD_VOCAB
    ok, failures = float32_temperature_agrees(checkpoint_factory("lm", False, config=config, name="odd_vocab"),
                                              layout)
    assert ok, "\n".join(failures) or "another rank failed"


@pytest.mark.parametrize("layout", layouts(*VERL_LAYOUTS))
def test_export_weights_equal_checkpoint(layout, checkpoint_factory):
    ok, problems = export_matches(checkpoint_factory("lm", False), layout, "lm")
    assert ok, "\n".join(problems) or "another rank failed"


@pytest.mark.parametrize("layout", layouts(*VERL_LAYOUTS))
def test_bridge_refuses_bad_input(layout):
    """One-line ValueErrors, as the CLI's: a plain Llama config, and a layout the config
    cannot take (megatron's parallel state is the layout)."""
    setup_parallel(layout, DEVICE)
    with pytest.raises(ValueError, match=r"^hf_config has model_type='llama', expected 'custom_split_llama': make"):
        SplitLlamaBridge(tiny_split_config().lower, dtype=DTYPE)
    if layout.tp > 1:  # an FFN of 255 cannot split over 2 ranks
        narrow = tiny_split_config(upper=dict(intermediate_size=255))
        with pytest.raises(ValueError, match=r"^upper_config.intermediate_size=255 is not divisible by "
                                             r"tensor_model_parallel_size=2$"):
            SplitLlamaBridge(narrow, dtype=DTYPE)
    if layout.pp > 1:  # 3 layers over 2 (or 4) stages
        odd = tiny_split_config(num_lower=2, num_upper=1)
        with pytest.raises(ValueError, match=r"do not split evenly|cannot fill"):
            SplitLlamaBridge(odd, dtype=DTYPE)


@pytest.mark.skipif(DEVICE != "cpu", reason="the benchmark's CPU smoke run; on GPUs run benchmarks/verl_engine.py itself")
@pytest.mark.parametrize("layout", layouts("tp1"))
def test_verl_engine_benchmark_runs_on_cpu(layout, tmp_path):
    """benchmarks/verl_engine.py (the 1-GPU comparison) end to end on the tiny model."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "verl_engine.py"
    spec = importlib.util.spec_from_file_location("verl_engine_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    report = bench.main(["--device", "cpu", "--tiny", "--tokens", "300", "--check-tokens", "200",
                         "--warmup", "0", "--repeats", "1", "--json", str(tmp_path / "out.json")])
    assert report["passed"], report["check"]
    assert report["verl"]["ms"] > 0 and report["project"]["ms"] > 0


@pytest.mark.parametrize("layout", layouts("tp1", "tp2_sp"))
def test_critic_starts_from_the_actor_checkpoint(layout, checkpoint_factory):
    """verl's critic loads the actor's checkpoint: no score.weight there, so the bridge
    gives the value model a fresh value head and loads everything else strictly."""
    ckpt = checkpoint_factory("lm", False)
    setup_parallel(layout, DEVICE)
    bridge = AutoBridge.from_config(CustomSplitLlamaConfig.from_pretrained(ckpt), dtype=DTYPE)
    bridge.set_extra_args(sequence_parallel=layout.sp)
    chunks = bridge.get_model(post_model_creation_callbacks=[make_value_model])
    bridge.load_weights(chunks, ckpt)
    reader = SafetensorsReader(ckpt)
    exported = dict(bridge.export_weights(chunks))
    assert set(exported) == (set(reader.names()) - {"lm_head.weight"}) | {"score.weight"}
    assert all(torch.equal(t.cpu(), reader.read(n).to(t.dtype)) for n, t in exported.items() if n != "score.weight")
    assert bool(torch.isfinite(exported["score.weight"]).all()) and float(exported["score.weight"].abs().max()) > 0
