"""What a JobSpec resolves to before any worker starts.

The spec is this layer's schema; `cluster/` below never imports it. Here it is
turned into what the training layer consumes: the manifest and each module's
domain (checked against the manifest), and the model library's
`EnsembleConfig`. `build_job_trainer` is the one place that hands both to
`cluster.trainer.build_trainer`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jobs.spec import BUILTIN_MANIFEST, JobSpec, SpecError, check_manifest, resolve_manifest_path

DEFAULT_BLOCK_SIZE = 256


def resolve_data(spec: JobSpec) -> tuple[str, list[str]]:
    """(manifest path, module i's domain for every module), checked before any worker starts.

    The built-in corpus must be prepared already (`jobs.prepare.ensure_builtin`).
    """
    if spec.data.manifest == BUILTIN_MANIFEST:
        from jobs.prepare import builtin_data_dir

        path = builtin_data_dir(spec.data.tokenizer) / "manifest.json"
        if not path.is_file():
            raise SpecError(f"data.manifest: the built-in corpus is not prepared ({path}); run `leviathan prepare`")
        spec = spec.model_copy(update={"data": spec.data.model_copy(update={"manifest": str(path)})})
    manifest = check_manifest(spec)
    assert manifest is not None
    names = [d["name"] for d in manifest["domains"]]
    domains = spec.data.domains or names[: spec.ensemble.modules]
    return resolve_manifest_path(spec.data.manifest), list(domains)


def ensemble_config(spec: JobSpec, vocab_size: int):
    """The spec's ensemble as a model-library `EnsembleConfig` (members module-major).

    Members accept contexts of at least `training.seq_len` tokens (block size
    max(256, seq_len)) so a model trained on long windows can still generate
    past them.
    """
    from leviathan.config import ComponentConfig, EnsembleConfig

    e = spec.ensemble
    block = max(DEFAULT_BLOCK_SIZE, spec.training.seq_len)
    members = [
        ComponentConfig.preset(
            m.preset, flavour=m.flavour, mixer=e.mixer, window=e.window,
            vocab_size=vocab_size, block_size=block,
        )
        for m in e.member_specs()
    ]
    return EnsembleConfig(
        members=members,
        modules=e.modules,
        members_per_module=e.members_per_module,
        merge=e.merge,
        merge_width=e.merge_width,
        merge_heads=e.merge_heads,
        merge_window=e.effective_merge_window,
        mixer=e.mixer,
    )


def build_job_trainer(spec: JobSpec, **kwargs: Any):
    """`cluster.trainer.build_trainer` for a spec: data resolved and checked, the
    ensemble config built; kwargs (run_name, storage_path, callbacks, profile) pass through."""
    from cluster.trainer import build_trainer
    from leviathan.data import load_manifest

    manifest, domains = resolve_data(spec)
    config = ensemble_config(spec, load_manifest(manifest).vocab_size)
    return build_trainer(spec, manifest=manifest, domains=domains, ensemble=config, **kwargs)
