"""verl 0.9.1's own actor and critic workers around this model (tests, benchmark).

verl's PPO trainer builds each training role as a ``TrainingWorker``
(``verl/workers/engine_workers.py``) from its ``ppo_megatron_trainer.yaml`` config: the
actor in ``ActorRolloutRefWorker.init_model``, the critic in ``RayPPOTrainer.init_workers``
(``verl/trainer/ppo/ray_trainer.py``). ``actor_worker`` and ``critic_worker`` do what those
do, in this process: verl's configuration dataclasses from the config's values
(``verl_config``: verl's own flattened ``_generated_ppo_megatron_trainer.yaml`` with this
model's path, ``external_lib=splitllama.bridge``, the parallel layout and the options a
test names), then ``TrainingWorker(config)`` and ``reset()``. The worker's engine
(``MegatronEngineWithLMHead`` / ``MegatronEngineWithValueHead``) builds, loads and trains
the model through ``splitllama.bridge``; nothing here sets an engine attribute.

verl reads a tokenizer from the model's directory: ``save_tokenizer`` writes one made with
the ``tokenizers`` library (one word per token id). On CPU, ``cpu_support.use_cpu_for_verl()``
must run first, and every call into the worker runs inside ``cpu_support.cpu_schedule_context()``.

Needs verl and mbridge (``pip install --no-deps verl==0.9.1 mbridge==0.15.1`` plus the
``verl-ci`` extra; docs/verl.md).
"""

from __future__ import annotations

import os

import torch

# A chat template for verl's SFT dataset (``MultiTurnSFTDataset`` applies the tokenizer's):
# each message's content, then the end-of-sequence token.
CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }} {{ eos_token }} {% endfor %}"
PAD, EOS, BOS = "t0", "t1", "t2"


def save_tokenizer(directory: str, vocab_size: int) -> None:
    """A word-level tokenizer with ``vocab_size`` tokens ``t0 .. t{V-1}`` (token ``t{i}`` is
    id ``i``), saved into ``directory`` as ``transformers`` reads it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token=PAD))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=PAD, eos_token=EOS, bos_token=BOS,
                                   unk_token=PAD, chat_template=CHAT_TEMPLATE)
    fast.save_pretrained(directory)


def verl_config(model_path: str, layout, *, use_fused_kernels: bool = False, micro_batch_size: int = 2,
                dist_checkpointing_path: str | None = None, dist_ckpt_optim_fully_reshardable: bool = False,
                lr: float = 1e-6, clip_grad: float = 1.0, total_training_steps: int = 10,
                override_transformer_config: dict | None = None):
    """verl's PPO trainer config (its ``ppo_megatron_trainer.yaml`` values) for this model
    at ``layout`` (a ``layout.ParallelLayout``), actor and critic alike.
    ``override_transformer_config``: verl's megatron overrides (e.g. ``params_dtype``, which
    the bridge lets replace the engine's bf16, ``megatron_configs.engine_configs``)."""
    import verl
    from omegaconf import OmegaConf

    path = os.path.join(os.path.dirname(verl.__file__), "trainer", "config", "_generated_ppo_megatron_trainer.yaml")
    config = OmegaConf.load(path)
    for role in (config.actor_rollout_ref.actor, config.critic):
        megatron = role.megatron
        megatron.tensor_model_parallel_size = layout.tp
        megatron.sequence_parallel = layout.sp
        megatron.pipeline_model_parallel_size = layout.pp
        megatron.virtual_pipeline_model_parallel_size = layout.vpp
        megatron.vanilla_mbridge = True  # mbridge, this package's bridge (not Megatron-Bridge)
        megatron.use_dist_checkpointing = dist_checkpointing_path is not None
        megatron.dist_checkpointing_path = dist_checkpointing_path
        megatron.dist_ckpt_optim_fully_reshardable = dist_ckpt_optim_fully_reshardable
        if override_transformer_config:
            megatron.override_transformer_config = dict(override_transformer_config)
        role.optim.lr = lr
        role.optim.clip_grad = clip_grad
        role.optim.total_training_steps = total_training_steps
    for model in (config.actor_rollout_ref.model, config.critic.model):
        model.path = model_path
        model.external_lib = "splitllama.bridge"
    config.actor_rollout_ref.model.use_fused_kernels = use_fused_kernels
    config.actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu = micro_batch_size
    config.actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu = micro_batch_size
    config.critic.ppo_micro_batch_size_per_gpu = micro_batch_size
    return config


def launcher_environment() -> None:
    """verl's ``Worker`` (``TrainingWorker``'s base) reads the launcher's ``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` and only records them when a process
    group already exists, as here. torchrun sets them; a world of one made in this process
    without a launcher (``distributed.init_distributed``: an in-memory store) has no
    rendezvous address, so the loopback and port 0 are recorded (never connected to)."""
    import torch.distributed as dist

    assert dist.is_initialized(), "verl's workers are built after the process group"
    os.environ.setdefault("RANK", str(dist.get_rank()))
    os.environ.setdefault("WORLD_SIZE", str(dist.get_world_size()))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "0")


def actor_worker(config):
    """The actor's ``TrainingWorker``, built as ``ActorRolloutRefWorker.init_model`` builds it."""
    from verl.utils.config import omega_conf_to_dataclass
    from verl.workers.engine_workers import TrainingWorker, TrainingWorkerConfig

    model_config = omega_conf_to_dataclass(config.actor_rollout_ref.model)
    actor = omega_conf_to_dataclass(config.actor_rollout_ref.actor)
    actor.model_config = model_config
    worker_config = TrainingWorkerConfig(model_type="language_model", model_config=model_config,
                                         engine_config=actor.engine, optimizer_config=actor.optim,
                                         checkpoint_config=actor.checkpoint)
    engine, actor_omega, rollout = worker_config.engine_config, config.actor_rollout_ref.actor, \
        config.actor_rollout_ref.rollout
    engine.use_dynamic_bsz = actor_omega.use_dynamic_bsz
    engine.infer_max_token_len_per_gpu = rollout.log_prob_max_token_len_per_gpu
    engine.infer_micro_batch_size_per_gpu = rollout.log_prob_micro_batch_size_per_gpu
    engine.max_token_len_per_gpu = actor_omega.ppo_max_token_len_per_gpu
    engine.micro_batch_size_per_gpu = actor_omega.ppo_micro_batch_size_per_gpu
    engine.use_remove_padding = model_config.get("use_remove_padding", False)
    launcher_environment()
    worker = TrainingWorker(config=worker_config)
    worker.reset()
    return worker


def critic_worker(config):
    """The critic's ``TrainingWorker``, built as ``RayPPOTrainer.init_workers`` builds it."""
    from verl.utils.config import omega_conf_to_dataclass
    from verl.workers.engine_workers import TrainingWorker, TrainingWorkerConfig

    critic = omega_conf_to_dataclass(config.critic)
    engine = critic.engine
    engine.infer_max_token_len_per_gpu = critic.ppo_infer_max_token_len_per_gpu
    engine.max_token_len_per_gpu = critic.ppo_max_token_len_per_gpu
    launcher_environment()
    worker = TrainingWorker(config=TrainingWorkerConfig(model_type="value_model", model_config=critic.model,
                                                        engine_config=engine, optimizer_config=critic.optim,
                                                        checkpoint_config=critic.checkpoint))
    worker.reset()
    return worker


def rows_as_nested(rows: list[torch.Tensor]) -> torch.Tensor:
    """verl's no-padding batch layout: one jagged nested tensor ``[batch, j]``."""
    return torch.nested.as_nested_tensor(rows, layout=torch.jagged)


def batch(rows: list[torch.Tensor], *, temperature: float = 1.0, calculate_entropy: bool = True, **extra):
    """A verl batch of token rows (no padding), as its trainer hands them to a worker;
    ``extra``: more non-tensor entries (``micro_batch_size_per_gpu``, ``compute_loss``, ...)."""
    from tensordict.tensorclass import NonTensorData
    from verl.utils import tensordict_utils as tu

    return tu.get_tensordict(
        {"input_ids": rows_as_nested(rows), "loss_mask": rows_as_nested([torch.ones_like(r) for r in rows]),
         "temperature": torch.full((len(rows),), temperature)},
        {"calculate_entropy": calculate_entropy, "global_token_num": NonTensorData([len(r) for r in rows]),
         **extra},
    )


def model_chunks(worker) -> list[torch.nn.Module]:
    """The worker's model chunks, unwrapped from megatron's DDP."""
    from mbridge.core.util import unwrap_model

    return [unwrap_model(m) for m in worker.engine.module]


def sft_data(path: str, rows: int, vocab_size: int, seed: int = 0) -> None:
    """A parquet file of ``rows`` two-turn chats (a user turn and an assistant turn of a
    few tokens each, in the words of ``save_tokenizer``), as verl's SFT dataset reads it."""
    import pandas as pd

    gen = torch.Generator().manual_seed(seed)

    def words(n: int) -> str:
        return " ".join(f"t{int(i)}" for i in torch.randint(3, vocab_size, (n,), generator=gen))

    chats = [[{"role": "user", "content": words(3 + k % 4)}, {"role": "assistant", "content": words(2 + k % 3)}]
             for k in range(rows)]
    pd.DataFrame({"messages": chats}).to_parquet(path)


def sft_config(model_path: str, layout, train_file: str, out_dir: str, device: str, overrides: list[str] = ()):
    """verl's SFT trainer config (``sft_trainer_engine.yaml`` with ``engine=megatron``,
    composed by hydra as ``python -m verl.trainer.sft_trainer`` composes it) for this model
    at ``layout`` on ``device`` ("cuda" or "cpu"); ``overrides``: more command-line overrides."""
    import verl
    from hydra import compose, initialize_config_dir

    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return compose(config_name="sft_trainer_engine", overrides=[
            "engine=megatron", "optim=megatron", f"model.path={model_path}", "model.external_lib=splitllama.bridge",
            "engine.use_mbridge=True", "engine.vanilla_mbridge=True", "data.pad_mode=no_padding",
            f"engine.tensor_model_parallel_size={layout.tp}", f"engine.sequence_parallel={layout.sp}",
            f"engine.pipeline_model_parallel_size={layout.pp}",
            f"engine.virtual_pipeline_model_parallel_size={layout.vpp or 'null'}",
            f"data.train_files={train_file}", "data.num_workers=0", "data.use_dynamic_bsz=False",
            f"trainer.default_local_dir={out_dir}", "trainer.logger=[console]", f"trainer.device={device}",
            *overrides])


def sft_trainer(config):
    """verl's ``SFTTrainer`` of ``config``, built as its ``main`` builds it (``run_sft`` also
    makes the process group, which exists here)."""
    from verl.trainer.sft_trainer import SFTTrainer
    from verl.utils.device import auto_set_device

    auto_set_device(config)
    launcher_environment()
    return SFTTrainer(config)
