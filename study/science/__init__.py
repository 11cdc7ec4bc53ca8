"""The science of lambda-compat: adapters, losses, regularisers, the trainer, preprocessing,
metrics and one trial (or one model sequence) on cached features.

Nothing in this package imports Ray, MLflow or YAML (a test walks the whole folder), so it
can be tested and reused alone: `from study.science.trial import run_trial`. The runner
(space, CLI, Ray Tune, MLflow, report) sits beside it in `study/` and imports it, never
the other way round.
"""
