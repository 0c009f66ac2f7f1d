import pytest
import torch

from vtc.methods import LayerState, get_method, method_stage
from vtc.methods.fastv import fastv_select
from vtc.models import inllm


def test_fastv_keeps_the_image_tokens_the_last_token_attends_to_most():
    # Row 0: image at positions 2..5 with attention 0.1, 0.4, 0.05, 0.3 -> top 2 are image tokens 1 and 3.
    # Row 1 (one position of left padding): image at 3..6 with 0.2, 0.2, 0.5, 0.01 -> token 2, then the tie 0/1
    # goes to the lower index 0.
    last_attention = torch.tensor(
        [
            [0.05, 0.05, 0.1, 0.4, 0.05, 0.3, 0.05, 0.0],
            [0.0, 0.04, 0.05, 0.2, 0.2, 0.5, 0.01, 0.0],
        ]
    )
    image = torch.tensor([[2, 3, 4, 5], [3, 4, 5, 6]])
    assert fastv_select(last_attention, image, 2).tolist() == [[1, 3], [0, 2]]
    assert fastv_select(last_attention, image, 4).tolist() == [[0, 1, 2, 3]] * 2  # keep all: every index, in order
    assert fastv_select(last_attention, image, 0).shape == (2, 0)


def test_fastv_is_registered_inside_the_llm_at_layer_two():
    assert method_stage("fastv") == "llm"
    assert inllm.prune_layer_default("fastv") == 2
    state = LayerState(
        hidden=None, normed=None, keys=None, last_attention=torch.tensor([[0.0, 0.7, 0.1, 0.2]]),
        image=torch.tensor([[1, 2, 3]]), text=None, valid=None,
    )  # fmt: skip
    assert get_method("fastv")(state, 1).tolist() == [[0]]


def test_layer_average_budget_gives_the_kept_count_of_the_fastv_paper():
    # LLaVA-1.5-7B, 32 layers, K=2: the reference's own table (192 -> 166, 128 -> 98, 64 -> 30)
    assert [inllm.plan("fastv", b, {}, 32, 576).keep for b in (192, 128, 64)] == [166, 98, 30]
    plan = inllm.plan("fastv", 400, {}, 4, 576)  # tiny model: (4*400 - 2*576) / 2 = 224
    assert plan.keep == 224 and plan.per_layer == [576, 576, 224, 224] and plan.layer_average == 400
    kept = inllm.plan("fastv", 100, {"budget_mode": "kept", "layer": 3, "positions": "renumbered"}, 4, 576)
    assert (kept.keep, kept.layer, kept.positions, kept.per_layer) == (100, 3, "renumbered", [576] * 3 + [100])
    with pytest.raises(ValueError, match="average is at least 288"):
        inllm.plan("fastv", 192, {}, 4, 576)
    with pytest.raises(ValueError, match="layer must be between 1 and 3"):
        inllm.plan("fastv", 400, {"layer": 4}, 4, 576)
    with pytest.raises(ValueError, match="positions must be one of"):
        inllm.plan("fastv", 400, {"positions": "gapped"}, 4, 576)
    with pytest.raises(ValueError, match="does not prune inside the language model"):
        inllm.plan("pool", 400, {}, 4, 576)
