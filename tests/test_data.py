"""TokenShard (memory-mapped, zero-copy), samplers, eval batches, manifests."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pyarrow as pa
import pytest
import torch

from leviathan.data.shards import (
    BatchSampler,
    DataError,
    MixedBatchSampler,
    switch_batches,
    switch_cuts,
    switch_pairs,
    TokenShard,
    eval_batches,
    token_dtype,
    write_shard,
)
from leviathan.data.staging import load_manifest


def make_shard(tmp_path, tokens, name="s.arrow") -> TokenShard:
    return TokenShard(write_shard(tmp_path / name, np.asarray(tokens)))


def proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def test_token_dtype_is_smallest_fitting():
    assert token_dtype(256) == np.uint8
    assert token_dtype(257) == np.uint16
    assert token_dtype(260) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_shard_round_trip_is_a_read_only_view(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16)
    shard = make_shard(tmp_path, tokens)
    assert len(shard) == 1000 and shard.dtype == np.uint16
    np.testing.assert_array_equal(shard.tokens, tokens)
    assert not shard.tokens.flags.writeable
    assert not shard.tokens.flags.owndata, "tokens must be a view of the mapped file, not a copy"
    with pytest.raises(ValueError):
        shard.tokens[0] = 1
    again = pickle.loads(pickle.dumps(shard))
    assert again.path == shard.path
    np.testing.assert_array_equal(again.tokens, tokens)


def test_shard_file_is_one_arrow_column(tmp_path):
    make_shard(tmp_path, np.arange(10, dtype=np.uint8))
    table = pa.ipc.open_file(str(tmp_path / "s.arrow")).read_all()
    assert table.column_names == ["tokens"] and table.column("tokens").type == pa.uint8()


def test_shard_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="missing.arrow"):
        TokenShard(tmp_path / "missing.arrow")
    (tmp_path / "junk.arrow").write_bytes(b"not arrow at all")
    with pytest.raises(DataError, match="junk.arrow"):
        TokenShard(tmp_path / "junk.arrow")
    table = pa.table({"tokens": pa.chunked_array([[1, 2], [3]], type=pa.uint16())})
    with pa.ipc.new_file(str(tmp_path / "two.arrow"), table.schema) as w:
        w.write_table(table)
    with pytest.raises(DataError, match="two.arrow"):
        TokenShard(tmp_path / "two.arrow")
    with pytest.raises(DataError, match="unsigned"):
        write_shard(tmp_path / "signed.arrow", np.arange(5, dtype=np.int32))


def test_large_shard_is_mapped_not_copied(tmp_path):
    """A 200 MB shard: opening it reads almost nothing and sampling copies nothing.

    Reading pages of a memory-mapped file grows VmRSS by file-backed pages (the
    kernel maps whole page-cache folios around each fault), which cost no
    private memory and are dropped under pressure. So the test pins what
    matters: opening does not grow VmRSS by the shard's size, and RssAnon
    (private memory) stays flat while sampling and even after every page has
    been read.
    """
    n = 100_000_000  # uint16 -> 200 MB
    raw = tmp_path / "raw.bin"
    mm = np.memmap(raw, dtype=np.uint16, mode="w+", shape=(n,))  # file-backed, no anonymous copy
    for i in range(0, n, 1 << 24):
        mm[i : i + (1 << 24)] = np.arange(i, min(i + (1 << 24), n), dtype=np.int64) % 65536
    write_shard(tmp_path / "big.arrow", mm)
    del mm
    raw.unlink()
    warm = BatchSampler(make_shard(tmp_path, np.arange(100, dtype=np.uint16)), 8, 64)  # lazy imports, first use
    warm.next()

    anon0, rss0 = proc_status_kb("RssAnon"), proc_status_kb("VmRSS")
    shard = TokenShard(tmp_path / "big.arrow")
    assert len(shard) == n
    rss1 = proc_status_kb("VmRSS")
    assert rss1 - rss0 < 50_000, f"opening a 200 MB shard grew VmRSS by {rss1 - rss0} kB"
    sampler = BatchSampler(shard, batch_size=8, seq_len=64, seed=0)
    for _ in range(20):
        x, y = sampler.next()
    assert torch.equal(x[:, 1:], y[:, :-1])
    np.testing.assert_array_equal(x[:, 1].numpy() % 65536, (x[:, 0].numpy() + 1) % 65536)
    anon1 = proc_status_kb("RssAnon")
    assert anon1 - anon0 < 20_000, f"opening + sampling allocated {anon1 - anon0} kB anonymous memory"
    assert int(shard.tokens[-1]) == (n - 1) % 65536
    assert int(shard.tokens[::1024].max()) == 64512  # reads every page
    anon2 = proc_status_kb("RssAnon")
    assert anon2 - anon0 < 20_000, f"reading every page allocated {anon2 - anon0} kB anonymous memory"


def assert_rows_are_windows(x, y, tokens, starts=None):
    """Every row of x is tokens[s:s+T] and the same row of y is tokens[s+1:s+T+1] for some s."""
    T = x.shape[1]
    for row in range(x.shape[0]):
        s = int(starts[row]) if starts is not None else int(np.nonzero(tokens == x[row, 0].item())[0][0])
        np.testing.assert_array_equal(x[row].numpy(), tokens[s : s + T].astype(np.int64))
        np.testing.assert_array_equal(y[row].numpy(), tokens[s + 1 : s + T + 1].astype(np.int64))


def test_batch_sampler_shapes_and_targets(tmp_path):
    tokens = np.arange(5000, dtype=np.uint16)  # distinct values: a row's first token is its start
    shard = make_shard(tmp_path, tokens)
    sampler = BatchSampler(shard, batch_size=4, seq_len=16, seed=0)
    for _ in range(50):
        x, y = next(sampler)
        assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
        assert x.is_contiguous() and y.is_contiguous()
        assert_rows_are_windows(x, y, tokens)
    assert sampler.batches_drawn == 50


def test_batch_sampler_reaches_both_ends(tmp_path):
    tokens = np.arange(20, dtype=np.uint16)
    sampler = BatchSampler(make_shard(tmp_path, tokens), batch_size=64, seq_len=4, seed=3)
    starts = {int(v) for _ in range(10) for v in sampler.next()[0][:, 0]}
    assert starts == set(range(0, 20 - 4)), "starts must cover [0, n - T - 1] exactly"


def test_batch_sampler_is_seeded(tmp_path):
    shard = make_shard(tmp_path, np.arange(5000, dtype=np.uint16))
    a = [BatchSampler(shard, 4, 16, seed=7).next()[0] for _ in range(2)]
    assert torch.equal(a[0], a[1])
    b = BatchSampler(shard, 4, 16, seed=8).next()[0]
    assert not torch.equal(a[0], b)


@pytest.mark.parametrize("through_json", [False, True])
def test_restored_sampler_yields_the_same_batches(tmp_path, through_json):
    shards = [make_shard(tmp_path, np.arange(3000, dtype=np.uint16) + 3000 * d, f"d{d}.arrow") for d in range(3)]
    original = MixedBatchSampler(shards, batch_size=5, seq_len=8, seed=11)
    for _ in range(7):
        original.next()
    state = original.state_dict()
    if through_json:
        state = json.loads(json.dumps(state))
    expected = [original.next() for _ in range(10)]
    restored = MixedBatchSampler(shards, batch_size=5, seq_len=8, seed=0)
    restored.load_state_dict(state)
    for i, (x, y) in enumerate(expected):
        rx, ry = restored.next()
        assert torch.equal(rx, x) and torch.equal(ry, y), f"batch {i} after restore differs"


def test_switch_rows_change_domain_once_and_resume_bit_identically(tmp_path):
    D, B, T = 3, 8, 16
    shards = [make_shard(tmp_path, np.arange(3000, dtype=np.uint16) + 3000 * d, f"d{d}.arrow") for d in range(D)]
    sampler = MixedBatchSampler(shards, batch_size=B, seq_len=T, seed=5, switch_fraction=0.25)
    pairs = set()
    for _ in range(40):
        x, y = sampler.next()
        window = torch.cat([x, y[:, -1:]], dim=1) // 3000  # (B, T + 1) domain of every token
        for row in range(2):  # round(0.25 * 8) switch rows
            a, b = int(window[row, 0]), int(window[row, -1])
            cut = int((window[row] == a).sum())
            assert a != b and T // 4 <= cut < 3 * T // 4 and (window[row, cut:] == b).all()
            pairs.add((a, b))
        assert (window[2:] == window[2:, :1]).all(), "mixed rows stay within one domain"
    assert len(pairs) == D * (D - 1)
    state = json.loads(json.dumps(sampler.state_dict()))
    expected = [sampler.next() for _ in range(5)]
    restored = MixedBatchSampler(shards, batch_size=B, seq_len=T, seed=0, switch_fraction=0.25)
    restored.load_state_dict(state)
    for x, y in expected:
        rx, ry = restored.next()
        assert torch.equal(rx, x) and torch.equal(ry, y)
    with pytest.raises(DataError, match="switch_fraction"):
        MixedBatchSampler(shards, batch_size=B, seq_len=T).load_state_dict(state)


def test_switch_batches_cover_every_ordered_pair_with_random_cuts(tmp_path):
    D, T = 3, 16
    shards = [make_shard(tmp_path, np.arange(3000, dtype=np.uint16) + 3000 * d, f"d{d}.arrow") for d in range(D)]
    batches = switch_batches(shards, batch_size=5, seq_len=T, per_pair=2)
    again = switch_batches(shards, batch_size=5, seq_len=T, per_pair=2)
    assert all(torch.equal(x, x2) for (x, _), (x2, _) in zip(batches, again))
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert x.shape == (D * (D - 1) * 2, T) and [b[0].shape[0] for b in batches] == [5, 5, 2]
    assert torch.equal(x[:, 1:], y[:, :-1])
    cuts = switch_cuts(D, T, per_pair=2)
    assert ((cuts >= T // 4) & (cuts <= 3 * T // 4)).all() and len(set(cuts.tolist())) > 1
    window = torch.cat([x, y[:, -1:]], dim=1) // 3000  # (W, T + 1) domain of every token
    for w, ((a, b), cut) in enumerate(zip(switch_pairs(D, per_pair=2), cuts)):
        assert (window[w, :cut] == a).all() and (window[w, cut:] == b).all(), w
    assert sorted(set(switch_pairs(D, 2))) == [(a, b) for a in range(D) for b in range(D) if a != b]


def test_load_state_dict_rejects_other_shapes(tmp_path):
    shard = make_shard(tmp_path, np.arange(3000, dtype=np.uint16))
    state = BatchSampler(shard, 4, 8, seed=0).state_dict()
    with pytest.raises(DataError, match="seq_len"):
        BatchSampler(shard, 4, 16, seed=0).load_state_dict(state)


def test_mixed_sampler_spreads_rows_evenly(tmp_path):
    D, B = 3, 4  # B not divisible by D: the rotating rule still balances over D batches
    shards = [make_shard(tmp_path, np.arange(1000, dtype=np.uint16) + 1000 * d, f"d{d}.arrow") for d in range(D)]
    sampler = MixedBatchSampler(shards, batch_size=B, seq_len=8, seed=0)
    counts = np.zeros(D, dtype=int)
    for k in range(D):
        x, y = sampler.next()
        domain_of_row = (x[:, 0] // 1000).numpy()
        np.testing.assert_array_equal(domain_of_row, (k * B + np.arange(B)) % D)
        assert torch.equal(x // 1000, y // 1000), "a row must not mix domains"
        counts += np.bincount(domain_of_row, minlength=D)
    assert counts.tolist() == [B] * D


def test_sampler_rejects_too_short_shard(tmp_path):
    shard = make_shard(tmp_path, np.arange(8, dtype=np.uint8))
    with pytest.raises(DataError, match="fewer than seq_len"):
        BatchSampler(shard, 2, 8)
    BatchSampler(shard, 2, 7).next()  # 8 tokens = exactly one window of T + 1


def test_eval_batches_are_deterministic_and_spread(tmp_path):
    tokens = np.arange(10_000, dtype=np.uint16)
    shard = make_shard(tmp_path, tokens)
    batches = eval_batches(shard, batch_size=4, seq_len=32, max_batches=5)
    again = eval_batches(TokenShard(shard.path), batch_size=4, seq_len=32, max_batches=5)
    assert len(batches) == 5
    starts = []
    for (x, y), (x2, y2) in zip(batches, again):
        assert torch.equal(x, x2) and torch.equal(y, y2)
        assert x.shape == (4, 32) and x.dtype == torch.int64
        assert_rows_are_windows(x, y, tokens)
        starts += x[:, 0].tolist()
    assert starts[0] == 0 and starts[-1] == 10_000 - 33, "windows must span the whole shard"
    gaps = np.diff(starts)
    assert gaps.min() >= 32 and gaps.max() - gaps.min() <= 1, f"uneven spacing {gaps}"


def test_eval_batches_small_shard(tmp_path):
    shard = make_shard(tmp_path, np.arange(100, dtype=np.uint16))
    batches = eval_batches(shard, batch_size=4, seq_len=32, max_batches=10)
    assert len(batches) == 1 and batches[0][0].shape == (4, 32)  # overlapping windows, one full batch
    with pytest.raises(DataError, match="fewer than seq_len"):
        eval_batches(shard, batch_size=1, seq_len=100, max_batches=1)


def write_manifest(tmp_path, **override):
    for split in ("train", "val"):
        write_shard(tmp_path / f"a.{split}.arrow", np.arange(300, dtype=np.uint16))
    manifest = {
        "format_version": 1,
        "tokenizer": {"kind": "byte", "vocab_size": 260, "file": None},
        "vocab_size": 260,
        "dtype": "uint16",
        "domains": [{"name": "a", "source": "test", "documents": 1, "bytes": 600, "splits": {
            s: {"file": f"a.{s}.arrow", "tokens": 300, "bytes": 240, "sha256": "0"} for s in ("train", "val")}}],
    }
    manifest.update(override)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return tmp_path / "manifest.json"


def test_manifest_accessors(tmp_path):
    m = load_manifest(write_manifest(tmp_path))
    assert load_manifest(tmp_path).root == m.root == tmp_path.resolve()
    assert m.domains == ["a"] and m.vocab_size == 260 and m.dtype == np.uint16
    assert m.shard_path("a", "val") == tmp_path.resolve() / "a.val.arrow"
    assert len(m.shard("a", "train")) == 300
    assert m.bytes_per_token("a", "val") == pytest.approx(0.8)
    assert m.tokenizer().vocab_size == 260
    with pytest.raises(DataError, match="'b'"):
        m.shard("b", "train")
    with pytest.raises(DataError, match="sha256"):
        m.verify()


def test_manifest_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="no manifest"):
        load_manifest(tmp_path)
    write_manifest(tmp_path, format_version=2)
    with pytest.raises(DataError, match="format_version"):
        load_manifest(tmp_path)
    write_manifest(tmp_path)
    (tmp_path / "a.val.arrow").unlink()
    with pytest.raises(DataError, match="a.val.arrow"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(DataError, match="manifest.json"):
        load_manifest(tmp_path)


def test_manifest_field_errors_name_the_field(tmp_path):
    """A manifest with a wrong or missing field is an error naming the file and the field."""
    bad_split = {"file": "a.val.arrow", "tokens": "many", "bytes": 240}
    split = {"file": "a.train.arrow", "tokens": 300, "bytes": 240}
    write_manifest(tmp_path, domains=[{"name": "a", "splits": {"train": split, "val": bad_split}}])
    with pytest.raises(DataError, match=r"manifest\.json: domains\[0\]\.splits\.val\.tokens: expected an integer"):
        load_manifest(tmp_path)
    write_manifest(tmp_path, vocab_size=None)
    with pytest.raises(DataError, match="vocab_size: missing"):
        load_manifest(tmp_path)
    write_manifest(tmp_path, domains=[{"name": "a", "splits": {"train": split}}])
    with pytest.raises(DataError, match=r"domains\[0\]\.splits\.val: missing"):
        load_manifest(tmp_path)


def test_manifest_writes_what_it_reads(tmp_path):
    from leviathan.run.manifest import Manifest, read_manifest, write_manifest as write

    m = read_manifest(str(write_manifest(tmp_path)))
    assert m.domain_names == ["a"] and m.split("a", "val").tokens == 300 and m.vocab_size == 260
    assert Manifest.from_dict(m.to_dict()) == m
    out = tmp_path / "copy"
    assert read_manifest(write(m, str(out))) == m


def test_samplers_never_draw_the_dev_tail(tmp_path):
    """The dev split is the tail of every train shard: no training window (plain or switch)
    reaches it, and the dev windows come from it alone."""
    from leviathan.data.shards import dev_batches, dev_tokens

    n, T = 20000, 16
    shards = [make_shard(tmp_path, (np.arange(n) % 60000).astype(np.uint16) + 0, f"t{d}.arrow") for d in range(2)]
    dev = dev_tokens(n)
    assert dev == 4096
    sampler = MixedBatchSampler(shards, batch_size=8, seq_len=T, seed=0, switch_fraction=0.5)
    drawn = max(int(torch.cat(sampler.next()).max()) for _ in range(300))
    assert n - dev - 200 < drawn < n - dev, "windows reach close to, never into, the dev tail"
    per_domain, switch = dev_batches(shards, batch_size=4, seq_len=T, max_batches=2)
    for batches in [*per_domain, switch]:
        assert all(int(x.min()) >= n - dev and int(y.max()) < n for x, y in batches)
    assert dev_tokens(1000) == 0, "a tiny shard has no dev split (it all trains)"
