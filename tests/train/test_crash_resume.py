"""``kill -9`` of a real ``logitsam train`` at any moment, then ``--resume_from_checkpoint last``: the same run.

A checkpoint folder is complete or absent whenever the process dies (``PreferenceTrainer._save_checkpoint``
builds it aside and renames it), ``last`` picks the newest complete one, and ``metrics.jsonl`` ends up
holding each step once, with the uninterrupted run's values.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from test_trainer import config, final_weights, records
from transformers import TrainerState

from logitsam.train import build_config
from logitsam.train.checkpoints import resolve_resume
from logitsam.train.config import ConfigError
from logitsam.train.run import run_training
from logitsam.train.trainer import MetricsJsonlCallback

STEPS, SAVE_STEPS = 6, 2

# Dies at a chosen moment: argv = MODE STEP MARKER, then the `logitsam` command line.
DRIVER = textwrap.dedent("""
    import os, signal, sys, time
    from pathlib import Path
    from logitsam import cli
    from logitsam.train.trainer import PreferenceTrainer

    mode, step, marker = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])

    if mode == "during-save":  # checkpoint-<step> half-written (weights, optimizer; no trainer_state.json yet)
        orig_rng = PreferenceTrainer._save_rng_state

        def stall(self, output_dir):
            orig_rng(self, output_dir)
            if self.state.global_step == step:
                marker.touch()  # the test kills this process from outside now
                time.sleep(300)

        PreferenceTrainer._save_rng_state = stall
    elif mode == "after-save":  # right after checkpoint-<step> is in place
        orig_save = PreferenceTrainer._save_checkpoint

        def save_then_die(self, model, trial):
            orig_save(self, model, trial)
            if self.state.global_step == step:
                os.kill(os.getpid(), signal.SIGKILL)

        PreferenceTrainer._save_checkpoint = save_then_die
    elif mode == "mid-step":  # inside optimizer step <step> + 1, between two saves
        orig_step = PreferenceTrainer.training_step

        def die_in_step(self, *args, **kwargs):
            if self.state.global_step == step:
                os.kill(os.getpid(), signal.SIGKILL)
            return orig_step(self, *args, **kwargs)

        PreferenceTrainer.training_step = die_in_step
    cli.main(sys.argv[4:])
""")


def _argv(tiny_model_dir, pairs_file, out, **extra):
    values = {"model_name_or_path": tiny_model_dir, "dataset_name": pairs_file, "output_dir": out,
              "max_steps": STEPS, "save_steps": SAVE_STEPS, "save_total_limit": 2, "eval_size": 0, "sam": "logits",
              "sam_rho": 0.05, "learning_rate": 1e-2, "lr_scheduler_type": "constant", "warmup_ratio": 0.0,
              "logging_steps": 1, "per_device_train_batch_size": 4, "max_length": 48, "max_prompt_length": 24,
              "seed": 0, "use_cpu": "true", "dataloader_num_workers": 0, "disable_tqdm": "true", **extra}
    return ["train", *[part for k, v in values.items() for part in (f"--{k}", str(v))]]


def _assert_no_partial_checkpoint(out):
    for folder in out.glob("checkpoint-*"):
        assert (folder / "trainer_state.json").is_file(), f"{folder.name} left without trainer_state.json"


def _steps(out):
    return [r["step"] for r in records(out) if "loss" in r]


def test_kill_at_any_moment_then_resume_equals_uninterrupted(tiny_model_dir, pairs_file, tmp_path, cache):
    """Killed during the save of checkpoint-4, then right after it, then inside step 6; each time resumed with
    ``last``: the final weights equal the uninterrupted run's to 1e-6, and every step is logged once with the
    same loss, SAM and reward values."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "LOGITSAM_CACHE": str(cache), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    out, marker = tmp_path / "killed", tmp_path / "saving"

    def launch(mode, step, **extra):
        cmd = [sys.executable, str(driver), mode, str(step), str(marker), *_argv(tiny_model_dir, pairs_file, out,
                                                                                **extra)]
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def finish(proc, *, killed):
        log = proc.communicate(timeout=240)[0]
        assert proc.returncode == (-signal.SIGKILL if killed else 0), log[-3000:]

    # 1. kill -9 from outside while checkpoint-4 is half-written
    proc = launch("during-save", 4)
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    finish(proc, killed=True)
    _assert_no_partial_checkpoint(out)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert [p.name for p in out.iterdir() if p.name.startswith(".checkpoint-")], "the kill missed the save"
    assert _steps(out) == [1, 2, 3, 4]

    # 2. resume from checkpoint-2; die the moment checkpoint-4 is in place
    proc = launch("after-save", 4, resume_from_checkpoint="last")
    finish(proc, killed=True)
    _assert_no_partial_checkpoint(out)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "the killed run's leftovers stay"
    assert _steps(out) == [1, 2, 3, 4]

    # 3. resume from checkpoint-4 (`true` means `last`); die inside step 6, after step 5 was logged
    proc = launch("mid-step", 5, resume_from_checkpoint="true")
    finish(proc, killed=True)
    _assert_no_partial_checkpoint(out)
    assert _steps(out) == [1, 2, 3, 4, 5]

    # 4. resume from checkpoint-4 again and finish; meanwhile, the same run without interruptions
    proc = launch("run", 0, resume_from_checkpoint="last")
    straight = tmp_path / "straight"
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses (OMP_NUM_THREADS=1)
    try:
        run_training(config(tiny_model_dir, pairs_file, straight, cache, max_steps=STEPS, save_steps=SAVE_STEPS,
                            save_total_limit=2, eval_size=0, sam="logits"))
    finally:
        torch.set_num_threads(torch_threads)
    finish(proc, killed=False)
    _assert_no_partial_checkpoint(out)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]  # rotation kept 2

    a, b = final_weights(straight), final_weights(out)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0, msg=k)
    assert _steps(out) == list(range(1, STEPS + 1))
    assert [r["step"] for r in records(out) if "train_runtime" in r] == [STEPS]  # one end-of-run record
    keys = ("loss", "sam/loss_pre", "sam/loss_post", "rewards/margins", "learning_rate")
    logged = [r[k] for r in records(out) if "loss" in r for k in keys]
    expected = [r[k] for r in records(straight) if "loss" in r for k in keys]
    assert logged == pytest.approx(expected, rel=1e-5, abs=1e-7)


def _checkpoint(out, step, complete=True):
    folder = out / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    if complete:
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return folder


def test_last_is_the_newest_complete_checkpoint(tmp_path, caplog):
    _checkpoint(tmp_path, 2)
    _checkpoint(tmp_path, 10)
    _checkpoint(tmp_path, 12, complete=False)  # e.g. from a logitsam that wrote checkpoints in place
    assert resolve_resume("last", tmp_path) == str(tmp_path / "checkpoint-10")  # by step, not by name
    assert "checkpoint-12" in caplog.text
    assert resolve_resume(True, tmp_path) == str(tmp_path / "checkpoint-10")
    assert resolve_resume(None, tmp_path) is None
    with pytest.raises(ConfigError, match="not a complete checkpoint.*trainer_state.json"):
        resolve_resume(str(tmp_path / "checkpoint-12"), tmp_path)
    with pytest.raises(ConfigError, match="no such folder"):
        resolve_resume(str(tmp_path / "checkpoint-3"), tmp_path)


@pytest.mark.parametrize("incomplete", [False, True])
def test_last_without_a_checkpoint_is_one_clear_error(tmp_path, incomplete):
    if incomplete:
        _checkpoint(tmp_path, 4, complete=False)
    with pytest.raises(ConfigError, match=r"'last': no complete checkpoint .* in .*train without") as err:
        resolve_resume("last", tmp_path)
    assert ("checkpoint-4" in str(err.value)) == incomplete


def test_resume_true_and_false_on_the_command_line(tmp_path):
    def parsed(value):
        cfg = build_config(None, {"dataset_name": "x.jsonl", "resume_from_checkpoint": value})
        return cfg.training_args["resume_from_checkpoint"]

    assert parsed("true") == "last" and parsed("last") == "last" and parsed("false") is None
    assert parsed(str(tmp_path)) == str(tmp_path)


def test_cli_resume_last_in_an_empty_output_dir(tiny_model_dir, pairs_file, tmp_path, capsys):
    """One line naming the key and the folder, exit code 2, before any model is loaded."""
    from logitsam import cli

    out = tmp_path / "fresh"
    with pytest.raises(SystemExit) as exit_:
        cli.main(_argv(tiny_model_dir, pairs_file, out, resume_from_checkpoint="last"))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "resume_from_checkpoint" in err and str(out) in err and "Traceback" not in err


def test_metrics_are_cut_back_to_the_resume_step(tmp_path):
    """Records past the checkpoint, an earlier end-of-run summary and a last line cut short by the kill go."""
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3)]
    lines.insert(2, json.dumps({"step": 2, "train_runtime": 1.0}))
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 4, "lo')
    callback = MetricsJsonlCallback(tmp_path)
    callback.on_train_begin(None, TrainerState(global_step=2), None)
    assert _steps(tmp_path) == [1, 2] and len(records(tmp_path)) == 2
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        callback.on_train_begin(None, TrainerState(global_step=2), None)
