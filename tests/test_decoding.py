import torch

from flexkd.method.decoding import left_padded


def test_prompts_of_different_lengths_end_in_the_last_column_with_the_padding_masked():
    input_ids, attention_mask = left_padded([[5, 6, 7], [8], torch.tensor([9, 10])], pad_token_id=0)
    assert input_ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 9, 10]]
    assert attention_mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert input_ids.dtype == attention_mask.dtype == torch.long
