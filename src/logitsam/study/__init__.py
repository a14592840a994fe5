"""`logitsam study`: a resumable, paired rho x seed study from one recipe, committed run by run.

    from logitsam.study import load_study, run_study, build_study_report
    plan = load_study("recipes/study/sentiment.yaml")
    run_study(plan, "docs/study/sentiment")          # skips finished runs
    build_study_report("docs/study/sentiment")       # from the committed files only

``plan`` expands the recipe into runs (stable ids such as ``rho1e-2_seed1``), ``runner`` executes them one
at a time in fresh processes, ``stats`` holds the seed statistics, and ``report`` the table and figure.
"""

from .plan import RunSpec, StudyPlan, expand, load_study, run_id
from .report import build_study_report
from .runner import SMALL_FILES, dry_run_table, finished, run_study

__all__ = ["SMALL_FILES", "RunSpec", "StudyPlan", "build_study_report", "dry_run_table", "expand", "finished",
           "load_study", "run_id", "run_study"]
