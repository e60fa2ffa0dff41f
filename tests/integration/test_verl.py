"""verl 0.9.1's own actor and critic workers (``TrainingWorker``, built from verl's
``ppo_megatron_trainer.yaml`` values as its PPO trainer builds them:
``splitllama.verify.verl_engine``) on this model, against the oracle.

The worker builds and loads the model through ``splitllama.bridge``; its engine runs
verl's unmodified code: micro-batches, megatron's pipeline schedule,
``gptmodel_forward_model_engine`` with its thd packing and the LM head's logits processor
(temperature, entropy, megatron's cross entropy). ``infer_batch`` gives log-probs and
entropy at a temperature below 1 (or values); ``train_batch`` with a probe loss gives every
parameter's gradient (megatron DDP's ``main_grad``). verl's engine runs in bfloat16 only,
so both are held to the bf16 rule (docs/verification.md) against the oracle. Rows have odd
lengths and an empty row, so verl's per-sequence TP padding and zero-length documents are
exercised. On CPU the worker runs through ``cpu_support.use_cpu_for_verl()``.

Skipped when verl or mbridge is not installed (docs/verl.md says how to install them).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("mbridge")
pytest.importorskip("verl.workers.engine_workers")

from mbridge import AutoBridge  # noqa: E402

import splitllama.bridge  # noqa: E402,F401  (registers custom_split_llama with mbridge)
from splitllama.bridge import SplitLlamaBridge  # noqa: E402
from splitllama.checkpoint.safetensors_io import SafetensorsReader  # noqa: E402
from splitllama.config import CustomSplitLlamaConfig  # noqa: E402
from splitllama.cpu_support import cpu_schedule_context, use_cpu_for_verl  # noqa: E402
from splitllama.distributed import setup_parallel  # noqa: E402
from splitllama.verify import verl_engine  # noqa: E402
from splitllama.verify.rules import TOLERANCE, bf16_allowed_error  # noqa: E402
from splitllama.verify.runner import agree, gather_full_state, load_oracle  # noqa: E402
from splitllama.verify.tiny import tiny_split_config  # noqa: E402
from tests.integration.conftest import DEVICE  # noqa: E402
from tests.integration.layouts import layouts  # noqa: E402

# The layouts verl is run at: TP=1, TP=2 + SP, PP=2 (even split, as the bridge builds it)
# and TP=2 x PP=2 (with VPP 2: four one-layer chunks).
VERL_LAYOUTS = ("tp1", "tp2_sp", "pp2_cut_adapter", "tp2_pp2_vpp2")
# Odd lengths (verl pads each to a multiple of TP), an empty row (a zero-length document)
# and 8 rows in micro-batches of 2: megatron's interleaved schedule on CPU needs at
# least 2 * pp micro-batches.
ROW_LENGTHS = (5, 0, 3, 7, 1, 4, 2, 6)
MICRO_BATCH = 2
# Well below 1 so the division by the temperature matters (and would overflow an unsuitable
# padded-column value): the bf16 test weights (Llama's 0.02 scale) give near-uniform
# next-token distributions, whose entropy moves by 0.2% between temperature 0.75 and 1 and
# by about 7% at 0.25; exact in binary, as verl holds temperatures in float32.
TEMPERATURE = 0.25
# verl's engine computes in bfloat16 only (its McoreEngineConfig refuses other dtypes)
DTYPE = torch.bfloat16


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


def _worker(ckpt: str, layout, head: str, **options):
    """verl's actor (``head="lm"``) or critic worker on ``ckpt`` at ``layout``."""
    setup_parallel(layout, DEVICE)
    if DEVICE == "cpu":
        use_cpu_for_verl()
    config = verl_engine.verl_config(ckpt, layout, micro_batch_size=MICRO_BATCH, **options)
    with cpu_schedule_context():
        return (verl_engine.critic_worker if head == "value" else verl_engine.actor_worker)(config)


def _on_every_rank(output, keys) -> dict[str, list[torch.Tensor]]:
    """The worker's per-row outputs (held by its TP-0 rank of the last pipeline stage),
    broadcast to every rank."""
    holder = [None]
    if output is not None:
        holder = [{k: [t.detach().float().cpu() for t in output[k].unbind()] for k in keys}]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, holder[0])
    return next(g for g in gathered if g is not None)


def run_verl(ckpt: str, layout, head: str, rows, probes, scored, worker_options: dict | None = None):
    """The worker's per-row outputs (``infer_batch``) and every gradient of the probe loss
    (``train_batch``, read from megatron DDP's ``main_grad``), on every rank."""
    worker = _worker(ckpt, layout, head, **(worker_options or {}))

    key = "values" if head == "value" else None

    def probe_loss(model_output, data, dp_group):
        loss = 0.0
        for k in scored:
            for row, out in zip(data["row"].tolist(), model_output[key or k].unbind()):
                loss = loss + (out * probes[k][row].to(out) * scored[k][row].to(out.device)).sum()
        return loss, {}

    # the worker's train_batch is engine.train_batch in the engine's train mode: zero the
    # gradients, forward_backward_batch, the optimizer's step; the gradients are read
    # before the step
    engine = worker.engine
    # what TrainingWorker.train_batch adds to a batch before handing it to the engine
    data = verl_engine.batch(rows, temperature=TEMPERATURE, use_remove_padding=True, use_dynamic_bsz=False,
                             micro_batch_size_per_gpu=MICRO_BATCH,
                             use_fused_kernels=engine.engine_config.use_fused_kernels)
    data["row"] = torch.arange(len(rows))
    with cpu_schedule_context(), engine.train_mode():  # which zeroes the gradients on exit
        engine.optimizer_zero_grad()
        engine.forward_backward_batch(data, probe_loss, forward_only=False)
        grads = gather_full_state(verl_engine.model_chunks(worker), "main_grad")
    data = verl_engine.batch(rows, temperature=TEMPERATURE, compute_loss=False)
    with cpu_schedule_context():
        outputs = _on_every_rank(worker.infer_batch(data), scored)
    return outputs, grads, worker


def _errors(prod: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    if not bool(torch.isfinite(prod).all()):
        return math.inf, float(ref.abs().max()) if ref.numel() else 0.0
    return float((prod.double() - ref.double()).abs().max()) if ref.numel() else 0.0, \
        float(ref.abs().max()) if ref.numel() else 0.0


def verl_agrees(ckpt: str, layout, head: str, worker_options: dict | None = None) -> tuple[bool, list[str]]:
    """verl's worker vs the oracle under the bf16 rule: (verdict agreed by every rank,
    failing rows)."""
    config = CustomSplitLlamaConfig.from_pretrained(ckpt)
    rows = _rows(config.vocab_size)
    scored = _scored(head, rows)
    probes = _probes(rows, tuple(scored))
    outs, grads, _ = run_verl(ckpt, layout, head, rows, probes, scored, worker_options)
    ref_out, ref_grads = _oracle(ckpt, head, rows, torch.float64, probes, scored)
    low_out, low_grads = _oracle(ckpt, head, rows, DTYPE, probes, scored)
    pairs = {k: tuple(torch.cat([o[m] for o, m in zip(per_row[k], mask)]) for per_row in (outs, ref_out, low_out))
             for k, mask in scored.items()}
    if set(grads) != set(ref_grads):
        return agree(False), [f"gradient names differ: {sorted(set(grads) ^ set(ref_grads))}"]
    pairs.update({f"grad {n}": (grads[n], ref_grads[n], low_grads[n]) for n in ref_grads})
    failures = []
    for name, (prod, ref, low) in pairs.items():
        err, scale = _errors(prod, ref)
        bound = bf16_allowed_error(_errors(low, ref)[0], scale)
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


def verl_checkpoint(factory, head: str = "lm", config=None, name: str = "verl") -> str:
    """A random split checkpoint drawn as the bf16 tests draw theirs, with verl's tokenizer
    beside it (written once by rank 0)."""
    from splitllama.verify.random_checkpoints import TEST_CHECKPOINT_INIT

    return with_tokenizer(factory(head, False, config=config, name=name, dtype=torch.float32,
                                  **TEST_CHECKPOINT_INIT[DTYPE]))


def with_tokenizer(path: str) -> str:
    """``path``, a checkpoint of the session's factory, with the tokenizer verl's workers
    read beside it (written once, by rank 0)."""
    if dist.get_rank() == 0 and not os.path.exists(os.path.join(path, "tokenizer.json")):
        verl_engine.save_tokenizer(path, CustomSplitLlamaConfig.from_pretrained(path).vocab_size)
    dist.barrier()
    return path


# the actor with verl's use_fused_kernels off (verl computes log-probs and entropy from the
# logits the model returns) and on (the model's fused head computes them), and the critic
WORKERS = {"actor": ("lm", False), "actor_fused": ("lm", True), "critic": ("value", False)}
# where test_verl_padded_vocabulary runs the actor without fused kernels on a padded vocabulary
ODD_VOCAB_LAYOUTS = ("tp2_sp", "tp2_pp2_vpp2")
# (worker, layout) pairs another case covers: the plain actor where the padded-vocabulary test
# runs it, the critic at PP=2 (TP=2 x PP=2 x VPP=2 pipelines it)
COVERED = {("actor", n) for n in ODD_VOCAB_LAYOUTS} | {("critic", "pp2_cut_adapter")}


def worker_cases():
    return [pytest.param(param.values[0], worker, id=f"{param.id}-{worker}")
            for param in layouts(*VERL_LAYOUTS) for worker in WORKERS
            if param.values[0] is None or (worker, param.id) not in COVERED]


@pytest.mark.parametrize("layout,worker", worker_cases())
def test_verl_worker_matches_oracle(layout, worker, checkpoint_factory):
    head, fused = WORKERS[worker]
    options = {"use_fused_kernels": True} if fused else {}
    ok, failures = verl_agrees(verl_checkpoint(checkpoint_factory, head), layout, head, options)
    assert ok, "\n".join(failures) or "another rank failed"


@pytest.mark.parametrize("layout", layouts(*ODD_VOCAB_LAYOUTS))
def test_verl_padded_vocabulary(layout, checkpoint_factory):
    """Vocabulary 301 at TP=2: the last rank's logits end in padded columns, which verl's
    entropy and cross entropy must see as probability 0 (finite, never -inf)."""
    from tests.integration.test_parity import odd_vocab_config

    ok, failures = verl_agrees(verl_checkpoint(checkpoint_factory, config=odd_vocab_config(), name="verl-odd-vocab"),
                               layout, "lm")
    assert ok, "\n".join(failures) or "another rank failed"


def float32_temperature_agrees(ckpt: str, layout) -> tuple[bool, list[str]]:
    """verl's inference (``infer_batch``, use_fused_kernels off: verl's own logits
    processing) on a float32 model (``params_dtype`` through verl's
    ``override_transformer_config``) with padded vocabulary columns (``ckpt``'s vocabulary
    301 at TP=2) at TEMPERATURE < 1, against the float64 oracle. verl divides the float32
    logits by the temperature in place: the padded columns' value must stay finite there
    (float32's most negative value overflows to -inf and verl's entropy turns NaN), which
    the bf16 and float64 runs cannot show."""
    config = CustomSplitLlamaConfig.from_pretrained(ckpt)
    rows = _rows(config.vocab_size)
    scored = _scored("lm", rows)
    worker = _worker(ckpt, layout, "lm", override_transformer_config={"params_dtype": "float32"})
    with cpu_schedule_context():
        outs = _on_every_rank(worker.infer_batch(verl_engine.batch(rows, temperature=TEMPERATURE,
                                                                   compute_loss=False)), scored)
    ref, _ = _oracle(ckpt, "lm", rows, torch.float64, _probes(rows, tuple(scored)), scored)
    failures = []
    for k, mask in scored.items():
        prod, want = (torch.cat([o[m] for o, m in zip(per_row[k], mask)]) for per_row in (outs, ref))
        err, scale = _errors(prod, want)
        # float32 logits and megatron's float32 cross entropy against float64: rounding only
        bound = TOLERANCE[torch.float32] * max(scale, 1e-30)
        if not err <= bound:
            failures.append(f"{k}: max abs error {err:.3g} > {bound:.3g} (max |ref| {scale:.3g})")
    return agree(not failures), failures


@pytest.mark.parametrize("layout", layouts("tp2"))
def test_verl_float32_logits_at_temperature_below_one(layout, checkpoint_factory):
    from tests.integration.test_parity import odd_vocab_config

    ok, failures = float32_temperature_agrees(
        verl_checkpoint(checkpoint_factory, config=odd_vocab_config(), name="verl-odd-vocab"), layout)
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
    """benchmarks/verl_engine.py (use_fused_kernels off and on, one GPU) end to end on the
    tiny model: both steps run and both paths agree with the oracle under the bf16 rule."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "verl_engine.py"
    spec = importlib.util.spec_from_file_location("verl_engine_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    report = bench.main(["--device", "cpu", "--tiny", "--tokens", "300", "--check-tokens", "200",
                         "--warmup", "0", "--repeats", "1", "--json", str(tmp_path / "out.json")])
    assert report["passed"], report["check"]
    assert report["off"]["ms"] > 0 and report["on"]["ms"] > 0


def _loaded_mismatches(worker, expected: dict[str, torch.Tensor]) -> list[str]:
    """Checkpoint names whose weight in the worker's model is not bit for bit ``expected``
    (cast to the model's dtype); every rank returns the same list."""
    got = gather_full_state(verl_engine.model_chunks(worker))
    return sorted(set(expected) ^ set(got)) + [n for n, t in expected.items()
                                                if n in got and not torch.equal(got[n], t.to(got[n].dtype))]


@pytest.mark.parametrize("layout", layouts("tp1", "tp2_sp"))
def test_verl_initial_weights_and_the_critic_from_the_actor_checkpoint(layout, checkpoint_factory, scratch_dir):
    """The weights verl's workers start from, every parameter bit for bit the checkpoint's
    (none left at its random init):

    * HF format (``model.path``, the bridge's ``load_weights``): the critic from the actor's
      checkpoint, whose value head (no ``score.weight`` there) is the bridge's fresh one;
    * ``use_dist_checkpointing``: verl reads ``dist_checkpointing_path`` (not ``model.path``)
      with ``load_mcore_dist_weights``, which throws away the state dict megatron's load
      returns, so the load itself must fill every parameter (the fused q/k/v and gate/up
      weights too); the critic from the actor's dist checkpoint likewise."""
    from splitllama.checkpoint import assemble, megatron_dist
    from splitllama.checkpoint.split import load_checkpoint
    from splitllama.verify.runner import build_production
    from tests.integration.test_checkpoints import read_all

    ckpt = verl_checkpoint(checkpoint_factory)
    config = CustomSplitLlamaConfig.from_pretrained(ckpt)
    setup_parallel(layout, DEVICE)
    chunks = build_production(config, layout, "lm", DTYPE, DEVICE)
    load_checkpoint(chunks, ckpt, progress=False)
    megatron_dist.save(chunks, scratch_dir)
    actor_weights = read_all(ckpt)
    critic_weights = {n: t for n, t in actor_weights.items() if n != "lm_head.weight"}
    critic_weights["score.weight"] = assemble.fresh_value_head(config, seed=0)
    # The split checkpoint's loader does not depend on the TP size the way megatron's in-place
    # blocks do (q/k/v per query group): HF format at TP=1 only, and there the critic only
    # (the actor's outputs and gradients equal the oracle's in test_verl_worker_matches_oracle).
    # At TP=2 the critic's dist load covers every fused weight; the LM head is the actor's.
    from_dist = {"dist_checkpointing_path": scratch_dir}
    cases = [("lm", from_dist), ("value", {}), ("value", from_dist)] if layout.tp == 1 else [("value", from_dist)]
    for head, options in cases:
        worker = _worker(ckpt, layout, head, **options)
        expected = actor_weights if head == "lm" else critic_weights
        assert _loaded_mismatches(worker, expected) == [], (head, options)


# ---- verl's SFT trainer -----------------------------------------------------------------------
SFT_STEPS, SFT_SAVE_AT = 4, 2


@pytest.mark.parametrize("layout", layouts("tp1"))
def test_verl_sft_trainer_trains_resumes_and_logs_mfu(layout, checkpoint_factory, scratch_dir, capsys):
    """verl's SFT trainer (``verl.trainer.sft_trainer``: hydra's config with ``engine=megatron
    model.external_lib=splitllama.bridge engine.vanilla_mbridge=True``, the ``SFTTrainer``
    ``main`` runs) on a parquet file of chats and the tokenizer beside the checkpoint: the
    loss falls, verl logs MFU > 0 (the bridge's FLOP model), and a run resumed from the
    checkpoint of step 2 (weights through the bridge, megatron's distributed optimizer in
    its fully reshardable format) ends bit for bit where the uninterrupted run ends."""
    import re

    ckpt = verl_checkpoint(checkpoint_factory)
    data = os.path.join(scratch_dir, "train.parquet")
    if dist.get_rank() == 0:
        verl_engine.sft_data(data, rows=16, vocab_size=CustomSplitLlamaConfig.from_pretrained(ckpt).vocab_size)
    dist.barrier()
    setup_parallel(layout, DEVICE)
    if DEVICE == "cpu":
        use_cpu_for_verl()
    common = ["data.train_batch_size=4", "data.micro_batch_size_per_gpu=2", "data.max_length=64", "optim.lr=1e-3",
              f"trainer.total_training_steps={SFT_STEPS}", f"trainer.save_freq={SFT_SAVE_AT}",
              "checkpoint.save_contents=[model,optimizer]", "engine.dist_ckpt_optim_fully_reshardable=True"]
    resume = ["trainer.resume_mode=resume_path",
              f"trainer.resume_from_path={os.path.join(scratch_dir, 'whole', f'global_step_{SFT_SAVE_AT}')}"]
    final = {}
    for run, extra in (("whole", []), ("resumed", resume)):
        config = verl_engine.sft_config(ckpt, layout, data, os.path.join(scratch_dir, run), DEVICE, common + extra)
        with cpu_schedule_context():
            trainer = verl_engine.sft_trainer(config)
            trainer.fit()
        final[run] = gather_full_state(verl_engine.model_chunks(trainer.training_client))
    log = capsys.readouterr().out
    steps = [int(s) for s in re.findall(r"^step:(\d+) ", log, re.M)]
    losses = [float(x) for x in re.findall(r"train/loss:(\S+)", log)]
    mfu = [float(x) for x in re.findall(r"train/mfu:(\S+)", log)]
    if dist.get_rank() == 0:  # the rank that logs
        assert steps == [*range(1, SFT_STEPS + 1), *range(SFT_SAVE_AT + 1, SFT_STEPS + 1)], steps
        assert losses[SFT_STEPS - 1] < losses[0], losses
        assert all(m > 0 for m in mfu) and len(mfu) == len(steps), mfu
    assert [n for n in final["whole"] if not torch.equal(final["whole"][n], final["resumed"][n])] == []
