from __future__ import annotations

import pytest
import torch

from vtc.methods import get_method


@pytest.mark.parametrize("budget", [16, 1, 1000])
def test_full_returns_every_token_in_order_whatever_the_budget(make_tokens, budget):
    tokens = make_tokens(2, (4, 4), 3)
    reduced = get_method("full")(tokens, budget)
    assert torch.equal(reduced.tokens, tokens.projected)
    assert torch.equal(reduced.sources, torch.eye(16, dtype=torch.bool).expand(2, 16, 16))
