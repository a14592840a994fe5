"""Theory lab: the paper's §3 statements checked numerically on softmax regression with fixed features.

``run_theory(output_dir)`` runs every check, draws the figures and writes summary.md; the ``check_*``
functions return the numbers of one statement each. Only ``run_theory`` imports matplotlib.
"""

from pathlib import Path

from logitsam.theory.checks import (
    Cor34Result,
    DpoSamResult,
    ModalGrowth,
    Prop31Result,
    SignRuleResult,
    Thm32Result,
    check_cor34,
    check_dpo_sam,
    check_prop31,
    check_sign_rule,
    check_thm32,
    modal_growth,
)


def run_theory(output_dir: str | Path, *, seeds: int = 200, steps: int = 150, progress: bool = True) -> dict:
    """Run every check, write the PNGs and summary.md to output_dir; see ``theory/run.py``."""
    from logitsam.theory.run import run_theory as _run_theory  # matplotlib only when drawing

    return _run_theory(output_dir, seeds=seeds, steps=steps, progress=progress)


__all__ = [
    "Cor34Result",
    "DpoSamResult",
    "ModalGrowth",
    "Prop31Result",
    "SignRuleResult",
    "Thm32Result",
    "check_cor34",
    "check_dpo_sam",
    "check_prop31",
    "check_sign_rule",
    "check_thm32",
    "modal_growth",
    "run_theory",
]
