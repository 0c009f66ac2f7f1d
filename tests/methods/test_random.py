from __future__ import annotations

import torch

from vtc.methods import get_method

random = get_method("random")


def kept(reduced):
    return reduced.sources.int().argmax(dim=-1)


def test_same_seed_same_sample_different_seed_different_sample(make_tokens):
    first = kept(random(make_tokens(3, (6, 6), seeds=[1, 2, 1]), 9))
    again = kept(random(make_tokens(3, (6, 6), seeds=[1, 2, 1]), 9))
    assert torch.equal(first, again)
    assert torch.equal(first[0], first[2])
    assert not torch.equal(first[0], first[1])


def test_sample_depends_on_the_image_seed_not_on_the_batch(make_tokens):
    together = kept(random(make_tokens(2, (6, 6), seeds=[5, 6]), 9))
    shuffled = kept(random(make_tokens(3, (6, 6), seeds=[9, 6, 5]), 9))
    assert torch.equal(together[0], shuffled[2])
    assert torch.equal(together[1], shuffled[1])


def test_kept_patches_are_distinct_and_in_spatial_order(make_tokens):
    tokens = make_tokens(4, (6, 6), 2)
    reduced = random(tokens, 20)
    indices = kept(reduced)
    assert (indices[:, 1:] > indices[:, :-1]).all()
    assert torch.equal(reduced.tokens, tokens.projected[torch.arange(4)[:, None], indices])


def test_every_patch_is_about_equally_likely(make_tokens):
    # 400 seeds keeping 2 of 4 patches: each patch is kept 200 times in expectation, sd 10.
    reduced = random(make_tokens(400, (2, 2), 1, seeds=list(range(400))), 2)
    counts = reduced.sources.sum(dim=(0, 1))
    assert ((counts > 160) & (counts < 240)).all(), counts
