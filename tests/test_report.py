"""A run's ``report.html`` (:mod:`fedpeft.server.report`): written at the end of a real run,
self-contained (every image a data: PNG that opens), with the sections a reader needs, drawn
again from an old run directory by ``fedpeft report``, never failing the run -- and opened
in a real headless Chromium the way a user opens it (screenshot, no console error, every
image loaded).

The run directories are one real in-process run of the tiny model (DP, 3 clients, 2 rounds)
and hand-made ones in the format the round loop and the heterogeneous emulator write
(:class:`fedpeft.sim.hetero.hook.TimelineEntry` fields), for what a tiny run does not show:
a heterogeneous timeline, a causal-LM task with its round 0 and samples, many clients.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from inprocess_grid import LocalGrid
from PIL import Image

from fedpeft.server.report import REPORT_FILE, write_report, write_report_safely

BASE_SECTIONS = ("run", "summary", "metrics", "privacy", "bytes", "rounds")


class _Page(HTMLParser):
    """The ids of <section>s and the src of every <img> of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.images: list[tuple[str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "section":
            self.sections.append(a.get("id") or "")
        if tag == "img":
            self.images.append((a.get("alt") or "", a.get("src") or ""))


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def _check_page(run: Path, sections: tuple[str, ...]) -> _Page:
    """Every image is an embedded PNG that PIL opens, equal to its file in plots/; the sections are there."""
    page = _parse(run / REPORT_FILE)
    assert set(sections) <= set(page.sections), (sections, page.sections)
    assert page.images
    for alt, src in page.images:
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix), f"{alt}: not an embedded PNG ({src[:40]!r})"
        data = base64.b64decode(src[len(prefix):], validate=True)
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
            assert img.format == "PNG" and img.size[0] > 200 and img.size[1] > 100, (alt, img.size)
        assert (run / "plots" / f"{alt}.png").read_bytes() == data, f"{alt}: embedded image differs from its file"
    return page


# ---- run directories ---------------------------------------------------------------------
def _row(r: int, clients: int, metric: str = "accuracy", dp: bool = True, **extra: Any) -> dict[str, Any]:
    return {"round": r, metric: 0.5 + 0.1 * r, "loss": 0.7 - 0.05 * r,
            "epsilon": 1.5 * r if dp else "inf",
            "epsilon_per_client": {str(c): (1.5 * r - 0.01 * c) if dp else "inf" for c in range(clients)},
            "delta": 1e-5, "accountant": "pld" if dp else "none", "bytes_up": 1000 * clients, "bytes_down": 900 * clients,
            "seconds": 1.0, "train_loss": None if dp else 0.6, "clients_sent": clients, "clients_accepted": clients,
            "skipped": False, "method": "ffa_lora", **extra}


def _hand_made(path: Path, rows: list[dict[str, Any]], task_type: str = "seq-cls", epsilon: str = "6.0",
               ledgers: int = 0) -> Path:
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "config.toml").write_text(f'task_type = "{task_type}"\n[privacy]\nepsilon = {epsilon}\ndelta = 1e-05\n'
                                      f'[train]\nrounds = {len(rows)}\nclients = 3\n')
    (path / "ledger").mkdir()
    for c in range(ledgers):
        (path / "ledger" / f"client-{c}.json").write_text(json.dumps({
            "client": str(c), "target_epsilon": 6.0 if c else 4.0, "delta": 1e-5, "accountant": "pld",
            "entries": [{"round": r["round"], "noise_multiplier": 1.1, "sample_rate": 0.2, "steps": 2,
                         "epsilon_after": r["epsilon"]} for r in rows]}))
    return path


def _hetero(path: Path) -> Path:
    from fedpeft.sim.hetero.hook import TIMELINE_FILE, TimelineEntry

    rows = [_row(r, 3, sim_seconds=4.0 * r, sim_clock=4.0 * r * (r + 1) / 2,
                 hetero={"accepted": 2, "late": 1, "surplus": 0, "crashed": 0, "offline": 0, "declined": 0})
            for r in (1, 2)]
    _hand_made(path, rows)
    entries = [TimelineEntry(round=r, client=str(c), profile=("phone", "laptop", "phone")[c],
                             status="late" if c == 2 else "accepted", download_s=0.5, compute_s=1.0 + c,
                             upload_s=0.2, end_s=1.7 + c, estimated_compute_s=0.1, rank=8, physical_batch=8,
                             bytes_up=1000) for r in (1, 2) for c in range(3)]
    (path / TIMELINE_FILE).write_text("".join(json.dumps(asdict(e)) + "\n" for e in entries))
    return path


@dataclass
class RealRun:
    path: Path
    rows: list[dict[str, Any]]
    report_after_run: bool  # report.html right after the run (whose report was made to fail)
    log: str  # server.log then
    cli_status: int  # of `fedpeft report RUN_DIR` afterwards


@pytest.fixture(scope="module")
def real_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> RealRun:
    """One real in-process run (the real round loop and ClientApp; DP, 3 clients, 2 rounds) whose
    end-of-run report raises, then ``fedpeft report`` on its directory."""
    from flwr.supercore.task_identity import TaskIdentity

    from fedpeft.cli.main import main
    from fedpeft.load import parse_config
    from fedpeft.server import report
    from fedpeft.server.loop import run_federation

    def boom(path: Path) -> Path:
        raise RuntimeError("no plots today")

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    run = tmp_path_factory.mktemp("report") / "run"
    cfg = parse_config({"model.path": str(tiny_model_dir), "model.max_length": 16, "data.examples_per_client": 16,
                        "data.test_size": 16, "train.clients": 3, "train.rounds": 2, "train.batch_size": 16,
                        "train.local_steps": 1, "privacy.epsilon": 3.0, "output_dir": str(run)})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(report, "write_report", boom)
        rows = run_federation(LocalGrid(3), cfg, run)  # type: ignore[arg-type]
    after, log = (run / REPORT_FILE).exists(), (run / "server.log").read_text()
    return RealRun(run, rows, after, log, main(["report", str(run)]))


# ---- the page ----------------------------------------------------------------------------
def test_the_round_loop_survives_a_failing_report(real_run: RealRun) -> None:
    assert [r["round"] for r in real_run.rows] == [1, 2] and (real_run.path / "adapter").is_dir()
    assert not real_run.report_after_run
    said = [line for line in real_run.log.splitlines() if "report not written" in line]
    assert len(said) == 1 and "RuntimeError: no plots today" in said[0]  # the loop called it, one line


def test_fedpeft_report_draws_a_real_run_from_its_files(real_run: RealRun) -> None:
    assert real_run.cli_status == 0
    page = _check_page(real_run.path, BASE_SECTIONS)
    assert [alt for alt, _ in page.images] == ["metrics_per_round", "epsilon_per_client", "bytes_per_round"]
    text = (real_run.path / REPORT_FILE).read_text()
    assert "Client ledgers" in text and "target epsilon 3 per client" in text
    assert "http://" not in text and "https://" not in text  # self-contained: nothing to fetch


def test_hetero_run_shows_the_client_timeline(tmp_path: Path) -> None:
    run = _hetero(tmp_path / "run")
    write_report(run)
    page = _check_page(run, (*BASE_SECTIONS, "timeline"))
    assert "client_timeline" in [alt for alt, _ in page.images]


def test_causal_lm_reports_its_metric_per_task_round_zero_and_samples(tmp_path: Path) -> None:
    rows = [_row(r, 2, metric="exact_match", perplexity=3.0, exact_match_per_task={"colour": 0.5, "count": 0.1 * r})
            for r in (1, 2)]  # a multi-task run's strata: one more line each
    run = _hand_made(tmp_path / "run", rows, task_type="causal-lm")
    (run / "initial_eval.json").write_text(json.dumps({"round": 0, "exact_match": 0.1, "loss": 1.0}))
    (run / "samples").mkdir()
    (run / "samples" / "round-002.jsonl").write_text(json.dumps(
        {"task": "colour", "prompt": "Sky?", "reference": "blue", "generated": "<b>blue</b>"}) + "\n")
    write_report(run)
    _check_page(run, (*BASE_SECTIONS, "samples"))
    text = (run / REPORT_FILE).read_text()
    assert "final test exact_match" in text and "round 0" in text
    assert "&lt;b&gt;blue&lt;/b&gt;" in text  # a model's answer is text, never markup


def test_no_dp_run_says_so_and_draws_no_epsilon(tmp_path: Path) -> None:
    run = _hand_made(tmp_path / "run", [_row(r, 3, dp=False) for r in (1, 2)], epsilon="inf")
    write_report(run)
    page = _check_page(run, BASE_SECTIONS)
    assert "epsilon_per_client" not in [alt for alt, _ in page.images]
    assert "No DP in this run" in (run / REPORT_FILE).read_text()


def test_many_clients_and_own_targets(tmp_path: Path) -> None:
    run = _hand_made(tmp_path / "run", [_row(r, 200) for r in (1, 2, 3)], ledgers=2)
    write_report(run)
    _check_page(run, BASE_SECTIONS)


def test_fedpeft_report_writes_an_old_run_directory_again(tmp_path: Path) -> None:
    from fedpeft.cli.main import main

    run = _hand_made(tmp_path / "old", [_row(r, 3) for r in (1, 2)], ledgers=3)
    (run / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text() + '{"round": 3, "accur')  # torn line
    assert not (run / REPORT_FILE).exists()
    assert main(["report", str(run)]) == 0
    _check_page(run, BASE_SECTIONS)
    assert "metrics.jsonl line 3 is not JSON" in (run / REPORT_FILE).read_text()
    assert main(["report", str(tmp_path / "nothing")]) == 2


def test_a_failing_report_is_one_log_line(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from fedpeft.server import report_plots

    run = _hand_made(tmp_path / "run", [_row(1, 3)])
    monkeypatch.setattr(report_plots, "bytes_per_round", lambda *a: 1 / 0)
    with caplog.at_level(logging.INFO, logger="fedpeft.report"):
        assert write_report_safely(run) is None
    lines = [r.getMessage() for r in caplog.records if r.name == "fedpeft.report"]
    assert len(lines) == 1 and "report not written (ZeroDivisionError" in lines[0] and "\n" not in lines[0]
    with pytest.raises(ZeroDivisionError):
        write_report(run)


def test_the_loop_writes_the_report_unless_told_not_to(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedpeft.server.loop import _write_report
    from fedpeft.server.run_dir import RunDir

    run = _hand_made(tmp_path / "run", [_row(1, 3)])
    monkeypatch.setenv("FEDPEFT_REPORT", "0")
    _write_report(RunDir(run))
    assert not (run / REPORT_FILE).exists()
    monkeypatch.delenv("FEDPEFT_REPORT")
    _write_report(RunDir(run))
    assert (run / REPORT_FILE).is_file()


def test_matplotlib_builds_its_font_cache_quietly(tmp_path: Path) -> None:
    """On a fresh machine matplotlib logs "building the font cache" from a 5 s timer; the timer
    is made immediate here so the line would appear, and it must not."""
    code = ("import threading; T = threading.Timer\n"
            "threading.Timer = lambda _t, f, *a, **k: T(0, f, *a, **k)\n"
            "import fedpeft.server.figures\n"
            "import time; time.sleep(0.2)\n")
    env = {**os.environ, "MPLCONFIGDIR": str(tmp_path / "mpl"), "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "font cache" not in done.stderr + done.stdout
    assert list((tmp_path / "mpl").glob("fontlist-*.json")), "the cache was not built: the check saw nothing"


# ---- a real browser ----------------------------------------------------------------------
def _browser() -> str | None:
    """A Chromium on this machine: $FEDPEFT_CHROMIUM, one on PATH, or Playwright's own download."""
    for cand in (os.environ.get("FEDPEFT_CHROMIUM", ""), "/usr/lib/chromium/chromium",
                 *(shutil.which(n) or "" for n in ("chromium", "chromium-browser", "google-chrome", "chrome"))):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return cand
    try:
        from playwright.sync_api import sync_playwright

        with sync_playwright() as p:
            own = p.chromium.executable_path
        return own if Path(own).is_file() else None
    except Exception:  # no playwright, or its driver cannot start
        return None


def _open(browser: Any, run: Path) -> tuple[list[str], list[list[Any]], bytes]:
    """(console errors and warnings, page errors and failed requests; [alt, complete, naturalWidth]
    of every image; a full-page screenshot) of the run's report opened from disk."""
    page = browser.new_page(viewport={"width": 1200, "height": 800})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"{m.type}: {m.text}") if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
    page.goto((run / REPORT_FILE).resolve().as_uri(), wait_until="load")
    images = page.evaluate("[...document.images].map(i => [i.alt, i.complete, i.naturalWidth])")
    shot = page.screenshot(full_page=True)
    page.close()
    return problems, images, shot


def test_report_in_a_headless_browser(real_run: RealRun, tmp_path: Path) -> None:
    """Open report.html as a user would (file://, a real Chromium): a full-page screenshot is
    taken, no console error or page error, every image decoded (naturalWidth > 0)."""
    sync = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install playwright; "
                               "the wheel ships no browser: it drives a local Chromium)").sync_playwright
    exe = _browser()
    if exe is None:
        pytest.skip("no Chromium on this machine (apt install chromium, or set FEDPEFT_CHROMIUM to its binary)")
    hetero = _hetero(tmp_path / "hetero")
    write_report(hetero)
    with sync() as p:
        browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        try:
            for run in (real_run.path, hetero):
                problems, images, shot = _open(browser, run)
                assert not problems, problems
                assert images and all(done and width > 0 for _, done, width in images), images
                assert len(images) == len(_parse(run / REPORT_FILE).images)
                with Image.open(io.BytesIO(shot)) as img:
                    assert img.format == "PNG" and img.size[0] == 1200 and img.size[1] > 1500, img.size
                    assert len(set(img.convert("L").resize((64, 64)).getdata())) > 8  # not a blank page
        finally:
            browser.close()
