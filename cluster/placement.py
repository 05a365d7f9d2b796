"""Which modules each Ray Train rank hosts, and which batch rows it merges.

Modules are spread in contiguous blocks, as evenly as possible: with M modules
on W workers, the first M % W ranks host ceil(M / W) modules and the rest
floor(M / W). Rank r hosts modules [start_r, start_r + count_r), so gathering
every rank's members in rank order lists all members module-major, the order
`EnsembleConfig.member_names` uses (m0.0, m0.1, m1.0, ...).

    4 modules, 2 workers -> rank 0: [0, 1], rank 1: [2, 3]
    3 modules, 2 workers -> rank 0: [0, 1], rank 1: [2]

The same rule splits the rows of a phase-2 batch: rank r computes the merged
loss on its own contiguous slice of rows.
"""

from __future__ import annotations


def _block(index: int, parts: int, total: int) -> tuple[int, int]:
    """(start, count) of block `index` when `total` items are cut into `parts` blocks."""
    if parts < 1:
        raise ValueError(f"world size must be >= 1, got {parts}")
    if not 0 <= index < parts:
        raise ValueError(f"rank {index} out of range 0..{parts - 1}")
    base, extra = divmod(total, parts)
    start = index * base + min(index, extra)
    return start, base + (1 if index < extra else 0)


def modules_for_rank(rank: int, world_size: int, modules: int) -> list[int]:
    """The modules rank `rank` hosts (contiguous, ascending)."""
    if world_size > modules:
        raise ValueError(
            f"resources.workers: {world_size} workers for {modules} modules; each worker hosts at least one module"
        )
    start, count = _block(rank, world_size, modules)
    return list(range(start, start + count))


def members_for_rank(rank: int, world_size: int, modules: int, members_per_module: int) -> list[int]:
    """Indices (module-major) of the members rank `rank` hosts."""
    return [
        m * members_per_module + slot
        for m in modules_for_rank(rank, world_size, modules)
        for slot in range(members_per_module)
    ]


def row_slice(rank: int, world_size: int, rows: int) -> slice:
    """Rank `rank`'s contiguous slice of a batch of `rows` rows (may be empty when rows < world_size)."""
    start, count = _block(rank, world_size, rows)
    return slice(start, start + count)
