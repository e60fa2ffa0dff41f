"""Megatron distributed checkpoints (``splitllama.checkpoint.megatron_dist``): saved at one layout,
loaded at another, the weights are bit for bit the split checkpoint's; the declaration
covers every checkpoint tensor exactly once whatever the layout.

Each layout of a world size saves with that world's processes; the loads run at layouts
of fewer model-parallel ranks too (the rest of the world is data parallel), as a trainer
resuming at another layout would.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, apply_factories

from splitllama.checkpoint import megatron_dist
from splitllama import weight_names as wn
from splitllama.checkpoint.split import load_checkpoint
from splitllama.config import CustomSplitLlamaConfig
from splitllama.cpu_support import cuda_means_cpu
from splitllama.distributed import setup_parallel
from splitllama.grads import wrap_ddp
from splitllama.verify.runner import build_production, gather_full_state
from tests.integration.conftest import DEVICE, DTYPE, world_size
from tests.integration.layouts import LAYOUTS, layout_name, layouts
from tests.integration.test_checkpoints import read_all

# save layout -> (head, mlp adapter, the layouts each load runs at), per world size. At
# world 4 the save is TP=2 x PP=2 (a stage boundary inside the lower stack) and
# TP=2 x PP=2 x VPP=2 (a boundary at every cut); the loads at TP=1 and TP=2 + SP put every
# layer at another stage. The LM and value models alternate (they differ in the head only).
RESHARD = {
    "tp1": ("value", True, ("tp1",)),
    "tp2": ("lm", False, ("tp2_sp", "tp1", "pp2_vpp2")),
    "pp2_vpp2": ("value", True, ("tp2_sp", "tp1")),
    "tp2_sp_pp2": ("lm", False, ("tp1", "tp2_sp")),
    "tp2_pp2_vpp2": ("value", True, ("tp1", "tp2_sp")),
}


def reshard_loads(layout) -> list:
    """The layouts a checkpoint saved at ``layout`` is loaded at."""
    return [LAYOUTS[n] for n in RESHARD[layout_name(layout)][2]]


def build(ckpt: str, layout, head: str):
    config = CustomSplitLlamaConfig.from_pretrained(ckpt)
    setup_parallel(layout, DEVICE)
    return build_production(config, layout, head, DTYPE, DEVICE)


def dist_round_trip_mismatches(source: str, save_layout, load_layouts, head: str, directory: str) -> list[str]:
    """Load the split checkpoint ``source`` at ``save_layout``, save a distributed
    checkpoint, load it at each of ``load_layouts`` into a model whose weights are NaN;
    the names of tensors that did not come back bit for bit (the first failing load's,
    with its layout). Every rank returns the same list (the full state is gathered).

    The loads are megatron's own ``dist_checkpointing.load`` with the returned state dict
    thrown away, as verl's initial ``load_mcore_dist_weights`` and megatron's training loop
    use it: every parameter must be filled in place by the load itself."""
    chunks = build(source, save_layout, head)
    load_checkpoint(chunks, source, progress=False)
    megatron_dist.save(chunks, directory)
    expected = read_all(source)
    for layout in load_layouts:
        chunks = build(source, layout, head)
        with torch.no_grad():
            for chunk in chunks:
                for param in chunk.parameters():
                    param.fill_(float("nan"))
        with cuda_means_cpu():
            dist_checkpointing.load(megatron_dist.model_sharded_state_dict(chunks), directory)
        got = gather_full_state(chunks)
        bad = sorted(set(expected) ^ set(got)) + [
            name for name, tensor in expected.items()
            if name in got and not (got[name].dtype == tensor.dtype and torch.equal(got[name], tensor))
        ]
        if bad:
            return [f"{layout}: {name}" for name in bad]
    return []


def declaration_problems(ckpt: str, layout, head: str) -> list[str]:
    """What is wrong with the model's sharded state dict at ``layout``, over all ranks:
    every split-checkpoint tensor must be declared with its global shape and tiled by the
    main replicas' blocks exactly once, and nothing else declared. Every rank returns the
    same list."""
    chunks = build(ckpt, layout, head)
    blocks = []
    for chunk in chunks:
        state = chunk.sharded_state_dict()
        apply_factories(state)
        for value in state.values():
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, ShardedTensor) and not any(item.replica_id):
                    blocks.append((item.key, item.global_shape, item.global_offset, item.local_shape))
                elif not isinstance(item, (ShardedTensor, ShardedObject)):
                    blocks.append((f"not sharded: {type(item).__name__}", (), (), ()))
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, blocks)
    shapes = wn.split_checkpoint_shapes(CustomSplitLlamaConfig.from_pretrained(ckpt), head)
    cover = {name: torch.zeros(shape, dtype=torch.int32) for name, shape in shapes.items()}
    problems = []
    for key, global_shape, offset, local_shape in dict.fromkeys(b for part in gathered for b in part):
        if key not in shapes or tuple(global_shape) != shapes[key]:
            problems.append(f"{key} declared with global shape {global_shape}, expected {shapes.get(key)}")
            continue
        cover[key][tuple(slice(o, o + n) for o, n in zip(offset, local_shape))] += 1
    problems += [f"{name} covered {int(c.min())}..{int(c.max())} times" for name, c in cover.items()
                 if not bool((c == 1).all())]
    return problems


@pytest.mark.parametrize("layout", layouts(*RESHARD))
def test_dist_checkpoint_reshards_bitwise(layout, checkpoint_factory, scratch_dir):
    head, mlp, _ = RESHARD[layout_name(layout)]
    source = checkpoint_factory(head, mlp, name=f"round-trip-{DTYPE}", dtype=DTYPE)
    assert dist_round_trip_mismatches(source, layout, reshard_loads(layout), head, scratch_dir) == []
    assert os.path.exists(os.path.join(scratch_dir, "metadata.json"))


@pytest.mark.parametrize("layout", layouts("tp1", "tp2"))
def test_dist_checkpoint_of_a_padded_vocabulary(layout, checkpoint_factory, scratch_dir):
    """Vocabulary 301, padded to 302 at TP=2: the checkpoint holds the 301 real rows
    (an irregular grid over TP ranks), and loads at TP=1 (no padding) and back at TP=2."""
    from tests.integration.test_parity import odd_vocab_config

    source = checkpoint_factory("lm", False, config=odd_vocab_config(), name=f"odd_vocab-{DTYPE}", dtype=DTYPE)
    loads = [LAYOUTS["tp1"]] + ([LAYOUTS["tp2_sp"]] if world_size() == 2 else [])
    assert dist_round_trip_mismatches(source, layout, loads, "lm", scratch_dir) == []


@pytest.mark.parametrize("layout", layouts("tp2", "pp2_vpp2", "tp2_sp_pp2", "tp2_pp2_vpp2"))
def test_declaration_tiles_every_checkpoint_tensor_once(layout, checkpoint_factory):
    head, mlp, _ = RESHARD[layout_name(layout)]
    assert declaration_problems(checkpoint_factory(head, mlp), layout, head) == []


# ---- distributed optimizer: save after one step, resume, the next step is bitwise equal --------
# World 1: TP=1 in both formats; world 2: TP=2 in the model-space format, whose Adam state
# goes through the model's sharded state dict (the q/k/v, gate/up and vocabulary factories).
# verl's default format is resumed through verl's own checkpoint manager below, at TP=2 and at
# TP=2 x PP=2 x VPP=2.
RESUME = {1: ("tp1", ("dp_reshardable", "fully_reshardable")), 2: ("tp2", ("fully_reshardable",))}
# megatron's distributed optimizer takes float32 (or half) parameters only
OPTIMIZER_DTYPE = torch.float32


def trainer(source: str, layout):
    """The model chunks (weights from ``source``) wrapped in megatron's DDP, and megatron's
    distributed Adam over them."""
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, distrib_optimizer, get_megatron_optimizer

    if DEVICE == "cuda" and not distrib_optimizer.HAVE_APEX_OR_TE:
        # megatron's resume over torch's Adam shares one step counter between parameters;
        # cpu_support fixes that for CPU runs only
        pytest.skip("megatron's distributed optimizer without Transformer Engine or apex on CUDA")

    config = CustomSplitLlamaConfig.from_pretrained(source)
    setup_parallel(layout, DEVICE)
    chunks = build_production(config, layout, "lm", OPTIMIZER_DTYPE, DEVICE)
    load_checkpoint(chunks, source, progress=False)
    ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=True, overlap_grad_reduce=False)
    wrapped = wrap_ddp(chunks, ddp_config)
    with cuda_means_cpu():
        optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.01, use_distributed_optimizer=True,
                            params_dtype=OPTIMIZER_DTYPE), wrapped)
    return chunks, wrapped, optimizer


def snapshot(chunks) -> dict[str, torch.Tensor]:
    """Every weight under its checkpoint name, copied (gathering may return the live tensors)."""
    return {name: tensor.clone() for name, tensor in gather_full_state(chunks).items()}


def train_step(wrapped, optimizer) -> None:
    from megatron.core.distributed import finalize_model_grads

    from splitllama.pipeline import run_pipeline
    from splitllama.verify.batches import masked_probe
    from tests.integration.test_parity import log_prob_microbatches

    for chunk in wrapped:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()

    def forward_step(mb, model):
        out = model(mb.input_ids, mb.attention_mask, mb.position_ids, labels=mb.labels)
        return out, lambda output: ((output * masked_probe(mb, output)).sum(), {})

    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        run_pipeline(wrapped, log_prob_microbatches(), forward_step)
    else:  # the classes without pipeline stages take no input tensor from a schedule
        for mb in log_prob_microbatches():
            out, loss = forward_step(mb, wrapped[0])
            loss(out)[0].backward()
    with cuda_means_cpu():
        finalize_model_grads(wrapped)
        updated, _, _ = optimizer.step()
    assert updated


OPTIMIZER_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}


def save_optimizer(chunks, optimizer, directory: str, sharding: str) -> None:
    metadata = {**OPTIMIZER_METADATA, "distrib_optim_sharding_type": sharding}
    with cuda_means_cpu():
        state = optimizer.sharded_state_dict(megatron_dist.model_sharded_state_dict(chunks), metadata=metadata)
        dist_checkpointing.save(state, directory)


def load_optimizer(chunks, optimizer, directory: str, sharding: str) -> None:
    metadata = {**OPTIMIZER_METADATA, "distrib_optim_sharding_type": sharding}
    with cuda_means_cpu():
        state = optimizer.sharded_state_dict(megatron_dist.model_sharded_state_dict(chunks), is_loading=True,
                                             metadata=metadata)
        loaded = dist_checkpointing.load(state, directory)
    # megatron copies into float32 main parameters that are views of the model's leaves
    with torch.no_grad():
        optimizer.load_state_dict(loaded)


# dp_reshardable: verl's default (Adam's state in the optimizer's own buckets); fully_reshardable:
# Adam's state in the model's space, mapped through the model's sharded state dict
def resume_shardings() -> list:
    if world_size() not in RESUME:
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"no resume layout at world {world_size()}"))]
    return list(RESUME[world_size()][1])


@pytest.mark.parametrize("sharding", resume_shardings())
def test_distributed_optimizer_resumes_bitwise(sharding, checkpoint_factory, tmp_path_factory):
    from tests.integration.conftest import shared_tmpdir

    layout = LAYOUTS[RESUME[world_size()][0]]
    source = checkpoint_factory("lm", False)
    model_dir, optimizer_dir = (os.path.join(shared_tmpdir(tmp_path_factory), name) for name in ("model", "optim"))

    chunks, wrapped, optimizer = trainer(source, layout)
    train_step(wrapped, optimizer)
    megatron_dist.save(chunks, model_dir)
    if dist.get_rank() == 0:
        os.makedirs(optimizer_dir)
    dist.barrier()
    save_optimizer(chunks, optimizer, optimizer_dir, sharding)
    train_step(wrapped, optimizer)
    expected = snapshot(chunks)

    chunks, wrapped, optimizer = trainer(source, layout)  # weights of step 0, fresh Adam
    megatron_dist.load(chunks, model_dir)
    load_optimizer(chunks, optimizer, optimizer_dir, sharding)
    train_step(wrapped, optimizer)
    resumed = snapshot(chunks)
    assert [n for n in expected if not torch.equal(expected[n], resumed[n])] == []

    if world_size() > 1:
        return
    # without Adam's state the same step moves the weights elsewhere: the check can fail
    chunks, wrapped, optimizer = trainer(source, layout)
    megatron_dist.load(chunks, model_dir)
    train_step(wrapped, optimizer)
    fresh = gather_full_state(chunks)
    assert all(not torch.equal(expected[n], fresh[n]) for n in expected)


# ---- verl's own checkpoint manager -----------------------------------------------------------
def _verl_checkpoint_manager(checkpoint_factory, tmp_path_factory, fully_reshardable: bool):
    """(the split checkpoint's config and path, the step directory every rank sees, a function
    building verl 0.9.1's ``MegatronCheckpointManager`` around ``(chunks, wrapped, optimizer)``
    with dist checkpointing, model and optimizer contents, and ``fully_reshardable`` as
    ``dist_ckpt_optim_fully_reshardable``)."""
    manager_module = pytest.importorskip("verl.utils.checkpoint.megatron_checkpoint_manager")
    from omegaconf import OmegaConf

    from tests.integration.conftest import shared_tmpdir

    source = checkpoint_factory("lm", False)
    config = CustomSplitLlamaConfig.from_pretrained(source)
    directory = os.path.join(shared_tmpdir(tmp_path_factory), "global_step_1")
    contents = ["model", "optimizer"]
    verl_config = OmegaConf.create({"model": {"path": source},
                                    "megatron": {"dist_ckpt_optim_fully_reshardable": fully_reshardable,
                                                 "distrib_optim_fully_reshardable_mem_efficient": False}})
    checkpoint_config = OmegaConf.create({"save_contents": contents, "load_contents": contents,
                                          "async_save": False})

    def manager(chunks, wrapped, optimizer):
        return manager_module.MegatronCheckpointManager(
            config=verl_config, checkpoint_config=checkpoint_config, model_config=config,
            transformer_config=chunks[0].config, role="actor", model=torch.nn.ModuleList(wrapped),
            arch=config.architectures[0], hf_config=config, param_dtype=OPTIMIZER_DTYPE,
            share_embeddings_and_output_weights=False, processing_class=None, optimizer=optimizer,
            optimizer_scheduler=None, use_distributed_optimizer=True, use_dist_checkpointing=True)

    return config, source, directory, manager, manager_module


@pytest.mark.parametrize("layout", layouts("tp2", "tp2_pp2_vpp2"))
def test_verl_checkpoint_manager_resumes_bitwise(layout, checkpoint_factory, tmp_path_factory):
    """verl 0.9.1's ``MegatronCheckpointManager`` (unmodified) with dist checkpointing saves
    the model and megatron's distributed optimizer after one step and resumes them into a
    fresh trainer; the next step is bit for bit the uninterrupted run's. Its RNG ("extra")
    content is left out: on CPU megatron's RNG tracker holds no CUDA states to restore."""
    config, source, directory, manager, manager_module = _verl_checkpoint_manager(
        checkpoint_factory, tmp_path_factory, fully_reshardable=False)

    chunks, wrapped, optimizer = trainer(source, layout)
    train_step(wrapped, optimizer)
    step_1 = snapshot(chunks)
    with cuda_means_cpu():
        manager(chunks, wrapped, optimizer).save_checkpoint(directory, global_step=1)
    train_step(wrapped, optimizer)
    expected = snapshot(chunks)

    # the model's own dist checkpoint holds the weights of step 1 (the optimizer's holds
    # them too, as its float32 main parameters, so the resume alone would not show it)
    fresh = build_production(config, layout, "lm", OPTIMIZER_DTYPE, DEVICE)
    with torch.no_grad():
        for param in (p for chunk in fresh for p in chunk.parameters()):
            param.fill_(float("nan"))
    megatron_dist.load(fresh, manager_module.get_model_dist_checkpoint_path(directory))
    loaded = gather_full_state(fresh)
    assert [n for n in step_1 if not torch.equal(step_1[n], loaded[n])] == []

    chunks, wrapped, optimizer = trainer(source, layout)
    # megatron copies into float32 main parameters that are views of the model's leaves
    with cuda_means_cpu(), torch.no_grad():
        manager(chunks, wrapped, optimizer).load_checkpoint(directory)
    train_step(wrapped, optimizer)
    resumed = snapshot(chunks)
    assert [n for n in expected if not torch.equal(expected[n], resumed[n])] == []


def _gpt_trainer():
    """megatron's own GPTModel (local layer spec, 2 layers) in megatron's DDP with its
    distributed Adam, after one step (Adam's states exist)."""
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, use_cpu_initialization=True,
                               hidden_dropout=0.0, attention_dropout=0.0,
                               params_dtype=OPTIMIZER_DTYPE, pipeline_dtype=OPTIMIZER_DTYPE)
    model = GPTModel(config, get_gpt_layer_local_spec(), vocab_size=256, max_sequence_length=32)
    wrapped = wrap_ddp([model], DistributedDataParallelConfig(use_distributed_optimizer=True))
    with cuda_means_cpu():
        optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, use_distributed_optimizer=True,
                                                           params_dtype=OPTIMIZER_DTYPE), wrapped)
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    wrapped[0].zero_grad_buffer()
    with cuda_means_cpu():  # its causal mask is made on "cuda"
        wrapped[0](ids, torch.arange(16)[None], None).float().square().mean().backward()
        optimizer.step()
    return [model], wrapped, optimizer


@pytest.mark.parametrize("layout", layouts("tp1"))
def test_verl_fully_reshardable_resume_fails_in_verl_for_gptmodel_too(layout, checkpoint_factory, tmp_path_factory):
    """verl 0.9.1's own defect: with ``use_dist_checkpointing`` and
    ``dist_ckpt_optim_fully_reshardable``, ``MegatronCheckpointManager.load_checkpoint`` builds
    the model's sharded state dict once, loads the weights with it (megatron's load swaps each
    ShardedTensor's data for a detached tensor), then hands the same dict to the distributed
    optimizer, which finds parameters by identity: ``Model param ... not in
    model_sharded_state_dict``. This model stops there (verl's SFT trainer and this manager
    alike); so does megatron's own GPTModel, shown here. docs/verl.md gives the two ways
    around it, both resumed bitwise in the tests (weights through the bridge with the fully
    reshardable optimizer: test_verl's SFT run; dist checkpointing with verl's default
    optimizer format: test_verl_checkpoint_manager_resumes_bitwise). Should this test fail,
    verl has fixed its loader: drop the note from docs/verl.md."""
    config, source, directory, manager, manager_module = _verl_checkpoint_manager(
        checkpoint_factory, tmp_path_factory, fully_reshardable=True)

    def built():
        setup_parallel(layout, DEVICE)
        return _gpt_trainer()

    saving = manager(*built())
    with cuda_means_cpu():
        saving.save_checkpoint(directory, global_step=1)
    loading = manager(*built())
    with cuda_means_cpu(), torch.no_grad(), \
            pytest.raises(ValueError, match=r"(?s)^Model param .* not in model_sharded_state_dict"):
        loading.load_checkpoint(directory)
