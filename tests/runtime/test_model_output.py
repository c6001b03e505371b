"""The runtime's ModelOutput indexes like Hugging Face's: by field, attribute, position and
slice (a slice raised "unhashable type: 'slice'")."""

import pytest
import torch

from kernl.runtime.model import ModelOutput


def test_model_output_indexes_by_name_position_and_slice():
    a, b = torch.zeros(1), torch.ones(2)
    out = ModelOutput(last_hidden_state=a, pooler_output=b)
    assert out["pooler_output"] is b and out.last_hidden_state is a
    assert out[0] is a and out[-1] is b
    assert out[:1] == (a,) and out[0:2] == (a, b) == out.to_tuple()
    with pytest.raises(KeyError):
        out["logits"]
    with pytest.raises(AttributeError):
        out.logits  # noqa: B018
    # what kernl never fills is None, as in HF's classes (it raised AttributeError: loss)
    assert out.loss is None and out.hidden_states is None and out.attentions is None
