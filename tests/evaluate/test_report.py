"""`prinmix report`: files, valid HTML and PNGs, the true-SVD analysis, and a headless-Chromium render."""

from __future__ import annotations

import base64
import itertools
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
from matplotlib.colors import to_hex
from scipy.stats import kendalltau

from fixtures.tiny_models import single_thread
from prinmix import api
from prinmix.api import CalibrationConfig
from prinmix.errors import PrinmixError
from prinmix.evaluate.report import ReportOptions, build_report, concordance, report_data
from prinmix.evaluate.report.figures import width_colour, width_colour_map
from prinmix.evaluate.results import write_results
from prinmix.evaluate.run import EvalConfig, run_eval

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
VOID = {"meta", "img", "br", "hr", "link", "input"}
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or \
    ("/usr/bin/chromium" if shutil.os.path.exists("/usr/bin/chromium") else None)


@pytest.fixture(autouse=True)
def one_thread():
    with single_thread():
        yield


class _Checker(HTMLParser):
    """Tag balance, embedded images and text of a page."""

    def __init__(self):
        super().__init__()
        self.stack, self.images, self.errors, self.text = [], [], [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs).get("src", ""))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unbalanced </{tag}> (open: {self.stack[-3:]})")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture(scope="module")
def made(tiny_pair, tmp_path_factory):
    base, ft = tiny_pair("llama")
    work = tmp_path_factory.mktemp("report")
    with single_thread():
        pm = work / "pm.safetensors"
        api.compress(base, ft, pm, ratio="1/8", method="prinmix", device="cpu", calibration=CalibrationConfig(nsamples=4, seqlen=32))
        low = work / "low.safetensors"
        api.compress(base, ft, low, ratio="1/8", method="lowrank", device="cpu")
        res = run_eval(base, [pm, low], finetuned=ft, config=EvalConfig(metrics="error", nsamples=2, seqlen=16, device="cpu"))
        eval_json = write_results(res, work / "results.json")[0]
        page = build_report(pm, work / "full", eval_json=eval_json, base=base, finetuned=ft,
                            options=ReportOptions(nsamples=2, seqlen=32, device="cpu"))
    return base, ft, pm, low, page


def _check_page(page):
    text = page.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    checker = _Checker()
    checker.feed(text)
    checker.close()
    assert not checker.errors and checker.stack == [], (checker.errors, checker.stack)
    assert checker.images and all(s.startswith("data:image/png;base64,") for s in checker.images)
    for src in checker.images:
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_MAGIC)
    assert "http://" not in text and "https://" not in text  # nothing to fetch
    pngs = sorted(page.parent.glob("*.png"))
    assert len(pngs) == len(checker.images)
    from PIL import Image

    for p in pngs:
        assert p.read_bytes().startswith(PNG_MAGIC)
        with Image.open(p) as im:
            im.verify()
    return " ".join(checker.text), pngs


def test_full_report_files_html_and_pngs(made):
    page = made[4]
    text, pngs = _check_page(page)
    names = {p.name for p in pngs}
    assert {"widths_heatmap.png", "memory_per_width.png", "rank_bytes.png", "kendall_tau.png", "eval_error.png",
            "scaling_difference_0.png"} <= names
    for phrase in ("Bits per rank", "Kendall", "Evaluation results", "SVD of the true delta", "lowrank",
                   "model.layers.1.self_attn.q_proj.weight"):
        assert phrase in text


def test_true_svd_analysis(made):
    base, ft, pm, low, _ = made
    # low-rank keeps the top-k singular vectors in order: matching must find exactly 0..k-1
    for st in report_data(low, base, ft):
        k = st.kept_rank
        assert st.orig_index == list(range(k)), st.name
        assert min(st.match_cos) > 0.999
        assert st.widths_by_index == [16] * k + [0] * (min(st.shape) - k)
        assert st.discordant == 0 and st.gamma == 1.0
    stats = report_data(pm, base, ft)
    for st in stats:
        assert len(st.widths_by_index) == min(st.shape) and sorted(st.orig_index) == sorted(set(st.orig_index))
        assert sorted(w for w in st.widths_by_index if w) == sorted(st.widths_stored)
        assert st.tau == pytest.approx(kendalltau(st.widths_by_index, st.sigma_by_index).statistic)
        assert np.all(np.diff(st.sigma_by_index) <= 1e-6)
    stored = report_data(pm)
    assert [s.kept_rank for s in stored] == [s.kept_rank for s in stats]
    # the stored-factor σ estimate tracks the true σ of the matched ranks
    s0, t0 = stored[0], stats[0]
    true_kept = sorted((t0.sigma_true[i] for i in t0.orig_index), reverse=True)
    est = sorted(s0.sigma_est, reverse=True)
    assert est[0] == pytest.approx(true_kept[0], rel=0.3)


def test_concordance_counts_pairs_like_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(2, 25))
        w = rng.choice([0, 2, 3, 8], n)
        s = rng.choice(np.arange(6.0), n) if rng.random() < 0.5 else rng.random(n)
        c = d = 0
        for i, j in itertools.combinations(range(n), 2):
            x = np.sign(w[i] - w[j]) * np.sign(s[i] - s[j])
            c, d = c + (x > 0), d + (x < 0)
        assert concordance(w, s) == (c, d)


def test_bad_inputs(made, tmp_path):
    base, ft, pm, _, _ = made
    with pytest.raises(PrinmixError, match="go together"):
        build_report(pm, tmp_path / "x", base=base)
    with pytest.raises(PrinmixError, match="no compressed matrix"):
        build_report(pm, tmp_path / "x", options=ReportOptions(matrices=["nope.weight"]))
    bad = tmp_path / "e.json"
    bad.write_text("{}")
    with pytest.raises(PrinmixError, match="not a `prinmix eval` result"):
        build_report(pm, tmp_path / "x", eval_json=bad)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium); "
                                             "the page is still checked with html.parser above")
def test_page_renders_in_headless_chromium(made, tmp_path):
    page = made[4]
    shot = tmp_path / "shot.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,3000",
           page.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert shot.exists(), proc.stderr[-2000:]
    from PIL import Image

    with Image.open(shot) as im:
        rgb = im.convert("RGB")
        assert rgb.size == (1200, 3000)
        colours = rgb.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 200  # text, tables and plots, not a blank page
    top = max(colours)[0] / (1200 * 3000)
    assert top < 0.95  # the background does not fill the page


def test_cli_parsers_and_stored_view(made, tmp_path, capsys):
    import argparse

    from prinmix.cli.evaluate import add_eval_parser, add_report_parser

    base, ft, pm, low, _ = made
    parser = argparse.ArgumentParser(prog="prinmix")
    sub = parser.add_subparsers(dest="command", required=True)
    add_eval_parser(sub)
    add_report_parser(sub)
    a = parser.parse_args(["eval", str(base), str(pm), str(low), "--finetuned", str(ft), "--metrics", "error",
                           "--nsamples", "1", "--seqlen", "8", "--device", "cpu", "-o", str(tmp_path / "r.json")])
    assert a.fn(a) == 0
    out = capsys.readouterr().out
    assert "pm" in out and "low" in out and "lowrank" in out and (tmp_path / "r.layers.csv").exists()
    # the report without --base/--finetuned: σ and rank order from the stored factors
    a = parser.parse_args(["report", str(low), "-o", str(tmp_path / "rep"), "--eval", str(tmp_path / "r.json")])
    assert a.fn(a) == 0
    text, pngs = _check_page(tmp_path / "rep" / "index.html")
    assert "the stored factors" in text and "Evaluation results" in text
    assert {"scaling_difference_0.png", "eval_error.png"} <= {p.name for p in pngs}


def test_results_csv_numeric_columns_are_numbers(made):
    import csv

    csv_path = made[4].parent.parent / "results.csv"
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["model"] for r in rows] == ["base", "finetuned", "pm", "low"]
    for r in rows:
        for k, v in r.items():
            if k in ("model", "method"):
                continue
            assert v == "" or float(v) == float(v), (k, v)  # a number, or empty when not measured
    assert rows[0]["ratio"] == rows[0]["eq1_all"] == ""  # the base has no ratio and no Eq. 1 error
    for r in rows[2:]:
        assert 0 < float(r["ratio"]) < 1 and float(r["linear_MiB"]) > 0 and float(r["eq1_all"]) > 0


def test_page_has_no_empty_header_or_empty_depth_group_and_explains_each_figure(made):
    import re

    text = made[4].read_text(encoding="utf-8")
    for head in re.findall(r"<thead>(.*?)</thead>", text):
        cells = re.findall(r"<th>(.*?)</th>", head)
        assert cells and all(c.strip() for c in cells), head
    # the tiny model has 2 layers: no "low"/"mid" depth group (they would hold no layer)
    assert "low/all" not in text and "mid/all" not in text and "high/all" in text
    figures = re.findall(r'<img alt="([^"]+)"', text)
    looks = text.count("What to look at.")
    assert looks == len([f for f in figures if not re.match(r"scaling_difference_[1-9]", f)]) >= 6


def _drawn_figures(monkeypatch, make):
    """Run a figure function, returning the matplotlib Figures it drew (instead of PNG bytes), laid out."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from prinmix.evaluate.report import figures

    drawn = []
    monkeypatch.setattr(figures, "_png", lambda fig: drawn.append(fig) or b"png")
    make(figures)
    for fig in drawn:
        FigureCanvasAgg(fig).draw()
    return drawn


def test_figures_label_axes_keep_legends_off_data_and_ticks_integer(made, monkeypatch):
    """Every plotting axis has a y label; no legend overlaps an axis; rank/layer ticks are integers; the
    eval plot draws only depth groups that hold layers."""
    from prinmix.evaluate.results import load_eval_json

    base, ft, pm, _, page = made
    stats = report_data(pm, base, ft)
    results = load_eval_json(page.parent.parent / "results.json")

    def make(f):
        f.fig_width_heatmaps(stats, True)
        f.fig_memory_per_width(stats)
        f.fig_rank_bytes(stats)
        f.fig_kendall(stats)
        f.fig_scaling_difference(stats[0], np.ones((min(stats[0].shape), 2)), [2, 3])
        f.fig_eval_errors(results)

    figs = _drawn_figures(monkeypatch, make)
    assert len(figs) == 6
    integer_x = ("layer", "rank index", "rank")
    for fig in figs:
        renderer = fig.canvas.get_renderer()
        axes = [ax for ax in fig.axes if ax.get_visible() and ax.get_label() != "<colorbar>" and ax.axison]
        assert axes
        for ax in axes:
            assert ax.get_ylabel().strip(), ax.get_title()
            lo, hi = sorted(ax.get_xlim())
            if any(w in ax.get_xlabel() for w in integer_x) and ax.get_xscale() == "linear":
                ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
                assert ticks and all(float(t).is_integer() for t in ticks), (ax.get_xlabel(), ticks)
        legends = list(fig.legends) + [ax.get_legend() for ax in axes if ax.get_legend()]
        for leg in legends:
            box = leg.get_window_extent(renderer)
            for ax in axes:
                assert not box.overlaps(ax.get_window_extent(renderer)), (ax.get_title(), "legend over data")
    eval_fig = figs[-1]
    assert [t.get_text() for t in eval_fig.axes[0].get_xticklabels()] == ["high", "all"]  # 2 layers: no low/mid


def test_a_width_has_one_colour_on_the_whole_page():
    """Every figure colours a width the same (width_colour), whatever other widths it shows; all differ."""
    widths = [0, 1, 2, 3, 4, 5, 6, 7, 8, 16]
    assert len({to_hex(width_colour(w)) for w in widths}) == len(widths)
    for subset in ([2, 3], [0, 2, 3, 4, 5], [3, 8, 16]):
        cmap = width_colour_map(subset)
        assert [to_hex(cmap(i)) for i in range(len(subset))] == [to_hex(width_colour(w)) for w in subset]
