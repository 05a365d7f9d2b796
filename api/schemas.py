"""Request and response models of the REST API.

The request body of `POST /v1/jobs` is `jobs.spec.JobSpec` itself: the API accepts
that typed spec and nothing else (never a command line).
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from leviathan.run.records import RECORD_TYPES

JobStatusName = Literal["PENDING", "RUNNING", "STOPPED", "SUCCEEDED", "FAILED"]


class ErrorBody(BaseModel):
    detail: str


class JobSubmitted(BaseModel):
    job_id: str = Field(description="Ray submission id: leviathan-<run name>.")
    run_name: str = Field(description="<spec name>-<6 hex>: the run folder's name.")
    run_dir: str
    status: JobStatusName
    dashboard_url: str


class JobSummary(BaseModel):
    job_id: str = Field(description="Ray submission id.")
    status: JobStatusName
    message: str | None = None
    leviathan: bool = Field(
        description=(
            "A Leviathan training job: submitted through this API, or a `ray job submit` of "
            "`python -m jobs.train` (progress needs its run folder under the API's storage root)."
        )
    )
    spec_name: str | None = None
    run_name: str | None = None
    run_dir: str | None = None
    entrypoint: str
    start_time: datetime | None = None
    end_time: datetime | None = None
    dashboard_url: str


class JobList(BaseModel):
    jobs: list[JobSummary]
    total: int = Field(description="Jobs matching the filter, before pagination.")
    limit: int
    offset: int


class MemberProgress(BaseModel):
    """Latest figures of one member (or of the merged model / uniform mixture)."""

    member: str = Field(description="m<module>.<slot>, 'merged' or 'uniform'.")
    module: int | None = None
    phase: str | None = None
    step: int | None = None
    domain: str | None = None
    train_loss: float | None = None
    val_loss: float | None = None
    mixed_val_loss: float | None = None
    lr: float | None = None
    tokens_per_s: float | None = None
    updated_at: float | None = Field(None, description="Unix time of the member's latest record.")


class JobDetail(JobSummary):
    error_type: str | None = None
    driver_exit_code: int | None = None
    phase: str | None = Field(
        None, description="members | merge | final | done, from the latest metrics record; null before any."
    )
    step: int | None = Field(None, description="Step of the latest metrics record.")
    phase1_steps: int | None = None
    phase2_steps: int | None = None
    members: list[MemberProgress] | None = Field(
        None, description="Per-member progress (Leviathan jobs only)."
    )
    metrics_records: int | None = None
    metrics_updated_at: datetime | None = None
    tokens_per_s: dict[str, float] | None = Field(
        None, description="Training tokens/s of the whole job per phase (members, merge) at its latest report."
    )
    eta_s: float | None = Field(
        None, description="Seconds left as of metrics_updated_at: steps left in the schedule at the recent step rate."
    )


# One line of metrics.jsonl, every field of `leviathan.run.records` nullable (unknown keys are kept).
MetricRecord = create_model(
    "MetricRecord",
    __config__=ConfigDict(extra="allow"),
    **{name: (kind | None, None) for name, kind in RECORD_TYPES.items()},
)


class MetricsPage(BaseModel):
    job_id: str
    run_dir: str | None = Field(None, description="Null when the job has no run folder the API may read.")
    since_step: int | None = None
    records: list[MetricRecord]
    last_step: int | None = Field(None, description="Pass as since_step to get only newer records.")


class StopResult(BaseModel):
    job_id: str
    stopped: bool = Field(description="True if the job was still running and Ray was asked to stop it.")
    status: JobStatusName


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    ray: Literal["ok", "unreachable", "unauthorized"]


# ----------------------------------------------------------------------------- runs

RunState = Literal["running", "finished", "stopped", "failed"]


class RunFigures(BaseModel):
    """The headline figures of a finished run, from its train_result.json."""

    wall_time_s: float | None = None
    mixed_val_loss: dict[str, float] = Field(
        default_factory=dict, description="Loss per token on the mixed val set, per report row ('merged', "
                                          "members, 'uniform', ...)."
    )
    switch_val_loss: dict[str, float] = Field(
        default_factory=dict, description="Loss per token on the domain-switch set, per report row."
    )
    merged_beats_every_member: bool | None = None
    merged_beats_uniform: bool | None = None


class RunSummary(BaseModel):
    name: str = Field(description="The run folder's name: <storage root>/<name>.")
    run_dir: str
    state: RunState = Field(
        description=(
            "running: a Ray job that has not ended writes it; finished: train_result.json exists; "
            "stopped: it has checkpoints but no result (it failed or was stopped, and can resume); "
            "failed: neither (it ended before its first checkpoint)."
        )
    )
    owner: str | None = Field(None, description="Who submitted it through the API; null: an admin's run.")
    job_id: str | None = Field(None, description="The Ray job writing it now (state running), else null.")
    job_status: str | None = None
    phase: str | None = Field(None, description="members | merge | final | done, from the metrics log.")
    step: int | None = Field(None, description="Step of the metrics log's latest record.")
    created_at: datetime | None = Field(None, description="When spec.json was written.")
    updated_at: datetime | None = Field(None, description="Time of the metrics log's latest record.")
    figures: RunFigures | None = Field(None, description="Null until the run is finished.")


class RunList(BaseModel):
    runs: list[RunSummary]
    total: int = Field(description="Runs matching the filter, before pagination.")
    limit: int
    offset: int


class RunDetail(RunSummary):
    spec: dict | None = Field(None, description="The run's spec.json.")
    checkpoints: list[str] = Field(default_factory=list, description="Ray Train checkpoint folders, oldest first.")
    metrics_records: int | None = None
    has_report: bool = Field(False, description="report.json exists: GET /v1/runs/{name}/report.")
    has_final: bool = Field(False, description="final/ exists: GET /v1/runs/{name}/artifacts.")


class Artifact(BaseModel):
    path: str = Field(description="Relative to final/: GET /v1/runs/{name}/artifacts/{path}.")
    size: int
    sha256: str


class ArtifactList(BaseModel):
    name: str
    artifacts: list[Artifact]


class GenerateRequest(BaseModel):
    """`POST /v1/runs/{name}/generate`: what to sample from the run's Serve deployment."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field("", max_length=65536, description="Text to continue; empty: a new document.")
    max_new_tokens: int = Field(64, ge=1, description="Tokens to generate (at most the API's max_new_tokens).")
    temperature: float = Field(1.0, ge=0, allow_inf_nan=False, description="0 = greedy.")
    top_k: int | None = Field(None, ge=1, description="Sample from the k most likely tokens only.")
    seed: int = Field(0, ge=0, le=2**63 - 1, description="The same seed gives the same text.")
    k: int | None = Field(None, ge=1, description="Sparse routing: members run per sequence (default: the "
                                                   "deployment's; all members = no routing).")
    every: int | None = Field(None, ge=1, description="Sparse routing: tokens between routing choices "
                                                       "(default: the deployment's).")


class GenerateAnswer(BaseModel):
    """The whole continuation, for a client that did not ask for `text/event-stream`."""

    name: str = Field(description="The run.")
    text: str = Field(description="The generated text only (not the prompt).")
    tokens: list[int] = Field(description="The generated token ids.")
    prompt_tokens: int = Field(description="Tokens of the prompt the model saw (cropped to its block size).")
    finish_reason: str
    routed_members: int | None = Field(description="k when the sequence was routed; null: every member ran.")
