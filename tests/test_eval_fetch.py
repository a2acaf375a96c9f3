"""Benchmark prompt files fetched from their pinned sources: a fake opener serves small files in each
source's exact format, so nothing here reaches the network."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import urllib.error
from datetime import datetime

import pytest
from typer.testing import CliRunner

from img_guidance.cli import app
from img_guidance.eval.benchmarks import COMPBENCH_CATEGORIES, HPD_STYLES, get_benchmark
from img_guidance.eval.fetch import SOURCES, FetchError, benchmark_cache, fetch_prompts

runner = CliRunner()


def _parquet(captions: list[str]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(
        pa.table({"caption": captions, "best_image_uid": [str(i) for i in range(len(captions))]}), buffer
    )
    return buffer.getvalue()


def _dpg_csv() -> bytes:
    """dpg_bench.csv's columns, one row per question: two questions for the first prompt."""
    columns = ["item_id", "text", "keywords", "proposition_id", "dependency", "category_broad"]
    rows = [
        ["partiprompts7", "a red cube on a blue ball", "cube", "1", "0", "entity"],
        ["partiprompts7", "a red cube on a blue ball", "ball", "2", "0", "entity"],
        ["countbench3", "three cats on a sofa", "cat", "1", "0", "entity"],
    ]
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows([columns, *rows])
    return buffer.getvalue().encode()


PARTI_TSV = b"Prompt\tCategory\tChallenge\tNote\nbond\tAbstract\tBasic\t\na cat\tAnimals\tBasic\tx\n"

# per benchmark: the files it serves (by stored name) and the prompts its reader must read from them
CASES = {
    "hpd": (
        {f"{s}.json": json.dumps([f"{s} one", f"{s} two"]).encode() for s in HPD_STYLES},
        [(f"{s} {n}", s) for s in HPD_STYLES for n in ("one", "two")],
    ),
    "parti": (
        {"PartiPrompts.tsv": PARTI_TSV},
        [("bond", "Abstract"), ("a cat", "Animals")],
    ),
    "pickapic-test": (
        {"test_unique-00000-of-00001-73a51cbb6488571d.parquet": _parquet(["a dog", "a dog", "a tree"])},
        [("a dog", "all"), ("a tree", "all")],
    ),
    "t2i-compbench": (
        {f"{c}_val.txt": f"a {c} prompt\n".encode() for c in COMPBENCH_CATEGORIES},
        [(f"a {c} prompt", c) for c in COMPBENCH_CATEGORIES],
    ),
    "geneval": (
        {"evaluation_metadata.jsonl": b'{"tag": "counting", "include": [], "prompt": "two cats"}\n'},
        [("two cats", "counting")],
    ),
    "dpg": (
        {"dpg_bench.csv": _dpg_csv()},
        [("three cats on a sofa", "all"), ("a red cube on a blue ball", "all")],  # sorted by file name
    ),
}


class FakeWeb:
    """Serves ``benchmark``'s pinned URLs with the case's files; records every request."""

    def __init__(self, benchmark: str | None, *, fail: str | None = None):
        files = CASES[benchmark][0] if benchmark else {}
        self.pages = {f.url: files[f.path] for f in SOURCES[benchmark].files} if benchmark else {}
        self.fail = fail
        self.requests: list[str] = []

    def __call__(self, url: str) -> bytes:
        self.requests.append(url)
        if url == self.fail or url not in self.pages:
            raise urllib.error.URLError("Name or service not known")
        return self.pages[url]


def test_every_source_is_pinned_to_an_exact_revision():
    assert set(SOURCES) == set(CASES)
    for source in SOURCES.values():
        for file in source.files:
            assert file.revision in file.url and len(file.revision) == 40
            assert file.url.startswith(
                ("https://raw.githubusercontent.com/", "https://huggingface.co/datasets/")
            ), file.url
            assert f"/{file.revision}/" in file.url and "/main/" not in file.url


@pytest.mark.parametrize("benchmark", sorted(CASES))
def test_fetch_records_the_source_and_the_reader_reads_it(benchmark, tmp_path):
    web = FakeWeb(benchmark)
    source = SOURCES[benchmark]
    path = fetch_prompts(benchmark, tmp_path, opener=web)

    # 1. the layout: CACHE/benchmarks/<name>/<revision>/, the reader's path inside it
    folder = tmp_path / "benchmarks" / benchmark / source.revision
    assert path == folder / source.read and path.exists()
    assert sorted(web.requests) == sorted(web.pages)
    assert [p.name for p in (tmp_path / "benchmarks" / benchmark).iterdir()] == [source.revision]

    # 2. source.json: every URL, revision, sha256 and size, and the date
    record = json.loads((folder / "source.json").read_text())
    assert record["benchmark"] == benchmark and record["revision"] == source.revision
    assert datetime.fromisoformat(record["fetched"]).tzinfo is not None
    served = CASES[benchmark][0]
    assert [(f["path"], f["url"], f["revision"]) for f in record["files"]] == [
        (f.path, f.url, f.revision) for f in source.files
    ]
    for entry in record["files"]:
        assert (folder / entry["path"]).read_bytes() == served[entry["path"]]
        assert entry["sha256"] == hashlib.sha256(served[entry["path"]]).hexdigest()
        assert entry["size"] == len(served[entry["path"]])

    # 3. the benchmark's own reader reads the fetched copy
    assert get_benchmark(benchmark).prompts(path) == CASES[benchmark][1]

    # 4. a second call reads the cache: no request
    offline = FakeWeb(None)
    assert fetch_prompts(benchmark, tmp_path, opener=offline) == path and offline.requests == []


def test_dpg_prompt_folder_is_materialised_from_the_csv(tmp_path):
    path = fetch_prompts("dpg", tmp_path, opener=FakeWeb("dpg"))
    assert sorted(p.name for p in path.iterdir()) == ["countbench3.txt", "partiprompts7.txt"]
    assert (path / "partiprompts7.txt").read_text() == "a red cube on a blue ball"
    record = json.loads((path.parent / "source.json").read_text())
    assert record["read"] == "prompts" and len(record["derived"]["sha256"]) == 64


def test_the_cache_root_follows_img_guidance_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("IMG_GUIDANCE_CACHE", str(tmp_path / "root"))
    assert benchmark_cache() == tmp_path / "root" / "benchmarks"
    path = fetch_prompts("parti", opener=FakeWeb("parti"))
    assert path.is_relative_to(tmp_path / "root" / "benchmarks" / "parti")


def test_a_failed_download_leaves_nothing_and_names_the_url(tmp_path):
    second = SOURCES["hpd"].files[1].url  # the first file is downloaded, then the second fails
    web = FakeWeb("hpd", fail=second)
    with pytest.raises(FetchError) as caught:
        fetch_prompts("hpd", tmp_path, opener=web)
    message = str(caught.value)
    assert len(message.splitlines()) == 1 and second in message and "--prompts-file" in message
    assert "Name or service not known" in message
    assert web.requests[-1] == second
    assert list((tmp_path / "benchmarks" / "hpd").iterdir()) == []  # no folder, no staging left

    # the next call downloads everything again and succeeds
    assert get_benchmark("hpd").prompts(fetch_prompts("hpd", tmp_path, opener=FakeWeb("hpd")))


def test_a_corrupt_cached_file_is_detected_and_fetched_again(tmp_path):
    path = fetch_prompts("geneval", tmp_path, opener=FakeWeb("geneval"))
    good = path.read_bytes()
    path.write_bytes(good[:10])  # a truncated file, source.json untouched

    warnings: list[str] = []
    web = FakeWeb("geneval")
    assert fetch_prompts("geneval", tmp_path, opener=web, warn=warnings.append) == path
    assert web.requests == [SOURCES["geneval"].files[0].url]
    assert path.read_bytes() == good
    assert len(warnings) == 1 and str(path) in warnings[0] and "sha256" in warnings[0]

    # offline, a corrupt copy is refused in one line naming the URL, never read
    path.write_bytes(b"{}")
    offline = FakeWeb("geneval", fail=SOURCES["geneval"].files[0].url)
    with pytest.raises(FetchError, match=r"could not fetch https://raw\.githubusercontent\.com/djghosh13"):
        fetch_prompts("geneval", tmp_path, opener=offline, warn=warnings.append)
    assert "does not match" in warnings[-1]


def test_a_corrupt_derived_folder_is_detected(tmp_path):
    path = fetch_prompts("dpg", tmp_path, opener=FakeWeb("dpg"))
    (path / "countbench3.txt").write_text("something else")
    warnings: list[str] = []
    web = FakeWeb("dpg")
    fetch_prompts("dpg", tmp_path, opener=web, warn=warnings.append)
    assert len(web.requests) == 1 and "prompts" in warnings[0]
    assert (path / "countbench3.txt").read_text() == "three cats on a sofa"


def test_a_dpg_csv_without_its_columns_is_refused(tmp_path):
    web = FakeWeb("dpg")
    web.pages = dict.fromkeys(web.pages, b"id,prompt\n1,a cat\n")
    with pytest.raises(ValueError, match=r"dpg_bench\.csv has no item_id and text columns"):
        fetch_prompts("dpg", tmp_path, opener=web)
    assert list((tmp_path / "benchmarks" / "dpg").iterdir()) == []


def test_benchmarks_without_published_prompts_are_refused(tmp_path):
    with pytest.raises(ValueError, match="the shapes benchmark has no prompt file to fetch"):
        fetch_prompts("shapes", tmp_path)
    with pytest.raises(ValueError, match=r"no published prompts for 'hps'; choose from hpd, parti"):
        fetch_prompts("hps", tmp_path)


def test_eval_run_fetches_when_no_prompts_file_is_given_and_fails_in_one_line(tmp_path, monkeypatch):
    import img_guidance.eval.fetch as fetch

    monkeypatch.setenv("IMG_GUIDANCE_CACHE", str(tmp_path / "cache"))
    web = FakeWeb("parti", fail=SOURCES["parti"].files[0].url)
    monkeypatch.setattr(fetch, "download", web)
    out = tmp_path / "out"

    # a bad scorer name fails before any download
    result = runner.invoke(app, ["eval", "run", "parti", "--out", str(out), "--scorers", "nope"])
    assert result.exit_code == 1 and "unknown scorer" in result.stderr and web.requests == []

    # no network: one line naming the URL and the offline way, before any model loads
    result = runner.invoke(app, ["eval", "run", "parti", "--out", str(out)])
    lines = result.stderr.splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert SOURCES["parti"].files[0].url in lines[0] and "--prompts-file" in lines[0]
    assert not out.exists() and web.requests == [SOURCES["parti"].files[0].url]

    # --prompts-file is read (here: found not to be Parti's file) without the network
    local = tmp_path / "prompts.tsv"
    local.write_text("text\nbond\n")
    result = runner.invoke(app, ["eval", "run", "parti", "--out", str(out), "--prompts-file", str(local)])
    assert result.exit_code == 1 and "prompts.tsv has no Prompt column" in result.stderr
    assert len(web.requests) == 1 and not out.exists()
