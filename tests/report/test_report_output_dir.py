"""`logitsam report DIR --output_dir OUT` writes into OUT (created) and leaves DIR as it was: run folders and a
`logitsam study` folder alike; without --output_dir a study's report stays beside its runs."""

import json

import pytest
import yaml
from synthetic_runs import make_two_by_two, write_run

from logitsam.cli import main
from logitsam.report.fig1c import CURVES


def snapshot(root):
    """Every file under root with its bytes: what 'untouched' means."""
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def make_study(root):
    """A finished `logitsam study` folder as the committed files leave it: study.yaml and runs/<id>/ with
    study_run.json; rho 0 and 1e-2, seeds 0 and 1."""
    (root / "runs").mkdir(parents=True)
    (root / "study.yaml").write_text(yaml.safe_dump({"task": "hh", "report": {"title": "mini study"}}))
    for rho, sam in ((0.0, "none"), (1e-2, "logits")):
        for seed in (0, 1):
            run_id = f"rho{'0' if rho == 0 else '1e-2'}_seed{seed}"
            run = write_run(root / "runs", run_id, sam=sam, rho=rho, seed=seed)
            with (run / "metrics.jsonl").open("a") as f:  # the held-out curves the figures draw
                for step in (0, 5, 10):
                    f.write(json.dumps({"step": step, **{f"eval_{key}": -1.0 - step * (0.01 + rho + seed / 100)
                                                         for key, _ in CURVES}}) + "\n")
            (run / "study_run.json").write_text(json.dumps({"run_id": run_id, "cell": "main", "rho": rho,
                                                            "seed": seed, "settings": {}}))
    return root


STUDY_FILES = {"summary.md", "summary.json", "fig1c.png", "fig1c_paired.png"}


def test_study_report_goes_to_output_dir(tmp_path, capsys):
    study = make_study(tmp_path / "docs" / "mini")
    before = snapshot(study)
    out = tmp_path / "elsewhere" / "report"  # its parent does not exist either
    main(["report", str(study), "--output_dir", str(out)])
    assert {p.name for p in out.iterdir()} == STUDY_FILES
    assert snapshot(study) == before  # no summary written beside the runs
    md = (out / "summary.md").read_text()
    assert f"Rebuild with `logitsam report {study} --output_dir {out}`" in md
    assert "![Fig. 1c analogue](fig1c.png)" in md  # the figures sit next to it
    groups = json.loads((out / "summary.json").read_text())["groups"]
    assert [g["rho"] for g in groups] == [0.0, 0.01] and groups[1]["seeds"] == [0, 1]
    assert (out / "fig1c.png").read_bytes()[:4] == (out / "fig1c_paired.png").read_bytes()[:4] == b"\x89PNG"
    assert f"written: {out / 'summary.md'}" in capsys.readouterr().out


def test_study_report_without_output_dir_stays_beside_the_runs(tmp_path):
    study = make_study(tmp_path / "mini")
    main(["report", str(study)])
    assert STUDY_FILES <= {p.name for p in study.iterdir()}
    assert f"Rebuild with `logitsam report {study}`." in (study / "summary.md").read_text()


def test_run_report_goes_to_output_dir(tmp_path, capsys):
    make_two_by_two(tmp_path / "cmp")
    before = snapshot(tmp_path / "cmp")
    out = tmp_path / "new" / "report"
    main(["report", str(tmp_path / "cmp" / "runs"), "--output_dir", str(out), "--title", "two by two"])
    assert {"report.md", "report.html", "plots"} == {p.name for p in out.iterdir()}
    assert (out / "report.md").read_text().startswith("# two by two")
    assert any((out / "plots").glob("*.png"))
    assert snapshot(tmp_path / "cmp") == before
    assert f"report: {out / 'report.html'}" in capsys.readouterr().out


def test_run_report_default_output_dir(tmp_path, monkeypatch):
    make_two_by_two(tmp_path / "cmp")
    monkeypatch.chdir(tmp_path)
    main(["report", "cmp/runs"])
    assert (tmp_path / "runs" / "report" / "report.html").is_file()


def test_study_folder_without_finished_runs_is_one_line(tmp_path, capsys):
    study = tmp_path / "empty"
    study.mkdir()
    (study / "study.yaml").write_text("task: hh\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(study), "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert err.strip() == f"logitsam report: error: {study}: no finished study runs (runs/*/study_run.json)"
    assert not (tmp_path / "out").exists()
