"""The A/B preference study without a browser: pairing and sampling, each rater's trials and their
swapped repeats, the statistics against numbers worked out by hand, the database's rules (one vote per
rater and pair, undo, invites), and bad input to the JSON API and the CLI, which must change nothing."""

from __future__ import annotations

import json
import socket
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from img_guidance.cli import app
from img_guidance.outputs import OutputFolder, entry_name
from img_guidance.study.pairs import (
    SourcePair,
    outcome,
    pairs_from_folders,
    pairs_from_generate,
    rater_trials,
    sample_study,
)
from img_guidance.study.stats import Vote, crossed_bootstrap, fleiss_kappa, rater_consistency, summarize
from img_guidance.study.store import (
    NotInvited,
    StudyError,
    StudyStore,
    UnknownPair,
    UnknownRater,
    create_study,
)
from tests.test_cli_errors import one_line_error, snapshot

runner = CliRunner()
PROMPTS = ["a red circle", "two blue squares", "a green triangle", "a yellow star", "three purple dots"]


def generate_folder(root, prompts=PROMPTS, *, seed=0):
    """A folder as ``img-guidance generate`` writes it (through its own OutputFolder): initial images
    reddish, calibrated bluish, each prompt a different shade."""
    folder = OutputFolder(root)
    folder.start({"model": "test"})
    for i, prompt in enumerate(prompts):
        initial = Image.new("RGB", (24, 24), (200, 20 * i, 0))
        calibrated = Image.new("RGB", (24, 24), (0, 20 * i, 200))
        folder.write(
            entry_name(prompt, seed), initial, [calibrated], {"index": i, "prompt": prompt, "seed": seed}
        )
    return root


def mapping_folder(root, entries, *, system=None):
    """A folder of images with images.jsonl: entries are (prompt, seed, colour)."""
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (prompt, seed, colour) in enumerate(entries):
        Image.new("RGB", (16, 16), colour).save(root / f"{i}.png")
        line = {"file": f"{i}.png", "prompt": prompt, "seed": seed}
        lines.append(line if system is None else {**line, "system": system})
    (root / "images.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root


@pytest.fixture
def study(tmp_path):
    """A study of all five prompts of a generate folder, two of them checks."""
    pairs = pairs_from_generate(generate_folder(tmp_path / "gen"))
    sample, checks = sample_study(pairs, count=None, repeats=2, seed=3)
    return create_study(tmp_path / "study", sample, checks, names=("initial", "calibrated"), seed=3)


# -- pairing and sampling ------------------------------------------------------------------------


def test_a_generate_folder_pairs_initial_with_calibrated(tmp_path):
    root = generate_folder(tmp_path / "gen")
    pairs = pairs_from_generate(root)
    assert [p.key for p in pairs] == [(p, 0) for p in PROMPTS]
    for pair in pairs:
        assert pair.a.parent.name == "initial" and pair.b.parent.name == "calibrated"
        assert pair.a.stem == pair.b.stem == entry_name(pair.prompt, 0)
    other = mapping_folder(tmp_path / "other", [("x", 0, "red")], system="sdxl")
    with pytest.raises(ValueError, match=r"not a generate folder .*systems sdxl"):
        pairs_from_generate(other)


def test_two_folders_pair_by_prompt_and_seed_and_name_the_unmatched(tmp_path):
    a = mapping_folder(tmp_path / "a", [("cat", 0, "red"), ("dog", 1, "red"), ("cat", 1, "red")])
    b = mapping_folder(tmp_path / "b", [("cat", 1, "blue"), ("cat", 0, "blue"), ("dog", 1, "blue")])
    (name_a, name_b), pairs = pairs_from_folders(a, b)
    assert (name_a, name_b) == ("a", "b")
    assert {p.key: (p.a.name, p.b.name) for p in pairs} == {
        ("cat", 0): ("0.png", "1.png"),
        ("dog", 1): ("1.png", "2.png"),
        ("cat", 1): ("2.png", "0.png"),
    }
    c = mapping_folder(tmp_path / "c", [("cat", 0, "blue"), ("bird", 0, "blue"), ("dog", 2, "blue")])
    with pytest.raises(ValueError) as err:
        pairs_from_folders(a, c)
    message = str(err.value)
    assert "2 only in --a" in message and "'dog' (seed 1)" in message and "'cat' (seed 1)" in message
    assert "2 only in --b" in message and "'bird' (seed 0)" in message and "'dog' (seed 2)" in message
    # a generate folder gives its calibrated images; two folders of one name are told apart
    gen = generate_folder(tmp_path / "x" / "run", ["cat"])
    gen2 = generate_folder(tmp_path / "y" / "run", ["cat"])
    (name_a, name_b), pairs = pairs_from_folders(gen, gen2)
    assert (name_a, name_b) == ("run (a)", "run (b)") and pairs[0].a.parent.name == "calibrated"
    mixed = mapping_folder(tmp_path / "mixed", [("cat", 0, "red")])
    with (mixed / "images.jsonl").open("a") as f:
        f.write(json.dumps({"file": "0.png", "prompt": "cat", "seed": 0, "system": "other"}) + "\n")
    with pytest.raises(ValueError, match=r"--a .*mixed holds several systems \(mixed, other\)"):
        pairs_from_folders(mixed, b)


def test_sampling_is_reproducible_whatever_the_folder_order():
    pairs = [SourcePair(f"p{i}", i % 3, f"a{i}.png", f"b{i}.png") for i in range(20)]
    sample, checks = sample_study(pairs, count=8, repeats=3, seed=7)
    again, checks_again = sample_study(list(reversed(pairs)), count=8, repeats=3, seed=7)
    assert sample == again and checks == checks_again
    assert len(set(sample)) == 8 and len(set(checks)) == 3 and all(0 <= c < 8 for c in checks)
    other, _ = sample_study(pairs, count=8, repeats=3, seed=8)
    assert other != sample
    everything, _ = sample_study(pairs, count=None, repeats=0, seed=7)
    assert sorted(everything, key=lambda p: p.prompt) == sorted(pairs, key=lambda p: p.prompt)
    with pytest.raises(ValueError, match=r"--pairs must lie in \[1, 20\].*got 21"):
        sample_study(pairs, count=21, repeats=0, seed=0)
    with pytest.raises(ValueError, match=r"--repeats must lie in \[0, 8\].*got 9"):
        sample_study(pairs, count=8, repeats=9, seed=0)


def test_each_rater_sees_every_pair_once_and_each_check_again_with_sides_swapped():
    pairs, checks = list(range(10, 22)), [11, 15, 20]
    trials = rater_trials(pairs, checks, seed=0, rater="alice")
    assert len(trials) == len(pairs) + len(checks)
    first = [t for t in trials if not t.repeat]
    assert sorted(t.pair for t in first) == pairs
    position = {(t.pair, t.repeat): i for i, t in enumerate(trials)}
    for pair in checks:
        original, repeat = trials[position[(pair, False)]], trials[position[(pair, True)]]
        assert repeat.a_left == (not original.a_left)
        assert position[(pair, True)] >= len(pairs) // 2 > position[(pair, False)]
    assert rater_trials(pairs, checks, seed=0, rater="alice") == trials  # drawn from the seed and name
    bob = rater_trials(pairs, checks, seed=0, rater="bob")
    assert [t.pair for t in bob] != [t.pair for t in trials] or [t.a_left for t in bob] != [
        t.a_left for t in trials
    ]
    sides = [t.a_left for name in "abcdefgh" for t in rater_trials(pairs, [], seed=1, rater=name)]
    assert 0.3 < np.mean(sides) < 0.7  # left / right is drawn, not fixed
    with pytest.raises(ValueError, match=r"check pairs \[99\]"):
        rater_trials(pairs, [99], seed=0, rater="x")


def test_a_click_maps_to_the_system_on_that_side():
    assert outcome("left", a_left=True) == "a" and outcome("right", a_left=True) == "b"
    assert outcome("left", a_left=False) == "b" and outcome("right", a_left=False) == "a"
    assert outcome("tie", a_left=False) == "tie"
    with pytest.raises(ValueError, match="got 'both'"):
        outcome("both", a_left=True)


# -- statistics ----------------------------------------------------------------------------------


def votes_from(table: dict[str, str], repeats: dict[str, str] | None = None) -> list[Vote]:
    """Votes from {rater: outcomes of pairs 0, 1, ... as a string of a / b / t} (and the same for the
    repeats of pairs 0, 1, ...)."""
    code = {"a": "a", "b": "b", "t": "tie"}
    votes = [Vote(r, p, code[o]) for r, row in table.items() for p, o in enumerate(row)]
    votes += [
        Vote(r, p, code[o], repeat=True) for r, row in (repeats or {}).items() for p, o in enumerate(row)
    ]
    return votes


def test_preference_rates_and_kappa_by_hand():
    """3 raters x 4 pairs: 7 votes for b, 3 for a, 2 ties -> b 7/12, a 3/12, ties 2/12.
    Fleiss' kappa over the pairs: per pair (a, b, tie) counts (0,3,0) (1,2,0) (1,1,1) (1,1,1);
    agreement per pair 1, 1/3, 0, 0 -> P = 1/3; p = (3, 7, 2) / 12 -> Pe = (9 + 49 + 4) / 144 = 62/144;
    kappa = (1/3 - 62/144) / (1 - 62/144) = (48 - 62) / 82 = -7/41."""
    votes = votes_from({"r1": "bbat", "r2": "bbtb", "r3": "baba"})
    result = summarize(votes, names=("base", "img"), resamples=2000)
    assert result["a"]["name"] == "base" and result["b"]["name"] == "img"
    assert (result["a"]["votes"], result["b"]["votes"], result["tie_votes"], result["votes"]) == (3, 7, 2, 12)
    assert result["b"]["preferred"] == pytest.approx(7 / 12) and result["a"]["preferred"] == pytest.approx(
        3 / 12
    )
    assert result["ties"] == pytest.approx(2 / 12)
    assert result["kappa"] == pytest.approx(-7 / 41)
    assert (result["raters"], result["pairs"], result["check_votes"]) == (3, 4, 0)
    for key, rate in (("a", 3 / 12), ("b", 7 / 12)):
        low, high = result[key]["ci95"]
        assert 0 <= low <= rate <= high <= 1
    assert result["consistent"]["votes"] == 12  # no checks answered: nobody is left out
    json.dumps(result)  # the CLI prints it as it is


def test_fleiss_kappa_matches_the_published_example():
    """Fleiss (1971) as worked in Wikipedia's article: 10 subjects, 14 raters, 5 categories:
    P = 0.378, Pe = 0.213, kappa = 0.210."""
    table = [
        [0, 0, 0, 0, 14],
        [0, 2, 6, 4, 2],
        [0, 0, 3, 5, 6],
        [0, 3, 9, 2, 0],
        [2, 2, 8, 1, 1],
        [7, 7, 0, 0, 0],
        [3, 2, 6, 3, 0],
        [2, 5, 3, 2, 2],
        [6, 5, 2, 1, 0],
        [0, 2, 2, 3, 7],
    ]
    assert fleiss_kappa(table) == pytest.approx(0.210, abs=5e-4)
    # 3 raters: (3,0,0) (0,3,0) (1,1,1): P = 2/3, p = (4, 4, 1)/9, Pe = 33/81 -> kappa = 7/16
    assert fleiss_kappa([[3, 0, 0], [0, 3, 0], [1, 1, 1]]) == pytest.approx(7 / 16)
    assert fleiss_kappa([[1, 0, 0], [0, 1, 0]]) is None  # no pair has two raters
    assert fleiss_kappa([[0, 0, 2], [0, 0, 3]]) is None  # one category only: chance agreement is 1


def test_the_interval_resamples_raters_as_well_as_pairs():
    """Rater 1 always picks a, rater 2 always b, on 50 pairs. Over pairs alone the share of a would
    be exactly 1/2 in every resample; over raters, a resample holds rater 1 twice (share 1), rater 2
    twice (0) or both (1/2), each with probability 1/4 or 1/2, so the 95% interval is [0, 1]."""
    counts = np.zeros((2, 50, 3))
    counts[0, :, 0] = 1
    counts[1, :, 1] = 1
    intervals = crossed_bootstrap(counts, resamples=4000, seed=0)
    assert intervals[0].tolist() == [0.0, 1.0] and intervals[1].tolist() == [0.0, 1.0]
    assert intervals[2].tolist() == [0.0, 0.0]
    # one rater, 400 pairs half a and half b: the pairs' bootstrap, 0.5 +- 1.96 * 0.5 / 20
    one = np.zeros((1, 400, 3))
    one[0, ::2, 0] = 1
    one[0, 1::2, 1] = 1
    low, high = crossed_bootstrap(one, resamples=4000, seed=0)[0]
    assert low == pytest.approx(0.451, abs=0.01) and high == pytest.approx(0.549, abs=0.01)
    assert np.array_equal(
        crossed_bootstrap(one, resamples=500, seed=1), crossed_bootstrap(one, resamples=500, seed=1)
    )


def test_consistency_on_the_swapped_repeats():
    """alice answers both checks alike; bob flips one (a, then b); carol says tie once and a once: a
    tie against a choice is not alike."""
    votes = votes_from(
        {"alice": "abb", "bob": "abb", "carol": "tbb"},
        repeats={"alice": "ab", "bob": "ab", "carol": "ab"},
    )
    votes = [v for v in votes if not v.repeat or v.rater != "bob" or v.pair != 1] + [
        Vote("bob", 1, "a", repeat=True)
    ]
    consistency = rater_consistency(votes)
    assert consistency["alice"] == {"checks": 2, "agree": 2, "rate": 1.0}
    assert consistency["bob"] == {"checks": 2, "agree": 1, "rate": 0.5}
    assert consistency["carol"] == {"checks": 2, "agree": 1, "rate": 0.5}
    strict = summarize(votes, min_consistency=0.75, resamples=500)
    assert strict["consistency"]["excluded"] == ["bob", "carol"]
    assert strict["votes"] == 9 and strict["check_votes"] == 6  # repeats are not votes
    assert strict["consistent"]["raters"] == 1 and strict["consistent"]["votes"] == 3
    assert strict["consistent"]["b"]["preferred"] == pytest.approx(2 / 3)
    assert summarize(votes, min_consistency=0.5, resamples=500)["consistency"]["excluded"] == []


def test_a_study_where_every_rater_is_inconsistent():
    """Each rater answers their one check differently the second time: all are left out, and the
    consistent numbers are empty (None), while the numbers over all raters stand."""
    votes = votes_from({"r1": "ab", "r2": "bb", "r3": "tb"}, repeats={"r1": "b", "r2": "t", "r3": "a"})
    result = summarize(votes, resamples=500)
    assert result["consistency"]["excluded"] == ["r1", "r2", "r3"]
    assert all(e["rate"] == 0.0 and not e["kept"] for e in result["consistency"]["raters"].values())
    consistent = result["consistent"]
    assert (consistent["votes"], consistent["raters"], consistent["pairs"]) == (0, 0, 0)
    assert consistent["a"]["preferred"] is None and consistent["ties"] is None and consistent["kappa"] is None
    assert result["votes"] == 6 and result["b"]["preferred"] == pytest.approx(4 / 6)
    # pair 0: (1, 1, 1) -> agreement 0; pair 1: (0, 3, 0) -> 1; P = 1/2, p = (1, 4, 1)/6, Pe = 1/2
    assert result["kappa"] == pytest.approx(0.0)


def test_a_study_of_ties_only():
    """Every vote a tie: a and b 0% with [0, 0], ties 100% with [1, 1], and kappa undefined (chance
    agreement is 1)."""
    votes = votes_from({"r1": "ttt", "r2": "ttt"}, repeats={"r1": "t", "r2": "t"})
    result = summarize(votes, resamples=500)
    assert result["a"]["preferred"] == 0.0 and result["b"]["preferred"] == 0.0 and result["ties"] == 1.0
    assert result["a"]["ci95"] == [0.0, 0.0] and result["b"]["ci95"] == [0.0, 0.0]
    assert result["ties_ci95"] == [1.0, 1.0]
    assert result["kappa"] is None
    assert result["consistency"]["excluded"] == []


# -- the study folder and its database -----------------------------------------------------------


def test_a_vote_again_replaces_and_undo_takes_the_last_back(study):
    store = StudyStore(study.root)
    assert store.trials_per_rater == 7 and store.names == ("initial", "calibrated")
    first = store.next_trial("alice")
    assert (first["done"], first["total"]) == (0, 7)
    assert store.vote("alice", first["pair"], "left")["done"] == 1
    assert store.vote("alice", first["pair"], "right")["done"] == 1  # replaced, not added
    second = store.next_trial("alice")
    assert second["pair"] != first["pair"]
    store.vote("alice", second["pair"], "tie")
    (vote,) = [v for v in store.votes() if v.outcome != "tie"]
    assert vote.outcome in ("a", "b")
    assert store.undo("alice") == {"undone": second["pair"], "done": 1, "total": 7}
    assert store.next_trial("alice")["pair"] == second["pair"]
    assert store.undo("alice")["undone"] == first["pair"]
    assert store.undo("alice") == {"undone": None, "done": 0, "total": 7}
    assert store.votes() == []
    with pytest.raises(UnknownPair, match="pair 9999 is not one of the pairs of rater 'alice'"):
        store.vote("alice", 9999, "left")
    with pytest.raises(UnknownRater, match="'nobody'"):
        store.vote("nobody", first["pair"], "left")
    log = [line for line in store.dump() if line.startswith('INSERT INTO "log"')]
    assert len(log) == 5  # three votes and two undos, each kept in the log


def test_the_left_image_is_the_one_the_vote_counts_for(study):
    store = StudyStore(study.root)
    expected = Counter()
    while (trial := store.next_trial("ann"))["pair"] is not None:
        # initial images are reddish, calibrated bluish: a click on the reddish side is a vote for a
        with Image.open(study.root / "images" / trial["left"]) as left:
            expected["a" if left.getpixel((0, 0))[0] > 100 else "b"] += 1
        store.vote("ann", trial["pair"], "left")
    assert Counter(v.outcome for v in store.votes()) == expected
    assert set(expected) == {"a", "b"}  # the sides were drawn, not fixed
    # voting left on both showings of a check, whose sides are swapped, is inconsistent every time
    assert rater_consistency(store.votes())["ann"] == {"checks": 2, "agree": 0, "rate": 0.0}
    assert store.next_trial("ann") == {
        "pair": None,
        "left": None,
        "right": None,
        "prompt": None,
        "done": 7,
        "total": 7,
    }


def test_invites_are_the_only_names_where_required(study):
    codes = study.add_invites(3)
    assert len(set(codes)) == 3 and all(len(c) == 10 for c in codes)
    assert (study.root / "invites.txt").read_text().split() == codes
    more = study.add_invites(2)
    assert (study.root / "invites.txt").read_text().split() == codes + more
    guarded = StudyStore(study.root, invites_only=True)
    before = guarded.dump()
    with pytest.raises(NotInvited, match="'alice' is not an invite code"):
        guarded.next_trial("alice")
    assert guarded.dump() == before
    assert guarded.next_trial(codes[0])["total"] == 7
    with pytest.raises(StudyError, match="--count must be a positive integer, got 0"):
        study.add_invites(0)


def test_create_refuses_a_used_folder_and_leaves_nothing_half_made(tmp_path, study):
    pairs = pairs_from_generate(tmp_path / "gen")
    before = snapshot(study.root)
    with pytest.raises(StudyError, match="already a study"):
        create_study(study.root, pairs, [], names=("a", "b"), seed=0)
    assert snapshot(study.root) == before
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(StudyError, match="already holds files"):
        create_study(busy, pairs, [], names=("a", "b"), seed=0)
    broken = [*pairs[:2], SourcePair("x", 0, pairs[0].a, tmp_path / "gen" / "metadata.jsonl")]
    with pytest.raises(StudyError, match=r"\.jsonl: a study shows PNG"):
        create_study(tmp_path / "new", broken, [], names=("a", "b"), seed=0)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    broken = [*pairs[:2], SourcePair("x", 0, pairs[0].a, tmp_path / "bad.png")]
    with pytest.raises(StudyError, match=r"bad\.png does not decode"):
        create_study(tmp_path / "new", broken, [], names=("a", "b"), seed=0)
    assert not (tmp_path / "new").exists() and not list(tmp_path.glob(".new.*"))


def test_a_folder_that_is_not_a_study(tmp_path):
    with pytest.raises(StudyError, match="is not a study folder"):
        StudyStore(tmp_path)
    (tmp_path / "study.sqlite").write_text("hello")
    with pytest.raises(StudyError, match="is not a study database"):
        StudyStore(tmp_path)
    assert snapshot(tmp_path) == {"study.sqlite": snapshot(tmp_path)["study.sqlite"]}


# -- the JSON API --------------------------------------------------------------------------------


@pytest.fixture
def client(study):
    from fastapi.testclient import TestClient

    from img_guidance.study.app import create_app

    with TestClient(create_app(StudyStore(study.root))) as client:
        yield client


def test_the_api_serves_pairs_and_counts_votes(client, study):
    info = client.get("/api/study").json()
    assert info == {
        "question": "Which image matches the prompt better?",
        "total": 7,
        "invites_required": False,
    }
    nxt = client.get("/api/next", params={"rater": "bea"}).json()
    assert set(nxt) == {"pair", "left", "right", "prompt", "question", "done", "total"}
    assert nxt["prompt"] in PROMPTS and (nxt["done"], nxt["total"]) == (0, 7)
    image = client.get(nxt["left"])
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert image.content == (study.root / nxt["left"].removeprefix("/")).read_bytes()
    voted = client.post("/api/vote", json={"rater": "bea", "pair": nxt["pair"], "choice": "tie"})
    assert voted.json() == {"pair": nxt["pair"], "choice": "tie", "done": 1, "total": 7}
    again = client.post("/api/vote", json={"rater": "bea", "pair": nxt["pair"], "choice": "left"})
    assert again.json()["done"] == 1
    assert client.post("/api/undo", json={"rater": "bea"}).json() == {
        "undone": nxt["pair"],
        "done": 0,
        "total": 7,
    }
    schema = client.get("/api/openapi.json").json()
    assert {"/api/next", "/api/vote", "/api/undo", "/api/study"} <= set(schema["paths"])
    page = client.get("/rate", params={"rater": "bea"})
    assert (
        page.status_code == 200
        and '"bea"' in page.text
        and "Which image matches the prompt better?" in page.text
    )
    assert client.get("/rate", follow_redirects=False).status_code == 303


@pytest.mark.parametrize(
    ("method", "url", "body", "status", "needle"),
    [
        ("get", "/images/..%2Fstudy.sqlite", None, 404, ""),
        ("get", "/images/%2e%2e%2fstudy.sqlite", None, 404, ""),
        ("get", "/images/../study.sqlite", None, 404, ""),
        ("get", "/images/..%2F..%2Fgen%2Fmetadata.jsonl", None, 404, ""),
        ("get", "/images/study.sqlite", None, 404, "no image 'study.sqlite'"),
        ("post", "/api/vote", {"rater": "bea", "pair": 999, "choice": "left"}, 404, "pair 999 is not one of"),
        ("post", "/api/vote", {"rater": "cat", "pair": "OWN", "choice": "left"}, 404, "of rater 'cat'"),
        ("post", "/api/vote", {"pair": "OWN", "choice": "left"}, 422, "rater: Field required"),
        (
            "post",
            "/api/vote",
            {"rater": "  ", "pair": "OWN", "choice": "left"},
            422,
            "rater must be a non-empty",
        ),
        ("post", "/api/vote", {"rater": "bea", "pair": "OWN", "choice": "maybe"}, 422, "(got 'maybe')"),
        ("post", "/api/vote", {"rater": "bea", "pair": "OWN", "choice": None}, 422, "choice"),
        ("post", "/api/vote", {"rater": "bea", "pair": "OWN", "choice": "left", "x": 1}, 422, "x: Extra"),
        ("post", "/api/vote", {"rater": "bea", "pair": True, "choice": "left"}, 422, "pair: "),
        ("post", "/api/vote", {"rater": "bea", "pair": "1", "choice": "left"}, 422, "pair: "),
        (
            "post",
            "/api/vote",
            {"rater": "nobody", "pair": "OWN", "choice": "left"},
            404,
            "'nobody' has no pairs",
        ),
        ("post", "/api/undo", {}, 422, "rater: Field required"),
        ("post", "/api/undo", {"rater": "nobody"}, 404, "'nobody' has no pairs"),
        ("get", "/api/next", None, 422, "rater: Field required"),
        ("get", "/api/next?rater=a%00b", None, 422, "control characters"),
    ],
)
def test_bad_requests_are_4xx_and_change_nothing(client, study, method, url, body, status, needle):
    bea = client.get("/api/next", params={"rater": "bea"}).json()["pair"]
    client.get("/api/next", params={"rater": "cat"})
    client.post("/api/vote", json={"rater": "bea", "pair": bea, "choice": "left"})
    if body is not None and body.get("pair") == "OWN":
        # "OWN": a pair of bea's; for cat, bea's pair is someone else's
        body = {**body, "pair": client.get("/api/next", params={"rater": "bea"}).json()["pair"]}
    before = study.dump()
    response = client.request(method.upper(), url, json=body)
    assert response.status_code == status, response.text
    assert needle in response.json()["detail"]
    assert b"SQLite format" not in response.content
    assert study.dump() == before


def test_with_invites_required_the_api_refuses_other_names(study):
    from fastapi.testclient import TestClient

    from img_guidance.study.app import create_app

    (code,) = study.add_invites(1)
    with TestClient(create_app(StudyStore(study.root, invites_only=True))) as client:
        before = study.dump()
        refused = client.get("/api/next", params={"rater": "mallory"})
        assert refused.status_code == 403 and "'mallory' is not an invite code" in refused.json()["detail"]
        page = client.get("/rate", params={"rater": "mallory"})
        assert page.status_code == 403 and "is not an invite code" in page.text
        assert study.dump() == before
        assert client.get("/api/next", params={"rater": code}).json()["total"] == 7
        assert client.get("/api/study").json()["invites_required"] is True


# -- the command line ----------------------------------------------------------------------------


def test_cli_create_vote_and_results(tmp_path):
    gen = generate_folder(tmp_path / "gen")
    with (gen / "metadata.jsonl").open("a") as f:
        f.write('{"name": "cut-short", "prom')  # a line a kill cut: skipped, and said so
    target = tmp_path / "s"
    made = runner.invoke(
        app, ["study", "create", str(target), "--from", str(gen), "--pairs", "4", "--seed", "5"]
    )
    assert made.exit_code == 0, made.output
    assert "metadata.jsonl:6 is cut short" in made.stderr
    assert "4 pairs (3 shown twice" in made.output and "a = initial, b = calibrated" in made.output
    store = StudyStore(target)
    assert store.meta["seed"] == 5 and store.meta["sources"] == {"from": str(gen.resolve())}
    assert len(list((target / "images").iterdir())) == 8
    for rater, choice in (("r1", "left"), ("r2", "tie")):
        while (trial := store.next_trial(rater))["pair"] is not None:
            store.vote(rater, trial["pair"], choice)
    shown = runner.invoke(app, ["study", "results", str(target), "--json", "--resamples", "500"])
    assert shown.exit_code == 0, shown.output
    result = json.loads(shown.stdout)
    assert set(result) >= {"a", "b", "ties", "votes", "raters", "kappa"}
    assert (result["votes"], result["raters"], result["tie_votes"]) == (8, 2, 4)
    assert result["a"]["votes"] + result["b"]["votes"] == 4 and result["ties"] == 0.5
    assert result == json.loads((target / "results" / "results.json").read_text())
    table = runner.invoke(app, ["study", "results", str(target), "--resamples", "500"])
    assert (
        table.exit_code == 0 and "| initial preferred |" in table.stdout and "| tie | 50.0%" in table.stdout
    )
    assert Image.open(target / "results" / "preference.png").format == "PNG"
    assert "| r2 | 3 of 3 | yes |" in (target / "results" / "results.md").read_text()


def test_cli_two_folders_and_invites(tmp_path):
    a = mapping_folder(tmp_path / "sdxl", [("cat", 0, "red"), ("dog", 0, "red")], system="sdxl")
    b = mapping_folder(tmp_path / "flux", [("dog", 0, "blue"), ("cat", 0, "blue")], system="flux")
    made = runner.invoke(app, ["study", "create", str(tmp_path / "s"), "--a", str(a), "--b", str(b)])
    assert made.exit_code == 0, made.output
    assert "a = sdxl, b = flux" in made.output and "2 pairs (2 shown twice" in made.output
    invited = runner.invoke(app, ["study", "invite", str(tmp_path / "s"), "--count", "4"])
    assert invited.exit_code == 0, invited.output
    codes = invited.stdout.split()
    assert len(codes) == 4 and codes == (tmp_path / "s" / "invites.txt").read_text().split()


def test_cli_bad_input_is_one_line_and_changes_nothing(tmp_path, study):
    gen = tmp_path / "gen"
    other = mapping_folder(tmp_path / "other", [("cat", 0, "red"), (PROMPTS[0], 0, "red")], system="x")
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("not a study")
    cases = [
        (["create", str(tmp_path / "n"), "--from", str(gen), "--a", str(gen)], ["--from DIR", "not both"]),
        (["create", str(tmp_path / "n"), "--a", str(gen)], ["missing --b"]),
        (["create", str(tmp_path / "n")], ["missing --from DIR"]),
        (
            ["create", str(tmp_path / "n"), "--from", str(gen), "--pairs", "6"],
            ["--pairs must lie in [1, 5]", "6"],
        ),
        (["create", str(tmp_path / "n"), "--from", str(gen), "--repeats", "9"], ["--repeats", "got 9"]),
        (["create", str(tmp_path / "n"), "--from", str(gen), "--question", " "], ["--question"]),
        (["create", str(tmp_path / "n"), "--from", str(other)], ["not a generate folder"]),
        (["create", str(tmp_path / "n"), "--from", str(tmp_path / "nowhere")], ["nowhere does not exist"]),
        (
            ["create", str(tmp_path / "n"), "--a", str(gen), "--b", str(other)],
            ["4 only in --a", "'cat' (seed 0)"],
        ),
        (["create", str(study.root), "--from", str(gen)], [str(study.root), "already a study"]),
        (["create", str(plain), "--from", str(gen)], ["already holds files"]),
        (["serve", str(plain)], [str(plain), "is not a study folder"]),
        (["serve", str(study.root), "--host", "0.0.0.0"], ["invite codes", "study invite"]),
        (["serve", str(study.root), "--port", str(taken.getsockname()[1])], ["cannot listen on 127.0.0.1:"]),
        (["invite", str(plain), "--count", "3"], ["is not a study folder"]),
        (["results", str(plain)], ["is not a study folder"]),
        (["results", str(tmp_path / "nowhere")], ["nowhere does not exist"]),
        (["results", str(study.root)], ["has no votes yet"]),
    ]
    for args, needles in cases:
        before = {p: snapshot(p) for p in (study.root, plain, gen, tmp_path / "n")}
        result = runner.invoke(app, ["study", *args])
        one_line_error(result, *needles)
        assert {p: snapshot(p) for p in before} == before, args
        assert not (tmp_path / "n").exists()
    taken.close()
    assert (
        runner.invoke(
            app, ["study", "create", str(tmp_path / "n"), "--from", str(gen), "--pairs", "0"]
        ).exit_code
        == 2
    )
