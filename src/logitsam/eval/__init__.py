"""Evaluation: sampling responses, judging them, and paired win rates with confidence intervals.

    responses_a = generate_responses(model_a, tokenizer, prompts, max_new_tokens=128, seed=0)
    responses_b = generate_responses(model_b, tokenizer, prompts, max_new_tokens=128, seed=0)
    judge = make_judge("vader")                      # or "reward:OpenAssistant/reward-model-deberta-v3-large-v2"
    result = win_rate(judge.score(prompts, responses_a), judge.score(prompts, responses_b))  # whole conversations
"""

from .generate import generate_responses, render_prompt
from .judges import JUDGE_SPECS, Judge, RewardModelJudge, VaderJudge, make_judge
from .stats import bootstrap_interval, wilson_interval, win_rate

__all__ = [
    "JUDGE_SPECS",
    "Judge",
    "RewardModelJudge",
    "VaderJudge",
    "bootstrap_interval",
    "generate_responses",
    "make_judge",
    "render_prompt",
    "wilson_interval",
    "win_rate",
]
