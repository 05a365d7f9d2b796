"""The custom corpus script: four non-built-in domains from files of a fresh Debian + Python machine."""

from __future__ import annotations

from jobs.corpora.make_custom import DOMAINS, custom_sources, main
from jobs.spec import load_spec
from leviathan.data.corpus import builtin_corpus
from leviathan.data.staging import load_manifest


def test_prepares_four_domains_in_spec_order(tmp_path):
    assert main(["--out", str(tmp_path / "custom")]) == 0
    manifest = load_manifest(tmp_path / "custom")
    assert manifest.domains == list(DOMAINS) == load_spec("jobs/specs/custom.toml").data.domains
    for d in manifest.domains:
        assert manifest.tokens(d, "val") > 128 and manifest.tokens(d, "train") > 10 * manifest.tokens(d, "val")


def test_no_document_is_built_in_text():
    builtin = {doc for docs in builtin_corpus().values() for doc in docs}
    for source in custom_sources():
        docs = list(source.documents())
        assert docs and not builtin.intersection(docs), source.name
        assert [len(d) for d in docs] == source.sizes()


def test_existing_output_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("taken")
    assert main(["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out") and err.count("\n") == 1
