"""The CPU path is chosen by the score matrix's memory (B*H*T^2) as well as by T."""

from __future__ import annotations

import pytest
import torch

import leviathan.model.correlation as correlation
from leviathan.model.correlation import MultiHeadedCorrelation, mixer_path, score_bytes

LIMIT = correlation.SCORE_BYTES_MAX


@pytest.mark.parametrize(
    "device,seq_len,window,scores,expected",
    [
        ("cpu", 64, 4, None, "shifted_diagonal"),  # memory unknown: T decides
        ("cpu", 64, 4, LIMIT, "shifted_diagonal"),
        ("cpu", 64, 4, LIMIT + 1, "lag_stacked"),
        ("cpu", 64, 2, LIMIT + 1, "lag_stacked"),
        ("cpu", correlation.SHIFTED_DIAGONAL_MAX_LEN + 1, 4, 1, "lag_stacked"),  # small scores, too long
        ("cpu", 64, 1, LIMIT + 1, "sdpa"),  # attention never builds the scores itself
        ("cuda", 64, 4, LIMIT + 1, "triton"),  # the Triton kernel tiles, whatever the size
    ],
)
def test_path_is_chosen_by_score_memory_too(device, seq_len, window, scores, expected) -> None:
    assert mixer_path(device, seq_len, window, triton=True, scores=scores) == expected


def test_evaluation_at_a_large_batch_does_not_materialise_gigabytes_of_scores() -> None:
    # B = 256, 6 heads, T = 512, fp32: 1.6 GB of scores, over the limit; a training batch of 32 is under it.
    assert score_bytes(256, 6, 512) > LIMIT >= score_bytes(32, 6, 512)
    assert mixer_path("cpu", 512, 4, scores=score_bytes(256, 6, 512)) == "lag_stacked"
    assert mixer_path("cpu", 512, 4, scores=score_bytes(32, 6, 512)) == "shifted_diagonal"


def test_the_module_switches_path_by_batch_and_both_paths_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    m = MultiHeadedCorrelation(16, 2, 4).double()
    with torch.no_grad():
        m.lag_weight.copy_(torch.randn(2, 4, dtype=torch.float64))
    T = 24
    x = torch.randn(6, T, 16, dtype=torch.float64)
    # The limit sits between the scores of 3 and of 6 sequences: (B, 2, 24, 24) float64.
    monkeypatch.setattr(correlation, "SCORE_BYTES_MAX", score_bytes(3, 2, T, 8))
    small = m(x[:3])
    assert m.last_path.startswith("shifted_diagonal"), m.last_path
    large = m(x)
    assert m.last_path.startswith("lag_stacked"), m.last_path
    m.force_path = "shifted_diagonal"
    exact = m(x)
    torch.testing.assert_close(large, exact, atol=1e-10, rtol=1e-9, msg="the lag-stacked path differs from the scores path")
    torch.testing.assert_close(small, exact[:3], atol=1e-10, rtol=1e-9)
