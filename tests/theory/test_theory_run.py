"""run_theory end to end: every figure written, summary.md names each one with its caption."""

from logitsam.theory import run_theory
from logitsam.theory.run import CAPTIONS


def test_run_theory_writes_figures_and_summary(tmp_path):
    summary = run_theory(tmp_path, seeds=20, progress=False)
    text = (tmp_path / "summary.md").read_text()
    assert len(CAPTIONS) == 4
    for name, caption in CAPTIONS.items():
        png = tmp_path / name
        assert png.exists() and png.stat().st_size > 10_000
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert name in text and caption in text
    assert 1.8 < summary["thm32"]["sqrt"]["slope"] < 2.2
    assert summary["prop31"]["max_abs_error"] < 1e-10
    assert summary["sign_rule"]["negative_lr"]["matched_lowers_dominant"] > 0.9
    assert summary["seeds"] == 20
