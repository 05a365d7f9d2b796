"""The one markdown-table renderer."""

from leviathan.run.tables import markdown_table


def test_columns_are_padded_to_their_widest_cell():
    assert markdown_table(["model", "loss"], [["m0.0", "1.2345"], ["merged (fusion)", "1.1"]]).splitlines() == [
        "| model           | loss   |",
        "|-----------------|--------|",
        "| m0.0            | 1.2345 |",
        "| merged (fusion) | 1.1    |",
    ]


def test_a_table_without_rows_keeps_its_header():
    assert markdown_table(["#", "trial"], []) == "| # | trial |\n|---|-------|"
