"""Depth pruning (trl_distill.pruning) on tiny Llama and Gemma3 models; the real-model checks are in
tests/test_real_models.py."""

import copy

import pytest
import torch

from tests.helpers import tiny_gemma3
from trl_distill.demo.tiny import build_tiny_model
from trl_distill.pruning import calibration_batches, depth_prune, score_layers, select_layers


def tiny_llama(tokenizer, num_layers=4):
    model = build_tiny_model(tokenizer, hidden_size=32, num_layers=num_layers, num_heads=2, seed=3).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def test_pruned_llama_equals_a_model_built_from_the_kept_layers(tokenizer):
    model = tiny_llama(tokenizer, num_layers=4)
    keep = [0, 2, 3]
    reference = build_tiny_model(tokenizer, hidden_size=32, num_layers=3, num_heads=2, seed=99).eval()
    state = {k: v for k, v in model.state_dict().items() if ".layers." not in k}
    for new, old in enumerate(keep):
        prefix = f"model.layers.{old}."
        state.update(
            {
                f"model.layers.{new}.{k[len(prefix) :]}": v
                for k, v in model.state_dict().items()
                if k.startswith(prefix)
            }
        )
    reference.load_state_dict(state)
    ids = torch.tensor([tokenizer("Ada has 3 apples and 4 pears.")["input_ids"]])
    pruned = depth_prune(copy.deepcopy(model), keep)
    assert pruned.config.num_hidden_layers == 3 and len(pruned.model.layers) == 3
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == [0, 1, 2]
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, reference(ids).logits)
        assert not torch.allclose(pruned(ids).logits, model(ids).logits)  # negative control: a layer is gone


def test_keeping_every_layer_changes_nothing(tokenizer):
    model = tiny_llama(tokenizer)
    ids = torch.tensor([tokenizer("Bo buys 5 pens.")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(depth_prune(copy.deepcopy(model), range(4)).__call__(ids).logits, model(ids).logits)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_pruned_model_saves_reloads_and_generates_with_a_cache(tmp_path, tokenizer, arch):
    from transformers import AutoModelForCausalLM

    model = tiny_llama(tokenizer) if arch == "llama" else tiny_gemma3(num_layers=6)
    keep = [0, 1, 3] if arch == "llama" else [0, 3, 4, 5]
    pruned = depth_prune(model, keep)
    if arch == "gemma3":  # the sliding/full pattern of the kept layers, in order
        sliding, full = "sliding_attention", "full_attention"
        assert pruned.config.layer_types == [sliding, full, sliding, full]
    pruned.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_hidden_layers == len(keep)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, pruned(ids).logits)
        cached = reloaded.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = reloaded.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert cached.tolist() == uncached.tolist()  # layer_idx renumbered: the KV cache holds the right layers


def test_bad_keep_layers_are_refused(tokenizer):
    model = tiny_llama(tokenizer)
    for keep in ([], [2, 1], [0, 0], [0, 4], [-1, 2], [0.0, 1]):
        with pytest.raises(ValueError, match="`keep_layers`"):
            depth_prune(copy.deepcopy(model), keep)
    with pytest.raises(TypeError, match="decoder"):
        depth_prune(torch.nn.Linear(2, 2), [0])


def reference_scores(model, batches):
    """1 - cos between consecutive hidden states, from `output_hidden_states` (float64), over attended tokens.

    `hidden_states[i]` enters layer i; the last entry is after the final norm, so the last layer is not covered here.
    """
    sums, count = None, 0
    for batch in batches:
        with torch.no_grad():
            hs = model(**batch, output_hidden_states=True).hidden_states
        mask = batch["attention_mask"].bool()
        rows = []
        for i in range(len(hs) - 2):
            a, b = hs[i].double()[mask], hs[i + 1].double()[mask]
            rows.append((1 - (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).sum())
        sums = torch.stack(rows) if sums is None else sums + torch.stack(rows)
        count += int(mask.sum())
    return sums / count


def test_scores_match_the_formula_and_skip_padding(tokenizer):
    model = tiny_llama(tokenizer)
    texts = ["Ada has 3 apples.", "Bo buys 5 pens and gives 2 of them to Cy on Monday.", "Cy reads."]
    batches = calibration_batches(tokenizer, texts, batch_size=2, max_length=32)
    assert batches[0]["attention_mask"].sum() < batches[0]["attention_mask"].numel()  # the first batch is padded
    scores = score_layers(model, batches)
    assert scores.shape == (4,) and scores.dtype == torch.float64
    torch.testing.assert_close(scores[:3], reference_scores(model, batches), rtol=1e-5, atol=1e-6)
    # Padding is left out: one row per batch (no padding at all) gives the same average.
    unpadded = score_layers(model, calibration_batches(tokenizer, texts, batch_size=1))
    torch.testing.assert_close(scores, unpadded, rtol=1e-5, atol=1e-6)


def test_a_layer_that_does_nothing_scores_zero_and_is_dropped_first(tokenizer):
    model = tiny_llama(tokenizer)
    with torch.no_grad():  # zero output projections: layer 2 returns its input unchanged
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    scores = score_layers(model, calibration_batches(tokenizer, ["Ada has 3 apples.", "Bo buys 5 pens."]))
    assert scores[2] == pytest.approx(0.0, abs=1e-6)
    assert (scores[[0, 1, 3]] > 1e-3).all()  # negative control: real layers change their input
    assert select_layers(scores, 3, keep_first=0, keep_last=0) == [0, 1, 3]


def test_select_layers_protects_the_ends_and_ranks_the_middle():
    scores = [0.1, 0.9, 0.2, 0.8, 0.3, 0.05]
    assert select_layers(scores, 4) == [0, 1, 3, 5]  # 0 and 5 protected despite low scores
    assert select_layers(scores, 4, keep_first=0, keep_last=0) == [1, 2, 3, 4]
    assert select_layers(scores, 3, keep_first=2, keep_last=1) == [0, 1, 5]
    assert select_layers(scores, 6) == list(range(6))
    assert select_layers([0.5, 0.5, 0.5, 0.5], 3) == [0, 1, 3]  # ties go to the earlier layer
    for bad in (1, 7, 2.0):
        with pytest.raises(ValueError, match="`num_keep`"):
            select_layers(scores, bad)
