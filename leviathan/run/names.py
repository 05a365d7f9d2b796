"""Row and column names of every evaluation table, spelled once (torch-free).

Rows: the merged model, every member (`m{module}.{slot}`), then the baselines
built from the members (the uniform mixture and the two posteriors). Columns of
the report: every domain's val split, the mixed val set, the domain-switch set;
the final table's view of a report names three of them per row: own (the
member's own domain), mixed and switch.
"""

from __future__ import annotations

MERGED = "merged"
UNIFORM = "uniform"
POSTERIOR = "posterior"
RUNNING_POSTERIOR = "running posterior"
BASELINES = (UNIFORM, POSTERIOR, RUNNING_POSTERIOR)
MEMBER_KIND = "member"

MIXED = "mixed"
SWITCH = "switch"
OWN = "own"

# Metric keys of a report row: loss in nats per scored token, perplexity, bits per byte.
METRICS = ("loss", "ppl", "bpb")


def row_order(member_names: list[str], merged: bool) -> list[str]:
    """Row order of every table: merged (when there is a trained merger), the members, the baselines."""
    return ([MERGED] if merged else []) + [*member_names, *BASELINES]


def row_kind(name: str) -> str:
    """A row's kind: its own name for merged and the baselines, `member` for a member."""
    return name if name == MERGED or name in BASELINES else MEMBER_KIND
