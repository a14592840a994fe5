"""`logitsam study` plumbing with a fake subprocess runner: one run at a time, small files kept, resumption."""

import json
import subprocess
from pathlib import Path

import pytest
from fake_study import FakeRunner, recipe, write_recipe

from logitsam.cli import main
from logitsam.study import SMALL_FILES, load_study, run_study
from logitsam.train.config import ConfigError


def no_report(out):
    return {"files": []}


@pytest.fixture
def study(tmp_path, pairs_file):
    return write_recipe(tmp_path / "mini.yaml", recipe(pairs_file))


def test_runs_train_then_eval_and_keep_only_small_files(study, tmp_path):
    runner, out, scratch = FakeRunner(), tmp_path / "docs" / "mini", tmp_path / "scratch"
    done = run_study(load_study(study), out, scratch_dir=scratch, runner=runner, report=no_report)
    assert done == ["rho0_seed1", "rho1e-2_seed1", "rho0_seed2", "rho1e-2_seed2", "rho0_seed3", "rho1e-2_seed3"]
    # one train then one eval per run, in order: never two runs at once
    assert runner.calls[:4] == [("train", "rho0_seed1"), ("eval", "rho0_seed1"), ("train", "rho1e-2_seed1"),
                                ("eval", "rho1e-2_seed1")]
    for run_id in done:
        kept = sorted(p.name for p in (out / "runs" / run_id).iterdir())
        assert kept == sorted([*SMALL_FILES, "study_run.json"])
        assert not (scratch / run_id).exists()  # weights and checkpoints deleted after eval
    record = json.loads((out / "runs" / "rho1e-2_seed2" / "study_run.json").read_text())
    assert (record["cell"], record["rho"], record["seed"]) == ("main", 0.01, 2)
    assert (out / "study.yaml").read_text() == study.read_text()


def test_a_second_invocation_skips_finished_runs(study, tmp_path):
    out, scratch = tmp_path / "out", tmp_path / "scratch"
    run_study(load_study(study), out, scratch_dir=scratch, runner=FakeRunner(), report=no_report)
    again = FakeRunner()
    assert run_study(load_study(study), out, scratch_dir=scratch, runner=again, report=no_report) == []
    assert again.calls == []
    # a run whose folder is gone (or was never completed) is the only one rerun
    for path in (out / "runs" / "rho1e-2_seed2").iterdir():
        path.unlink()
    (out / "runs" / "rho1e-2_seed2").rmdir()
    third = FakeRunner()
    assert run_study(load_study(study), out, scratch_dir=scratch, runner=third, report=no_report) == ["rho1e-2_seed2"]
    assert third.calls == [("train", "rho1e-2_seed2"), ("eval", "rho1e-2_seed2")]


def test_a_trained_but_unevaluated_run_is_only_evaluated(study, tmp_path):
    out, scratch = tmp_path / "out", tmp_path / "scratch"
    plan = load_study(study)
    first = FakeRunner()

    def fail_eval(cmd, log_path, *, what):
        if cmd[3] == "eval":
            raise RuntimeError("killed during eval")
        first(cmd, log_path, what=what)

    with pytest.raises(RuntimeError, match="killed during eval"):
        run_study(plan, out, scratch_dir=scratch, runner=fail_eval, report=no_report, only=["rho0_seed1"])
    assert not (out / "runs" / "rho0_seed1").exists() and (scratch / "rho0_seed1" / "run_info.json").exists()
    resumed = FakeRunner()
    run_study(plan, out, scratch_dir=scratch, runner=resumed, report=no_report, only=["rho0_seed1"])
    assert resumed.calls == [("eval", "rho0_seed1")]


def test_a_changed_recipe_does_not_mix_with_finished_runs(study, tmp_path, pairs_file):
    out, scratch = tmp_path / "out", tmp_path / "scratch"
    run_study(load_study(study), out, scratch_dir=scratch, runner=FakeRunner(), report=no_report,
              only=["rho0_seed1"])
    raw = recipe(pairs_file)
    raw["train"]["learning_rate"] = 0.02
    changed = write_recipe(tmp_path / "mini.yaml", raw)
    with pytest.raises(ConfigError, match="rho0_seed1 was made with other settings"):
        run_study(load_study(changed), out, scratch_dir=scratch, runner=FakeRunner(), report=no_report)


def test_ches_cell_filters_once_and_trains_on_the_filtered_pool(tmp_path, pairs_file):
    raw = recipe(pairs_file, cells=[{"name": "ches", "sam_rho": [0, 1.0e-2], "seeds": [1],
                                     "ches_filter_top_percent": 10}])
    runner, scratch = FakeRunner(), tmp_path / "scratch"
    run_study(load_study(write_recipe(tmp_path / "c.yaml", raw)), tmp_path / "out", scratch_dir=scratch,
              runner=runner, report=no_report, only=["ches_rho0_seed1", "ches_rho1e-2_seed1"])
    assert [c for c, _ in runner.calls] == ["ches", "train", "eval", "train", "eval"]
    config = (scratch / "configs" / "ches_rho0_seed1.yaml").read_text()
    assert "ches-ches/filtered.jsonl" in config


def test_commit_adds_only_each_runs_files(study, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git[:3], "init", "-q"], check=True)
    subprocess.run([*git[:3], "config", "user.name", "t"], check=True)
    subprocess.run([*git[:3], "config", "user.email", "t@t"], check=True)
    (repo / "other.txt").write_text("someone else's work\n")
    subprocess.run([*git[:3], "add", "other.txt"], check=True)  # staged by someone else: must stay uncommitted
    run_study(load_study(study), repo / "docs" / "mini", scratch_dir=tmp_path / "scratch", runner=FakeRunner(),
              report=no_report, commit=True, only=["rho0_seed1", "rho1e-2_seed1"])
    log = subprocess.run([*git[:3], "log", "--format=%s", "--name-only"], capture_output=True, text=True,
                         check=True).stdout
    assert "study mini: rho1e-2_seed1 (cell main, rho 1e-2, seed 1)" in log
    assert "docs/mini/runs/rho0_seed1/eval_results.json" in log and "other.txt" not in log
    status = subprocess.run([*git[:3], "status", "--porcelain"], capture_output=True, text=True, check=True).stdout
    assert status.strip() == "A  other.txt"


def test_cli_dry_run_lists_runs_and_estimates(study, tmp_path, capsys):
    main(["study", "--config", str(study), "--output_dir", str(tmp_path / "out"), "--dry_run"])
    printed = capsys.readouterr().out
    assert "| rho1e-2_seed3 | main | 1e-2 | 3 | 4 | to run | 0.1 |" in printed  # 4 steps x 2.0 s
    assert "6 runs, 0 finished" in printed


def test_cli_errors_are_one_line(study, tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        main(["study", "--config", str(study), "--only", "rho5_seed1", "--dry_run"])
    assert err.value.code == 2
    assert "--only ['rho5_seed1']: not run ids" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["study", "--config", str(tmp_path / "missing.yaml")])
    assert "not found" in capsys.readouterr().err


def _git(cwd, *args):
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)


def test_commit_of_an_ignored_run_is_one_clear_error(tmp_path):
    """A ``runs/`` pattern in .gitignore also matches ``docs/study/<name>/runs/``: the study must say so, once."""
    from logitsam.study.runner import StudyCommitError, git_commit

    if _git(tmp_path, "init", "-q").returncode != 0:
        pytest.skip("git is not available")
    (tmp_path / ".gitignore").write_text("runs/\n")
    run = tmp_path / "docs" / "study" / "s" / "runs" / "rho0_seed1"
    run.mkdir(parents=True)
    (run / "run_info.json").write_text("{}")
    with pytest.raises(StudyCommitError, match=r"`git add --` failed for docs/study/s/runs/rho0_seed1/run_info.json"
                                               r".*ignored.*commit them by hand"):
        git_commit([run / "run_info.json"], "study s: rho0_seed1")


def test_this_repository_commits_study_runs():
    """The project's own .gitignore keeps weights out (top-level runs/) but lets study results in."""
    root = Path(__file__).resolve().parents[2]
    if _git(root, "rev-parse", "--show-toplevel").returncode != 0:
        pytest.skip("not a git checkout")
    assert _git(root, "check-ignore", "-q", "docs/study/sentiment/runs/rho0_seed1/metrics.jsonl").returncode == 1
    assert _git(root, "check-ignore", "-q", "runs/study/sentiment/rho0_seed1/model.safetensors").returncode == 0


def test_an_llm_judge_needs_its_key_from_the_environment_before_any_run(tmp_path, pairs_file, monkeypatch):
    raw = recipe(pairs_file, eval={"num_prompts": 4, "judge": ["vader", "llm:fake"],
                                   "llm_judge": {"orders": "random", "max_tokens": 16}})
    plan = load_study(write_recipe(tmp_path / "llm.yaml", raw))
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    runner = FakeRunner()
    with pytest.raises(ConfigError, match="needs an API key: set OPENAI_API_KEY in the environment"):
        run_study(plan, tmp_path / "out", scratch_dir=tmp_path / "scratch", runner=runner, report=no_report)
    assert runner.calls == []  # refused before the first training
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    commands = []

    def recording(cmd, log_path, *, what):
        commands.append(cmd)
        runner(cmd, log_path, what=what)

    run_study(plan, tmp_path / "out", only=["rho0_seed1"], scratch_dir=tmp_path / "scratch", runner=recording,
              report=no_report)
    (evaluation,) = [cmd for cmd in commands if cmd[3] == "eval"]
    assert evaluation[evaluation.index("--judge_orders") + 1] == "random"
    assert evaluation[evaluation.index("--judge_max_tokens") + 1] == "16"
    assert [evaluation[i + 1] for i, t in enumerate(evaluation) if t == "--judge"] == ["vader", "llm:fake"]
    assert "sk-test" not in " ".join(evaluation)  # the subprocess inherits the key, the argv never holds it
