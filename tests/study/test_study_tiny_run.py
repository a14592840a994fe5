"""One real study run on the tiny model, through the real CLI subprocesses (train, eval), then the report."""

import json

import pytest
from fake_study import recipe, write_recipe

from logitsam.cli import main
from logitsam.study import SMALL_FILES


@pytest.mark.slow  # two subprocesses (train, eval): about 20 s of CPU
def test_one_real_run_keeps_small_files_and_reports(tiny_model_dir, pairs_file, cache, tmp_path, capsys):
    raw = recipe(pairs_file, data={"path": str(pairs_file), "format": "prompt_chosen_rejected", "heldout_pairs": 4,
                                   "train_pairs": 12})
    raw["train"].update({"model_name_or_path": str(tiny_model_dir), "max_steps": 2, "eval_steps": 1,
                         "per_device_train_batch_size": 2, "per_device_eval_batch_size": 4, "use_cpu": True,
                         "report_to": "none", "logging_steps": 1, "save_steps": 1000})
    study, out = write_recipe(tmp_path / "tiny.yaml", raw), tmp_path / "docs" / "tiny"
    args = ["study", "--config", str(study), "--output_dir", str(out), "--scratch_dir", str(tmp_path / "scratch"),
            "--only", "rho1e-2_seed1"]
    main(args)
    run = out / "runs" / "rho1e-2_seed1"
    assert sorted(p.name for p in run.iterdir()) == sorted([*SMALL_FILES, "study_run.json"])
    assert not (tmp_path / "scratch" / "rho1e-2_seed1").exists()
    evals = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r]
    assert evals[0]["step"] == 0 and "eval_squeeze/argmax_logp_chosen" in evals[0]
    results = json.loads((run / "eval_results.json").read_text())
    assert results["eval/num_pairs"] == 4 and results["split"] == "train[:4]"
    assert "rho 1e-2, n=1" in (out / "summary.md").read_text()
    capsys.readouterr()
    main(args)  # finished: skipped
    assert "finished 0 run(s) now" in capsys.readouterr().out
