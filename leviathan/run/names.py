"""Row and column names of every evaluation table, spelled once (torch-free).

Rows: the merged model, the merger with its state term zeroed (an ablation),
every member (`m{module}.{slot}`), then the training-free baselines built from
the members (the uniform mixture, the two posteriors, fixed share and the
decayed posterior). Columns of
the report: every domain's val split, the mixed val set, the domain-switch set;
the final table's view of a report names three of them per row: own (the
member's own domain), mixed and switch.
"""

from __future__ import annotations

MERGED = "merged"
UNIFORM = "uniform"
POSTERIOR = "posterior"
RUNNING_POSTERIOR = "running posterior"
FIXED_SHARE = "fixed share"
DECAYED_POSTERIOR = "decayed posterior"
NO_STATE = "merged (no state)"
# The training-free rows; "best baseline" in a report is the best of them per column.
BASELINES = (UNIFORM, POSTERIOR, RUNNING_POSTERIOR, FIXED_SHARE, DECAYED_POSTERIOR)
MEMBER_KIND = "member"

MIXED = "mixed"
SWITCH = "switch"
SWITCH_PRE = "switch pre"
OWN = "own"

# Metric keys of a report row: loss in nats per scored token, perplexity, bits per byte.
METRICS = ("loss", "ppl", "bpb")


def row_order(member_names: list[str], merged: bool) -> list[str]:
    """Row order of every table: merged and its no-state ablation (when there is a trained
    merger), the members, the baselines."""
    return ([MERGED, NO_STATE] if merged else []) + [*member_names, *BASELINES]


def row_kind(name: str) -> str:
    """A row's kind: its own name for merged, the ablation and the baselines, `member` for a member."""
    return name if name in (MERGED, NO_STATE) or name in BASELINES else MEMBER_KIND
