"""build_report end to end: files written, links resolve, the HTML shows the expected tables and embeds every image."""

import base64
import re
import shutil
import statistics
import subprocess
from html.parser import HTMLParser

import pytest
from html_report import read_report
from synthetic_runs import final_accuracy, make_rho_sweep, make_two_by_two, write_run

from logitsam.report import build_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
CHROMIUM = "/usr/bin/chromium"


class StructureChecker(HTMLParser):
    """Records unbalanced tags, every <img> src, and anything that would load an external resource."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.errors, self.images, self.external, self.captions = [], [], [], [], []
        self._in_caption = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        for key in ("src", "href"):
            if key in attrs and not attrs[key].startswith(("data:", "#")):
                self.external.append(f"<{tag} {key}={attrs[key][:60]!r}>")
        if tag in ("script", "link", "iframe"):
            self.external.append(tag)
        self._in_caption = tag == "figcaption"
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in VOID:
            self.stack.pop()

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
            return
        self.stack.pop()

    def handle_data(self, data):
        if self._in_caption and data.strip():
            self.captions.append(data.strip())
            self._in_caption = False


def check_html(text: str) -> StructureChecker:
    checker = StructureChecker()
    checker.feed(text)
    checker.close()
    assert checker.errors == [] and checker.stack == [], (checker.errors, checker.stack)
    assert checker.external == []
    return checker


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """Built once for the module: drawing the four figures takes about a second."""
    root = tmp_path_factory.mktemp("report")
    dirs = make_two_by_two(root) + make_rho_sweep(root)
    return build_report(dirs, root / "out", title="Runs <&> 'compared'")


def test_markdown_links_every_plot_and_each_exists(report):
    md = report["markdown"].read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    names = {p.name for p in report["plots"]}
    assert names == {"training_curves.png", "logps.png", "displacement_rate.png", "rho_sweep.png"}
    assert sorted(links) == sorted(f"plots/{n}" for n in names)
    for link in links:
        path = report["markdown"].parent / link
        assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 10_000
        after = md.split(f"]({link})", 1)[1].lstrip("\n").splitlines()[0]
        assert after.startswith("*") and after.endswith("*") and len(after) > 40  # the caption line


def test_html_is_balanced_self_contained_and_embeds_every_plot(report):
    text = report["html"].read_text()
    checker = check_html(text)
    assert len(checker.images) == len(report["plots"]) == len(checker.captions)
    embedded = set()
    for src in checker.images:
        assert src.startswith("data:image/png;base64,")
        embedded.add(base64.b64decode(src.split(",", 1)[1]))
    assert embedded == {p.read_bytes() for p in report["plots"]}
    assert "<title>Runs &lt;&amp;&gt; &#x27;compared&#x27;</title>" in text
    assert "<script" not in text


def test_report_tables_show_the_direct_mean_and_std(report):
    md = report["markdown"].read_text()
    accs = [final_accuracy("logits", 1e-4, seed) for seed in (0, 1)]
    cell = f"{statistics.mean(accs):.4g} ± {statistics.stdev(accs):.2g}"
    row = next(line for line in md.splitlines() if line.startswith("| dpo+logits-sam |"))
    assert cell in row
    assert report["baseline"] == "dpo"
    assert [len(v) for v in report["variants"].values()] == [2, 2, 1, 1, 1, 1]

    page = read_report(report["html"])
    assert page.sections == ["Summary", "Training curves", "Log-probability trajectories", "Displacement rate",
                             "rho sweep", "Eval metrics", "Cost", "Runs"]
    summary = {r["variant"]: r for r in page.table("Summary")}
    variants = list(report["variants"])
    assert list(summary) == ["dpo (baseline)", *variants[1:]]
    assert summary["dpo+logits-sam"]["eval accuracy"] == cell
    base = [final_accuracy("none", 1e-4, seed) for seed in (0, 1)]
    assert summary["dpo (baseline)"]["eval accuracy"] == f"{statistics.mean(base):.4g} ± {statistics.stdev(base):.2g}"
    assert [summary[v]["seeds"] for v in summary] == ["2", "2", "1", "1", "1", "1"]
    assert summary["dpo (baseline)"]["s/step vs baseline"] == "1"
    accuracy = next(r for r in page.table("Eval metrics") if r["metric"] == "eval_rewards/accuracies")
    assert accuracy["dpo+logits-sam"] == cell
    runs = page.table("Runs")
    assert sorted(r["run"] for r in runs) == sorted(str(d) for ds in report["variants"].values() for d in ds)


def test_html_figures_are_the_plots_with_their_captions(report):
    page = read_report(report["html"])  # every <img> loads as a PNG and has a caption
    assert [f.png for f in page.figures] == [p.read_bytes() for p in report["plots"]]
    md_captions = [line.strip("*") for line in report["markdown"].read_text().splitlines()
                   if line.startswith("*") and line.endswith("*")]
    assert [f.caption for f in page.figures] == md_captions and len(md_captions) == 4
    assert [f.alt for f in page.figures] == ["Training curves", "Log-probability trajectories", "Displacement rate",
                                             "rho sweep"]


def test_read_report_fails_on_an_image_that_does_not_load(report, tmp_path):
    text = report["html"].read_text()
    first = text.index('src="data:') + len('src="')
    end = text.index('"', first)
    broken = tmp_path / "report.html"
    for src in ("plots/missing.png", "data:image/png;base64,%%%", "data:image/png;base64,aGVsbG8="):
        broken.write_text(text[:first] + src + text[end:])
        with pytest.raises(AssertionError):
            read_report(broken)
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "here.png").write_bytes(report["plots"][0].read_bytes())
    broken.write_text(text[:first] + "plots/here.png" + text[end:])
    assert read_report(broken).figures[0].png == report["plots"][0].read_bytes()  # a file beside the page loads
    broken.write_text(re.sub(r"<figcaption>.*?</figcaption>", "<figcaption></figcaption>", text, count=1))
    with pytest.raises(AssertionError, match="no caption"):
        read_report(broken)


def test_missing_optional_files_do_not_crash(tmp_path):
    dirs = [write_run(tmp_path, "metrics-only", files=("metrics",)),
            write_run(tmp_path, "config-only", sam="logits", files=("config",)),
            write_run(tmp_path, "info-only", variant="x", files=("info",))]
    out = build_report(dirs, tmp_path / "out")
    md = out["markdown"].read_text()
    assert "no logitsam_config.yaml" in md and "no metrics.jsonl" in md
    assert list(out["variants"]) == ["metrics-only", "dpo+logits-sam", "x"]
    assert out["baseline"] == "metrics-only"  # no variant is known to be sam: none, so the first
    check_html(out["html"].read_text())
    assert all(p.exists() for p in out["plots"])
    assert "rho_sweep.png" not in {p.name for p in out["plots"]}


def test_no_metrics_at_all_gives_tables_without_plots(tmp_path):
    out = build_report([write_run(tmp_path, "r", files=("config", "info"))], tmp_path / "out")
    assert out["plots"] == []
    assert "No eval records" in out["markdown"].read_text()
    check_html(out["html"].read_text())


def test_build_report_needs_runs(tmp_path):
    with pytest.raises(ValueError, match="at least one run directory"):
        build_report([], tmp_path)


@pytest.mark.skipif(shutil.which(CHROMIUM) is None, reason="Debian chromium not installed")
def test_chromium_renders_the_html(report, tmp_path):
    import matplotlib.image

    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,2000",
                    report["html"].resolve().as_uri()],
                   check=True, capture_output=True, timeout=120)
    assert shot.stat().st_size > 20_000
    pixels = matplotlib.image.imread(shot)[..., :3]
    assert pixels.shape[:2] == (2000, 1200)
    assert pixels.std() > 0.05  # not a blank page
    assert (pixels.max(axis=2) - pixels.min(axis=2)).max() > 0.3  # colored plot lines, not only text
