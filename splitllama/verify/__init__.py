"""The verification machinery behind ``splitllama check`` and the test suite: production
vs the oracle, outputs and every gradient, on a parallel layout. The product never
imports this package.

``rules``              what "equal" means (tolerances, the bf16 rule) and the report
``batches``            micro-batches, edge cases, and the loss that ties both models
``random_checkpoints`` the random split checkpoints compared on
``adapter_ties``       the bf16 rule at the mlp adapter's ReLU
``runner``             builds and runs both models, gathers gradients, compares
``check``              the ``splitllama check`` job (the CLI prints what it returns)
"""
