"""What a collated `SFTTrainer` batch holds: the model's inputs, and the keys that are not (labels and masks).

A leaf module (no imports): modes, the completion sources and the teacher cache all split batches the same way.
"""

# Keys of a collated batch that are not model inputs.
NON_MODEL_KEYS = ("labels", "seq_lengths", "completion_mask", "assistant_masks")


def model_inputs(batch: dict) -> dict:
    """`batch` without the keys a model's forward does not take ([`NON_MODEL_KEYS`])."""
    return {key: value for key, value in batch.items() if key not in NON_MODEL_KEYS}
