import torch

from vtc.methods import LayerState, get_method, method_stage
from vtc.methods.dart import dart_select_row
from vtc.models import inllm


def _example():
    """One row of 6 positions: 0 system text, 1..4 image, 5 question.

    Key L1 norms: image 1, 3, 2, 0.5 (pivot: image token 1); question 1 (the text pivot).
    Normed states: image (1,0) (1,0) (0,1) (1,1); question (0,1).
    """
    keys = torch.tensor([[9.0, 9.0], [1.0, 0.0], [-2.0, 1.0], [0.0, 2.0], [0.5, 0.0], [0.0, -1.0]])
    states = torch.tensor([[5.0, 5.0], [1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [1.0, 1.0], [0.0, 1.0]])
    return keys, states, torch.tensor([1, 2, 3, 4]), torch.tensor([5])


def test_dart_keeps_pivots_and_the_tokens_least_duplicated_with_them():
    keys, states, image, query = _example()
    # keep 3: image pivot 1; 2 more, one per pivot. Image pivot (1,0): candidates 0 (cos 1), 2 (cos 0), 3 (cos .71)
    # -> 2. Question pivot (0,1): candidates 0 (cos 0), 3 (cos .71) -> 0. Kept: 0, 1, 2 (the duplicate of the
    # pivot, token 0, survives only because the question pivot finds it least similar to itself).
    assert dart_select_row(keys, states, image, query, 3, pivot_image=1, pivot_text=1).tolist() == [0, 1, 2]
    # keep 2: one more token, the first pivot's (sequence order: the image pivot) -> 2
    assert dart_select_row(keys, states, image, query, 2, pivot_image=1, pivot_text=1).tolist() == [1, 2]
    # keep 1: the pivot alone; keep 2 with two image pivots: the two largest key norms, 1 and 2
    assert dart_select_row(keys, states, image, query, 1, pivot_image=1, pivot_text=1).tolist() == [1]
    assert dart_select_row(keys, states, image, query, 2, pivot_image=2, pivot_text=1).tolist() == [1, 2]
    # keep 4 = every image token
    assert dart_select_row(keys, states, image, query, 4, pivot_image=1, pivot_text=1).tolist() == [0, 1, 2, 3]


def test_dart_batch_rows_select_on_their_own_positions():
    keys, states, image, query = _example()
    # Row 1 is row 0 behind two positions of left padding (zeros), so its positions shift by 2.
    pad_keys, pad_states = torch.cat([torch.zeros(2, 2), keys]), torch.cat([torch.zeros(2, 2), states])
    length = 8
    valid = torch.tensor([[True] * 6 + [False] * 2, [False] * 2 + [True] * 6])
    # row 0 is laid out unpadded at positions 0..5 (positions 6, 7 invalid and never text after the image)
    row0_keys, row0_states = torch.cat([keys, torch.zeros(2, 2)]), torch.cat([states, torch.zeros(2, 2)])
    state_keys = torch.stack([row0_keys, pad_keys])[:, None]  # [B, H_kv=1, L, d=2]
    image_pos = torch.stack([image, image + 2])
    is_image = torch.zeros(2, length, dtype=torch.bool).scatter_(1, image_pos, True)
    state = LayerState(
        hidden=None, normed=torch.stack([row0_states, pad_states]), keys=state_keys, last_attention=None,
        image=image_pos, text=valid & ~is_image, valid=valid,
    )  # fmt: skip
    assert get_method("dart")(state, 3, pivot_image=1, pivot_text=1).tolist() == [[0, 1, 2]] * 2
    assert method_stage("dart") == "llm" and inllm.prune_layer_default("dart") == 2
