"""Evaluation: sampling responses, judging them, and paired win rates with confidence intervals.

    responses_a = generate_responses(model_a, tokenizer, prompts, max_new_tokens=128, seed=0)
    responses_b = generate_responses(model_b, tokenizer, prompts, max_new_tokens=128, seed=0)
    judge = make_judge("vader")                      # or "reward:OpenAssistant/reward-model-deberta-v3-large-v2"
    result = win_rate(judge.score(prompts, responses_a), judge.score(prompts, responses_b))  # whole conversations

    # a chat model as a pairwise judge (the DPO paper's protocol), over any OpenAI-compatible server
    with LLMJudge(LLMJudgeConfig(model="gpt-4o-mini", template="dpo_dialogue")) as judge:
        report = judge.compare(prompts, responses_a, responses_b, out_dir="runs/eval")  # judgments.jsonl
    report.win_rate                                  # judged_win_rate of the per-pair outcomes
"""

from .generate import generate_responses, render_prompt
from .judges import JUDGE_SPECS, Judge, RewardModelJudge, VaderJudge, make_judge
from .llm_judge import TEMPLATE_NAMES, JudgeReport, LLMJudge, LLMJudgeConfig
from .stats import bootstrap_interval, judged_win_rate, wilson_interval, win_rate

__all__ = [
    "JUDGE_SPECS",
    "TEMPLATE_NAMES",
    "Judge",
    "JudgeReport",
    "LLMJudge",
    "LLMJudgeConfig",
    "RewardModelJudge",
    "VaderJudge",
    "bootstrap_interval",
    "generate_responses",
    "judged_win_rate",
    "make_judge",
    "render_prompt",
    "wilson_interval",
    "win_rate",
]
