"""The verification machinery behind ``splitllama check`` and the test suite: production
vs the oracle, outputs and every gradient, on a parallel layout. No product module imports
it at module level: only ``cli.py``'s ``check`` and ``rollout`` commands do, inside those
commands' functions, so ``import splitllama`` never loads it.

``tiny``               the built-in tiny model the check and the tests compare on
``rules``              what "equal" means (tolerances, the bf16 rule) and the report
``batches``            micro-batches, edge cases, and the loss that ties both models
``random_checkpoints`` the random split checkpoints compared on
``adapter_ties``       the bf16 rule at the mlp adapter's ReLU
``runner``             builds and runs both models, gathers gradients, compares; the
                       verdict every rank agrees on (``agree``)
``check``              the ``splitllama check`` job (the CLI prints what it returns)
``training``           one optimizer step through megatron's DDP, finalize_model_grads and
                       Adam against the oracle's AdamW step
``verl_engine``        verl's own actor and critic workers and SFT trainer, built from
                       verl's configs around this model, and verl's batches (tests,
                       benchmark)
``rollout``            the RL loop's data path: verl's export -> the oracle as a rollout engine
                       (``generate``) -> verl's old log-probs and its rollout-vs-trainer
                       metrics; the weight sync after an optimizer step (docs/rollout.md)
"""
