import pytest
import torch

from vtc.methods import HparamError, LayerState, get_method, method_stage
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


def _prefixed(prefix: int, padding: int = 0):
    """`_example` behind `prefix` − 1 more system tokens and `padding` positions of left padding (zeros)."""
    keys, states, image, query = _example()
    extra = prefix - 1 + padding
    keys, states = torch.cat([torch.zeros(extra, 2), keys]), torch.cat([torch.zeros(extra, 2), states])
    return keys, states, image + extra, query + extra


def test_reference_pivot_order_is_the_python_set_order_of_unpadded_positions():
    # 4 system tokens: image 4..7, question 8; image pivot (image token 1) at 5, text pivot at 8. A set of two small
    # ints has 8 slots and iterates by value mod 8: 8 -> slot 0, 5 -> slot 5, so the reference visits the question
    # pivot first; it takes the candidate least similar to (0,1): token 0 (1,0), cos 0. Sequence order: the image
    # pivot (1,0) first takes token 2 (0,1).
    keys, states, image, query = _prefixed(4)
    order = dict(pivot_image=1, pivot_text=1)
    assert dart_select_row(keys, states, image, query, 2, **order).tolist() == [1, 2]
    assert dart_select_row(keys, states, image, query, 2, **order, pivot_order="reference").tolist() == [0, 1]
    # behind 3 positions of left padding the pivots sit at 8 and 11 (image first by value mod 8); counted from the
    # row's first valid token they are 5 and 8 again, so the row selects as it does alone
    keys, states, image, query = _prefixed(4, padding=3)
    assert dart_select_row(keys, states, image, query, 2, **order, pivot_order="reference", offset=3).tolist() == [0, 1]
    assert dart_select_row(keys, states, image, query, 2, **order, pivot_order="reference", offset=0).tolist() == [1, 2]


def test_reference_pivot_order_in_a_batch_equals_each_row_alone():
    rows = [_prefixed(4), _prefixed(4, padding=3)]
    length = 12
    keys = torch.stack(
        [torch.cat([k, torch.zeros(length - len(k), 2)]) if i == 0 else k for i, (k, *_) in enumerate(rows)]
    )
    states = torch.stack(
        [torch.cat([s, torch.zeros(length - len(s), 2)]) if i == 0 else s for i, (_, s, *_) in enumerate(rows)]
    )
    valid = torch.tensor([[True] * 9 + [False] * 3, [False] * 3 + [True] * 9])
    image_pos = torch.stack([rows[0][2], rows[1][2]])
    is_image = torch.zeros(2, length, dtype=torch.bool).scatter_(1, image_pos, True)
    state = LayerState(
        hidden=None, normed=states, keys=keys[:, None], last_attention=None, image=image_pos,
        text=valid & ~is_image, valid=valid,
    )  # fmt: skip
    dart = get_method("dart")
    assert dart(state, 2, pivot_image=1, pivot_text=1, pivot_order="reference").tolist() == [[0, 1]] * 2
    assert dart(state, 2, pivot_image=1, pivot_text=1).tolist() == [[1, 2]] * 2
    with pytest.raises(HparamError, match="pivot_order must be one of sequence, reference"):
        dart(state, 2, pivot_order="hash")
