"""Seeded batched sampling with the tiny model and tokenizer."""

import pytest
import torch
from conftest import make_tiny_llama, make_tiny_tokenizer

from logitsam.eval import generate_responses, render_prompt

PROMPTS = [
    [{"role": "user", "content": "Hi"}],
    "A longer raw prompt, left padded",
    [{"role": "user", "content": "Tell me a story about a cat"}],
]


@pytest.fixture(scope="module")
def model_and_tokenizer():
    tok = make_tiny_tokenizer()
    return make_tiny_llama(vocab_size=len(tok), seed=4), tok


def test_same_seed_same_outputs(model_and_tokenizer):
    model, tok = model_and_tokenizer
    kwargs = {"max_new_tokens": 12, "temperature": 1.0, "top_p": 0.95, "batch_size": 2, "progress": False}
    rng = torch.get_rng_state()
    first = generate_responses(model, tok, PROMPTS, seed=0, **kwargs)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's global RNG is untouched
    assert len(first) == len(PROMPTS) and all(isinstance(r, str) and r for r in first)
    assert generate_responses(model, tok, PROMPTS, seed=0, **kwargs) == first
    assert generate_responses(model, tok, PROMPTS, seed=1, **kwargs) != first


def test_greedy_batched_equals_one_at_a_time(model_and_tokenizer):
    """Left padding with the attention mask must not change any row's continuation."""
    model, tok = model_and_tokenizer
    model.train()
    batched = generate_responses(model, tok, PROMPTS, max_new_tokens=10, temperature=0, batch_size=3,
                                 progress=False)
    assert model.training  # mode restored
    alone = [generate_responses(model, tok, [p], max_new_tokens=10, temperature=0, progress=False)[0]
             for p in PROMPTS]
    assert batched == alone
    # and row 0 is the model's own greedy continuation of the chat-rendered prompt, up to EOS
    text, special = render_prompt(tok, PROMPTS[0])
    ids = torch.tensor([tok(text, add_special_tokens=special)["input_ids"]])
    start = ids.shape[1]
    with torch.no_grad():
        for _ in range(10):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
            if ids[0, -1] == tok.eos_token_id:
                break
    assert batched[0] == tok.decode(ids[0, start:], skip_special_tokens=True)


def test_render_prompt_rules(model_and_tokenizer):
    _, tok = model_and_tokenizer
    text, special = render_prompt(tok, [{"role": "user", "content": "Hi"}])
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n" and special is False
    assert render_prompt(tok, "raw text") == ("raw text", True)
    assert render_prompt(tok, "raw", apply_chat_template=True)[0].startswith("<|im_start|>user\nraw")
    with pytest.raises(ValueError, match="message-list"):
        render_prompt(tok, [{"role": "user", "content": "Hi"}], apply_chat_template=False)


def test_a_generation_configs_list_of_eos_ids_is_kept(model_and_tokenizer):
    """Llama 3 style: generation_config.eos_token_id is a list; any of its ids ends the response."""
    from logitsam.eval.generate import stop_token_ids

    model, tok = model_and_tokenizer
    greedy = {"max_new_tokens": 8, "temperature": 0.0, "progress": False}
    saved = model.generation_config.eos_token_id
    try:
        model.generation_config.eos_token_id = None
        (full,) = generate_responses(model, tok, PROMPTS[:1], **greedy)
        assert len(full) == 8 and full[0] not in tok.all_special_tokens  # precondition: 8 plain characters
        stop = tok.convert_tokens_to_ids(full[2])
        model.generation_config.eos_token_id = [tok.convert_tokens_to_ids("<|endoftext|>"), stop]
        assert stop_token_ids(model, tok) == [tok.convert_tokens_to_ids("<|endoftext|>"), stop, tok.eos_token_id]
        (short,) = generate_responses(model, tok, PROMPTS[:1], **greedy)
        assert short == full[:full.index(full[2]) + 1]  # stopped at the listed id, which is not the tokenizer's eos
        model.generation_config.eos_token_id = stop  # a single int works too
        assert stop_token_ids(model, tok) == [stop, tok.eos_token_id]
    finally:
        model.generation_config.eos_token_id = saved
