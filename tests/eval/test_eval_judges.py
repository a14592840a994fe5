"""VADER and reward-model judges; the reward score against the model's own logit."""

import pytest
import torch
from conftest import make_tiny_tokenizer

from logitsam.eval import Judge, RewardModelJudge, VaderJudge, make_judge

PROMPTS = ["Review the film.", "Say something.", "How was dinner, and would you go back again next week?"]
RESPONSES = ["It was great!", "no", "The soup was cold but the dessert was lovely, so maybe."]


def test_vader_scores_sentiment_of_the_response():
    judge = make_judge("vader")
    assert isinstance(judge, VaderJudge) and isinstance(judge, Judge) and judge.name == "vader"
    pos, neg, neutral = judge.score(
        ["Review:"] * 3,
        ["I love this movie, it is wonderful and brilliant!", "This is terrible, I hate it, the worst film ever.",
         "The film is 90 minutes long."],
    )
    assert pos > 0.8 and neg < -0.8 and neutral == 0.0
    assert judge.score(["A very sad and awful prompt"], ["I love it"]) == judge.score(["x"], ["I love it"])
    with pytest.raises(ValueError, match="paired"):
        judge.score(["a"], ["b", "c"])


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tok = make_tiny_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, num_labels=1,
                      pad_token_id=tok.pad_token_id, max_position_embeddings=512)
    model = LlamaForSequenceClassification(cfg).float()
    torch.nn.init.normal_(model.score.weight, std=1.0)  # a visible spread of scores
    out = tmp_path_factory.mktemp("tiny-rm")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out, model.eval(), tok


def direct_score(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, 0].item()


def test_reward_model_score_equals_its_logit(reward_model_dir):
    path, model, tok = reward_model_dir
    judge = make_judge(f"reward:{path}", batch_size=2, device="cpu", progress=False)
    assert isinstance(judge, RewardModelJudge) and judge.name == f"reward:{path}"
    scores = judge.score(PROMPTS, RESPONSES)  # batches of 2 with different lengths: padding must not matter
    assert len(scores) == 3 and all(isinstance(s, float) for s in scores)
    assert all(torch.isfinite(torch.tensor(scores)))
    for prompt, response, score in zip(PROMPTS, RESPONSES, scores, strict=True):
        text = tok.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=False
        )
        assert score == pytest.approx(direct_score(model, tok(text, add_special_tokens=False)["input_ids"]),
                                      abs=1e-5)
    assert len(set(scores)) == 3


def test_reward_model_text_pair_and_left_truncation(reward_model_dir):
    path, model, tok = reward_model_dir
    judge = RewardModelJudge(path, batch_size=3, device="cpu", apply_chat_template=False, progress=False)
    scores = judge.score(PROMPTS, RESPONSES)
    for prompt, response, score in zip(PROMPTS, RESPONSES, scores, strict=True):
        assert score == pytest.approx(direct_score(model, tok(prompt, response)["input_ids"]), abs=1e-5)
    short = RewardModelJudge(path, batch_size=2, device="cpu", max_length=12, progress=False)
    cut = short.score(PROMPTS, RESPONSES)
    for prompt, response, score in zip(PROMPTS, RESPONSES, cut, strict=True):
        text = tok.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=False
        )
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert score == pytest.approx(direct_score(model, ids[-12:]), abs=1e-5)  # the end is kept


CONVERSATION = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello, how can I help?"}, {"role": "user", "content": "Rate it."}]


def test_reward_model_scores_the_whole_conversation(reward_model_dir):
    from logitsam.data import render_hh_transcript

    path, model, tok = reward_model_dir
    judge = RewardModelJudge(path, batch_size=2, device="cpu", progress=False)
    scores = judge.score([CONVERSATION, "Rate it."], ["Five stars.", "Five stars."])
    text = tok.apply_chat_template(CONVERSATION + [{"role": "assistant", "content": "Five stars."}], tokenize=False)
    assert scores[0] == pytest.approx(direct_score(model, tok(text, add_special_tokens=False)["input_ids"]), abs=1e-5)
    assert scores[0] != pytest.approx(scores[1], abs=1e-4)  # the earlier turns change the score
    pair = RewardModelJudge(path, device="cpu", apply_chat_template=False, progress=False)
    (score,) = pair.score([CONVERSATION], ["Five stars."])
    ids = tok(render_hh_transcript(CONVERSATION), "Five stars.")["input_ids"]
    assert score == pytest.approx(direct_score(model, ids), abs=1e-5)


def test_make_judge_rejects_unknown_specs():
    with pytest.raises(ValueError, match="unknown judge"):
        make_judge("gpt4")
    with pytest.raises(ValueError, match="unknown judge"):
        make_judge("reward:")
    with pytest.raises(TypeError, match="no options"):
        make_judge("vader", batch_size=4)
