"""Checkpoints of the production model, in one place:

``sharding``        how every weight is sharded over tensor parallelism, declared ONCE
                    (the loader, saver, export, dist checkpoints and the tests' gradient
                    gathering all read it)
``safetensors_io``  the one safetensors reader, the streaming sharded writer, size grammar
``directory``       checks a split checkpoint directory from its config and headers alone
                    (no megatron, no model: the command line refuses a bad path fast)
``assemble``        a split checkpoint from two Hugging Face Llama checkpoints, and the
                    fresh weights it may draw (adapter, value head)
``split``           split checkpoints <-> a model of any TP x PP layout: sharded load,
                    gathered save, the full-tensor export a rollout engine receives
``megatron_dist``   megatron ``dist_checkpointing`` of the model (``sharded_state_dict``):
                    saved at one layout, loaded at another

The tensor names themselves are ``splitllama.weight_names`` (data the oracle shares).
"""

from __future__ import annotations


def model_chunks(model_or_chunks) -> list:
    """A production model, or its list of virtual-pipeline chunks, as a list of chunks (what
    the checkpoint readers and writers walk); anything else is refused."""
    chunks = list(model_or_chunks) if isinstance(model_or_chunks, (list, tuple)) else [model_or_chunks]
    for chunk in chunks:
        if not hasattr(chunk, "stage") or not hasattr(chunk, "hf_config"):
            raise ValueError(f"expected a splitllama production model or list of chunks, got {type(chunk).__name__}")
    return chunks
