"""What a JobSpec resolves to before any worker starts: its `RunPlan`.

The spec is this layer's schema; `cluster/` below never imports it. Here it is
turned, once per job at its entry (`jobs.train.run`, each Tune trial), into the
plan the training layer consumes: the manifest and each module's domain
(checked against the manifest), the model library's `EnsembleConfig` and
`TrainingConfig`, the resources and the tracking settings. After that only the
plan travels.
"""

from __future__ import annotations

from typing import Any

from cluster.plan import Resources, RunPlan, Tracking
from jobs.spec import BUILTIN_MANIFEST, JobSpec, SpecError, check_manifest, resolve_manifest_path
from leviathan.config import EnsembleConfig
from leviathan.run.manifest import MANIFEST_FILE


def ensure_data(spec: JobSpec) -> None:
    """Prepare the built-in corpus when the spec uses it and it is not prepared yet."""
    if spec.data.manifest == BUILTIN_MANIFEST:
        from jobs.prepare import ensure_builtin

        ensure_builtin(spec.data.tokenizer)


def resolve_data(spec: JobSpec) -> tuple[str, list[str]]:
    """(manifest path, module i's domain for every module), checked before any worker starts.

    The built-in corpus must be prepared already (`jobs.prepare.ensure_builtin`).
    """
    if spec.data.manifest == BUILTIN_MANIFEST:
        from jobs.prepare import builtin_data_dir

        path = builtin_data_dir(spec.data.tokenizer) / MANIFEST_FILE
        if not path.is_file():
            raise SpecError(f"data.manifest: the built-in corpus is not prepared ({path}); run `leviathan prepare`")
        spec = spec.model_copy(update={"data": spec.data.model_copy(update={"manifest": str(path)})})
    manifest = check_manifest(spec)
    assert manifest is not None
    names = manifest.domain_names
    domains = spec.data.domains or names[: spec.ensemble.modules]
    return resolve_manifest_path(spec.data.manifest), list(domains)


def ensemble_config(spec: JobSpec, vocab_size: int) -> EnsembleConfig:
    """The spec's ensemble as a model-library `EnsembleConfig` (members module-major,
    context `spec.block_size`)."""
    return spec.ensemble.to_config(vocab_size, spec.block_size)


def resources_of(spec: JobSpec) -> Resources:
    """The spec's worker count and per-worker resources (placement is checked on these)."""
    r = spec.resources
    return Resources(
        num_workers=spec.num_workers, use_gpu=r.use_gpu, cpus_per_worker=r.cpus_per_worker,
        gpus_per_worker=r.gpus_per_worker, max_failures=r.max_failures,
    )


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts and lists as dotted keys with string values:
    {"training": {"lr": 0.003}, "ensemble": {"members": [{"preset": "tiny"}]}}
    -> {"training.lr": "0.003", "ensemble.members.0.preset": "tiny"}."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = ((str(i), v) for i, v in enumerate(value))
    else:
        return {prefix: str(value)}
    out: dict[str, str] = {}
    for key, v in items:
        out.update(flatten(v, f"{prefix}.{key}" if prefix else str(key)))
    return out


def tracking_of(spec: JobSpec) -> Tracking:
    """The spec's tracking table, with the flattened spec as the run's parameters."""
    t = spec.tracking
    params = flatten(spec.model_dump(mode="json", exclude={"tracking"}))
    return Tracking(
        mlflow_uri=t.mlflow_uri, experiment=t.experiment, tensorboard=t.tensorboard,
        params=tuple(sorted(params.items())),
    )


def build_plan(spec: JobSpec) -> RunPlan:
    """The spec's `RunPlan`: data resolved and checked against the manifest, the
    ensemble and training configs built. The built-in corpus must be prepared
    (`ensure_data`)."""
    from leviathan.data.staging import load_manifest

    manifest, domains = resolve_data(spec)
    return RunPlan(
        name=spec.name,
        seed=spec.seed,
        run_dir=spec.run_dir,
        manifest=str(manifest),
        domains=tuple(domains[: spec.ensemble.modules]),
        ensemble=ensemble_config(spec, load_manifest(manifest).vocab_size),
        training=spec.training.to_config(),
        resources=resources_of(spec),
        tracking=tracking_of(spec),
        spec_json=spec.to_json(),
    )


def build_job_trainer(spec: JobSpec, **kwargs: Any):
    """`cluster.trainer.build_trainer` for a spec's plan; kwargs (run_name, storage_path,
    callbacks, profile) pass through."""
    from cluster.trainer import build_trainer

    return build_trainer(build_plan(spec), **kwargs)
