"""Seeded batched sampling with the tiny model and tokenizer: left padding and the KV cache change no token."""

import pytest
import torch
from conftest import make_tiny_llama, make_tiny_tokenizer

from logitsam.eval import generate_responses, render_prompt
from logitsam.eval.generate import generate_token_ids, generation_settings, stop_token_ids

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


def _greedy_without_cache(model, tok, prompt, max_new_tokens):
    """The definition: one prompt alone, the whole sequence re-run every step (no padding, no KV cache)."""
    text, special = render_prompt(tok, prompt)
    ids = torch.tensor([tok(text, add_special_tokens=special)["input_ids"]])
    stops, new = set(stop_token_ids(model, tok)), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(input_ids=ids, use_cache=False).logits[0, -1].argmax())
            new.append(token)
            if token in stops:
                break
            ids = torch.cat([ids, torch.tensor([[token]])], 1)
    return new


def test_batched_left_padded_cached_greedy_gives_the_definitions_tokens(model_and_tokenizer):
    """Prompts of 3 lengths in one left-padded batch, decoded with the KV cache, give token for token what each
    prompt gives alone without cache, rows that stop early included; batch sizes 1, 2 and 3 agree."""
    model, tok = model_and_tokenizer
    lengths = [len(tok(render_prompt(tok, p)[0])["input_ids"]) for p in PROMPTS]
    assert len(set(lengths)) == 3  # precondition: every batch of 2 or 3 is padded
    saved = model.generation_config.eos_token_id
    try:
        model.generation_config.eos_token_id = None
        # the random model never emits its EOS; stop at a token row 0 first emits 4th or later, and row 1 never
        free = [_greedy_without_cache(model, tok, p, 12) for p in PROMPTS[:2]]
        model.generation_config.eos_token_id = next(t for t in free[0][3:] if t not in free[0][:3] + free[1])
        expected = [_greedy_without_cache(model, tok, p, 12) for p in PROMPTS]
        assert 4 <= len(expected[0]) < len(expected[1]) == 12  # precondition: row 0 ends first, padded after
        for batch_size in (3, 2, 1):
            got = generate_token_ids(model, tok, PROMPTS, max_new_tokens=12, temperature=0, batch_size=batch_size,
                                     progress=False)
            assert got == expected, batch_size
    finally:
        model.generation_config.eos_token_id = saved


def test_decoding_feeds_one_token_per_step_after_the_prompt(model_and_tokenizer):
    """use_cache=True reaches the model although its config says use_cache=False: after the prompt forward
    (the padded batch width), every step embeds one new token."""
    model, tok = model_and_tokenizer
    assert model.config.use_cache is False  # precondition: the fixture's config turns the cache off
    widths = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: widths.append(args[0].shape))
    try:
        generate_token_ids(model, tok, PROMPTS[:2], max_new_tokens=5, temperature=0, batch_size=2, progress=False,
                           apply_chat_template=True)
    finally:
        hook.remove()
    prompt_width = max(len(tok(render_prompt(tok, p, True)[0], add_special_tokens=False)["input_ids"])
                       for p in PROMPTS[:2])
    assert widths[0] == (2, prompt_width) and all(w == (2, 1) for w in widths[1:]) and len(widths) > 1


def test_generation_settings_are_the_ones_sampled_with():
    settings = generation_settings(max_new_tokens=7, temperature=0.7, top_p=0.9, batch_size=4, seed=3)
    assert settings == {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 0, "max_new_tokens": 7,
                        "seed": 3, "batch_size": 4, "padding_side": "left", "use_cache": True}
    assert generation_settings(temperature=0)["do_sample"] is False
    with pytest.raises(ValueError, match="top_p=1.5"):
        generation_settings(top_p=1.5)
    with pytest.raises(ValueError, match="batch_size=0"):
        generation_settings(batch_size=0)


def test_judged_win_rates_record_their_generation_settings(model_and_tokenizer, monkeypatch):
    from logitsam.eval import run as eval_run

    model, tok = model_and_tokenizer
    sampled = []
    monkeypatch.setattr(eval_run, "generate_responses", lambda m, t, p, **kw: sampled.append(kw) or ["x"] * len(p))
    monkeypatch.setattr(eval_run, "make_judge", lambda spec, **kw: type("J", (), {
        "name": "len", "score": staticmethod(lambda prompts, responses: [1.0] * len(responses))})())
    results, _ = eval_run.judged_win_rates(model, model, tok, ["a", "b"], ["len"], max_new_tokens=5, temperature=0.5,
                                           top_p=0.8, batch_size=2, seed=9)
    assert sampled[0] == sampled[1] == {"max_new_tokens": 5, "temperature": 0.5, "top_p": 0.8, "batch_size": 2,
                                        "seed": 9}
    assert results["generation"] == generation_settings(**sampled[0])


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
