"""The rating page in a real headless Chromium (Debian's, driven by Playwright), against
``img-guidance study serve`` run as a subprocess: a rater votes on every pair with the mouse and the
keys 1 / 2 / 3, reloads midway, undoes; the server is SIGKILLed and restarted and no acknowledged vote
is lost; two raters vote at the same time; the results command then reports exactly the votes cast.

Every vote the test casts is recorded from what the page showed (which image was on the left), and
compared with the rows committed in ``study.sqlite`` and with ``study results``. Screenshots of the
rating page and of the results chart go to $IMG_GUIDANCE_SCREENSHOTS (default: pytest's tmp dir).

The tests skip, saying why, where no chromium or no playwright is installed (``make install`` puts
both there, as root); the skip reason is printed in pytest's summary."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import queue
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from img_guidance.cli import app
from img_guidance.study.pairs import pairs_from_generate, sample_study
from img_guidance.study.store import DATABASE, create_study
from tests.test_study import generate_folder

PROMPTS = [
    "a red circle",
    "two blue squares",
    "a green triangle",
    "a yellow star",
    "three purple dots",
    "a cat",
]
TRIALS = len(PROMPTS) + 2  # two check pairs shown twice
KEYS = {"left": "1", "right": "2", "tie": "3"}


def chromium() -> str | None:
    for candidate in (os.environ.get("IMG_GUIDANCE_CHROMIUM"), "chromium", "chromium-browser"):
        if candidate and (path := shutil.which(candidate)):
            return path
    return None


@pytest.fixture(scope="module")
def browser():
    reason = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        reason = 'playwright is not installed (make install, or pip install -e ".[dev]")'
    if reason is None and chromium() is None:
        reason = "no chromium on this machine (make install runs apt-get install chromium, as root)"
    if reason is not None:
        pytest.skip(reason)
    with sync_playwright() as playwright:
        # the system's Chromium: nothing is downloaded at test time
        browser = playwright.chromium.launch(executable_path=chromium(), headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    folder = os.environ.get("IMG_GUIDANCE_SCREENSHOTS")
    path = Path(folder) if folder else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def study(tmp_path):
    """A study of six prompts, two of them check pairs: 8 trials per rater. Returns the folder and
    the names of system a's images (the initial ones) as the study stores them."""
    gen = generate_folder(tmp_path / "gen", PROMPTS)
    pairs = pairs_from_generate(gen)
    sample, checks = sample_study(pairs, count=None, repeats=2, seed=1)
    store = create_study(tmp_path / "study", sample, checks, names=("initial", "calibrated"), seed=1)
    a_files = {hashlib.sha1(p.a.read_bytes()).hexdigest() + ".png" for p in pairs}
    return store.root, a_files


class Server:
    """``img-guidance study serve`` in a subprocess; ``start`` again after ``kill`` reuses the port."""

    def __init__(self, study: Path):
        self.study, self.port, self.process = study, 0, None
        self.lines: queue.Queue[str] = queue.Queue()

    def start(self) -> Server:
        command = [
            sys.executable,
            "-m",
            "img_guidance.cli",
            "study",
            "serve",
            str(self.study),
            "--port",
            str(self.port),
        ]
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        threading.Thread(target=self._drain, args=(self.process.stdout,), daemon=True).start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                assert self.process.poll() is None, f"the server exited with {self.process.returncode}"
                continue
            if match := re.search(r"http://127\.0\.0\.1:(\d+)/", line):
                self.port = int(match[1])
                return self
        raise AssertionError("the server did not say where it listens within 30 s")

    def _drain(self, stream) -> None:
        for line in stream:
            self.lines.put(line)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def kill(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)  # no shutdown handler, no flush: only what was committed
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


@pytest.fixture
def server(study):
    server = Server(study[0]).start()
    yield server
    server.stop()


class Rater:
    """One rater's page: votes with the mouse or the keys, and the votes the page acknowledged, as
    {trial id: choice}, with the system each vote went to (from the image shown on the left)."""

    def __init__(self, page, a_files: set[str]):
        self.page, self.a_files = page, a_files
        self.cast: dict[int, str] = {}  # trial -> choice, as the page showed it acknowledged
        self.outcomes: dict[int, tuple[str, bool]] = {}  # trial -> (a / b / tie, a repeat?)
        self.order: list[int] = []  # trials in the order voted, for undo
        self.prompts_seen: dict[str, int] = {}

    def shown(self) -> dict:
        return self.page.evaluate(
            """() => ({
                pair: document.getElementById("trial").dataset.pair,
                left: document.getElementById("left").getAttribute("src"),
                prompt: document.getElementById("prompt").textContent,
                progress: document.getElementById("progress-text").textContent,
                state: document.body.dataset.state})"""
        )

    def settled(self, progress: str) -> None:
        """Wait until the page is idle and shows ``progress`` ("3 of 8")."""
        self.page.wait_for_function(
            """p => ["ready", "finished"].includes(document.body.dataset.state)
                   && document.getElementById("progress-text").textContent === p""",
            arg=progress,
        )

    def done(self) -> int:
        return int(self.shown()["progress"].split()[0])

    def press(self, choice: str, *, mouse: bool) -> tuple[int, int]:
        """Start a vote; returns (trial, done before) for :meth:`confirm`."""
        shown = self.shown()
        assert shown["state"] == "ready", shown
        trial, done = int(shown["pair"]), int(shown["progress"].split()[0])
        a_left = shown["left"].removeprefix("/images/") in self.a_files
        repeat = shown["prompt"] in self.prompts_seen and self.prompts_seen[shown["prompt"]] != trial
        self._pending = (trial, choice, shown["prompt"], repeat, a_left)
        if mouse:
            self.page.click(f"#vote-{choice}")
        else:
            self.page.keyboard.press(KEYS[choice])
        return trial, done

    def confirm(self, done: int) -> None:
        self.settled(f"{done + 1} of {TRIALS}")
        trial, choice, prompt, repeat, a_left = self._pending
        self.cast[trial] = choice
        self.outcomes[trial] = (
            "tie" if choice == "tie" else "a" if (choice == "left") == a_left else "b",
            repeat,
        )
        self.order.append(trial)
        self.prompts_seen.setdefault(prompt, trial)

    def vote(self, choice: str, *, mouse: bool) -> int:
        trial, done = self.press(choice, mouse=mouse)
        self.confirm(done)
        return trial

    def undo(self, *, mouse: bool) -> int:
        done = self.done()
        if mouse:
            self.page.click("#undo")
        else:
            self.page.keyboard.press("u")
        self.settled(f"{done - 1} of {TRIALS}")
        trial = self.order.pop()
        del self.cast[trial], self.outcomes[trial]
        for prompt, first in list(self.prompts_seen.items()):
            if first == trial:
                del self.prompts_seen[prompt]
        return trial


def open_rater(browser, server: Server, name: str, a_files: set[str]) -> Rater:
    """A fresh browser session that signs in through the form, by mouse."""
    page = browser.new_context(viewport={"width": 1100, "height": 760}).new_page()
    page.set_default_timeout(15000)
    page.goto(server.url + "/")
    page.fill("#rater", name)
    page.click("#start")
    page.wait_for_url(re.compile(r"/rate\?rater="))
    rater = Rater(page, a_files)
    rater.settled(f"0 of {TRIALS}")
    return rater


def committed(study: Path) -> dict[str, dict[int, str]]:
    """{rater: {trial: choice}} as study.sqlite holds them, read straight from the database."""
    con = sqlite3.connect(study / DATABASE)
    try:
        rows = con.execute(
            """SELECT r.name, t.id, v.choice FROM votes v
               JOIN trials t ON t.id = v.trial JOIN raters r ON r.id = t.rater"""
        ).fetchall()
    finally:
        con.close()
    out: dict[str, dict[int, str]] = {}
    for name, trial, choice in rows:
        out.setdefault(name, {})[trial] = choice
    return out


def results_match(study: Path, raters: dict[str, Rater]) -> dict:
    """``study results --json`` counts exactly the first-showing votes the raters cast, per system."""
    shown = CliRunner().invoke(app, ["study", "results", str(study), "--json", "--resamples", "200"])
    assert shown.exit_code == 0, shown.output
    result = json.loads(shown.stdout)
    counted = Counter(o for r in raters.values() for o, repeat in r.outcomes.values() if not repeat)
    assert result["votes"] == sum(counted.values())
    assert (result["a"]["votes"], result["b"]["votes"], result["tie_votes"]) == (
        counted["a"],
        counted["b"],
        counted["tie"],
    )
    assert result["raters"] == len(raters)
    assert result["check_votes"] == sum(repeat for r in raters.values() for _, repeat in r.outcomes.values())
    return result


def test_a_rater_votes_with_mouse_and_keys_reloads_and_undoes(browser, server, study, screenshots):
    root, a_files = study
    alice = open_rater(browser, server, "alice", a_files)
    alice.page.screenshot(path=screenshots / "rating-page.png")
    assert (screenshots / "rating-page.png").read_bytes().startswith(b"\x89PNG")
    assert "Which image matches the prompt better?" in alice.page.inner_text("main")
    # 1. Three votes: the mouse, then the keys
    alice.vote("left", mouse=True)
    alice.vote("right", mouse=False)
    third = alice.vote("tie", mouse=False)
    # 2. A reload carries on where the rater was
    alice.page.reload()
    alice.settled(f"3 of {TRIALS}")
    assert int(alice.shown()["pair"]) not in alice.cast
    assert alice.page.get_attribute("#bar", "value") == "3"
    # 3. Undo (the key) brings the last pair back; it gets another answer
    assert alice.undo(mouse=False) == third
    assert int(alice.shown()["pair"]) == third
    assert alice.vote("right", mouse=True) == third
    # 4. The rest, alternating keys and mouse and all three answers
    choices = ["left", "tie", "right", "left", "right"]
    for i, choice in enumerate(choices):
        alice.vote(choice, mouse=i % 2 == 0)
    assert alice.shown()["state"] == "finished" and alice.page.is_visible("#finished")
    # 5. Undo after the last pair (the button), and vote again
    last = alice.undo(mouse=True)
    assert alice.page.is_visible("#trial") and int(alice.shown()["pair"]) == last
    alice.vote("tie", mouse=False)
    assert len(alice.cast) == TRIALS
    assert committed(root) == {"alice": alice.cast}
    results_match(root, {"alice": alice})


def test_no_acknowledged_vote_is_lost_when_the_server_is_killed(browser, server, study):
    root, a_files = study
    bob = open_rater(browser, server, "bob", a_files)
    for choice in ("left", "tie", "right"):
        bob.vote(choice, mouse=False)
    server.kill()
    # 1. While the server is down a vote is refused on the page, and the page does not move on
    bob.page.keyboard.press("1")
    bob.page.wait_for_function(
        """() => document.getElementById("status").textContent.includes("not saved")"""
    )
    assert bob.shown()["progress"] == f"3 of {TRIALS}"
    # 2. Restarted on the same port: a reload shows the three committed votes and goes on
    server.start()
    assert committed(root) == {"bob": bob.cast}
    bob.page.reload()
    bob.settled(f"3 of {TRIALS}")
    while bob.shown()["state"] == "ready":
        bob.vote("left", mouse=True)
    assert committed(root) == {"bob": bob.cast} and len(bob.cast) == TRIALS

    # 3. Scripts voting through the API in four threads, killed mid-stream: every vote the server
    # acknowledged is in the database after the restart
    acknowledged: dict[str, dict[int, str]] = {f"script{i}": {} for i in range(4)}

    def script(name: str) -> None:
        try:
            while True:
                with urllib.request.urlopen(f"{server.url}/api/next?rater={name}", timeout=5) as r:
                    trial = json.load(r)["pair"]
                if trial is None:
                    return
                body = json.dumps({"rater": name, "pair": trial, "choice": "right"}).encode()
                request = urllib.request.Request(
                    f"{server.url}/api/vote", data=body, headers={"Content-Type": "application/json"}
                )
                with urllib.request.urlopen(request, timeout=5) as r:
                    assert r.status == 200
                acknowledged[name][trial] = "right"
        except (OSError, http.client.HTTPException):  # URLError, reset, timeout, a cut answer
            return  # the server is gone

    threads = [threading.Thread(target=script, args=(name,)) for name in acknowledged]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 20
    while sum(map(len, acknowledged.values())) < 10 and time.monotonic() < deadline:
        time.sleep(0.01)
    server.kill()
    for thread in threads:
        thread.join(timeout=10)
    total = sum(map(len, acknowledged.values()))
    assert total >= 10, acknowledged
    server.start()
    stored = committed(root)
    for name, votes in acknowledged.items():
        assert votes.items() <= stored.get(name, {}).items(), name
        # a vote in flight at the kill may be committed without its answer, never more than one
        assert len(stored.get(name, {})) - len(votes) in (0, 1), name
    assert stored["bob"] == bob.cast


def test_two_raters_vote_at_the_same_time_and_results_count_every_vote(browser, server, study, screenshots):
    root, a_files = study
    carol = open_rater(browser, server, "carol", a_files)
    dave = open_rater(browser, server, "dave", a_files)
    choices = ["left", "right", "tie", "right", "right", "left", "tie", "right"]
    for i, choice in enumerate(choices):
        # both key presses go out before either answer comes back
        carol_vote = carol.press(choice, mouse=False)
        dave_vote = dave.press("left" if choice == "right" else "right", mouse=i % 2 == 1)
        carol.confirm(carol_vote[1])
        dave.confirm(dave_vote[1])
    assert carol.shown()["state"] == dave.shown()["state"] == "finished"
    assert committed(root) == {"carol": carol.cast, "dave": dave.cast}
    result = results_match(root, {"carol": carol, "dave": dave})
    assert result["a"]["preferred"] + result["b"]["preferred"] + result["ties"] == pytest.approx(1.0)
    chart = root / "results" / "preference.png"
    page = browser.new_page(viewport={"width": 940, "height": 700})
    page.goto(chart.as_uri())
    size = page.evaluate("() => [document.images[0].naturalWidth, document.images[0].naturalHeight]")
    assert size[0] > 500 and size[1] > 300  # the browser decodes and shows the chart
    page.screenshot(path=screenshots / "results-chart.png")
    page.close()
    assert (screenshots / "results-chart.png").read_bytes().startswith(b"\x89PNG")
