import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from img_guidance.data import pairs
from img_guidance.data.pairs import PairStats, count_rows, iter_pairs
from img_guidance.testing.pairs import (
    PREFER_0,
    PREFER_1,
    TIE,
    JsonlPair,
    PickapicRow,
    encode_image,
    is_colour,
    write_pairs_jsonl,
    write_pickapic_parquet,
)

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _key(pair) -> tuple:
    """Everything a pair carries, comparable."""
    return (pair.index, pair.row_id, pair.prompt, pair.preferred.tobytes(), pair.unpreferred.tobytes())


@pytest.fixture
def parquet_log(monkeypatch):
    """Record what pyarrow is asked to read: files opened (and how), row groups, columns, batch sizes."""
    log = SimpleNamespace(opened=[], open_kwargs=[], groups=[], columns=set(), batches=[])

    class SpyParquetFile(pq.ParquetFile):
        def __init__(self, source, **kwargs):
            super().__init__(source, **kwargs)
            self.spy_name = Path(source).name
            log.opened.append(self.spy_name)
            log.open_kwargs.append(kwargs)

        def iter_batches(self, *, row_groups=None, columns=None, **kwargs):
            log.groups.extend((self.spy_name, g) for g in row_groups)
            log.columns.update(columns)
            for batch in super().iter_batches(row_groups=row_groups, columns=columns, **kwargs):
                log.batches.append(batch.num_rows)
                yield batch

    monkeypatch.setattr(pq, "ParquetFile", SpyParquetFile)
    return log


def test_the_preferred_image_is_the_one_labelled_1_either_way(tmp_path):
    path = write_pickapic_parquet(
        tmp_path / "train-0001.parquet",
        [
            PickapicRow("red wins", colours=("red", "blue"), labels=PREFER_0),
            PickapicRow("blue wins", colours=("red", "blue"), labels=PREFER_1),
            PickapicRow("green wins", colours=("yellow", "green"), labels=PREFER_1, ranking_id=42),
        ],
    )
    got = list(iter_pairs(path))
    assert [(p.index, p.row_id, p.prompt) for p in got] == [
        (0, "train-0001.parquet:0 ranking_id=0", "red wins"),
        (1, "train-0001.parquet:1 ranking_id=1", "blue wins"),
        (2, "train-0001.parquet:2 ranking_id=42", "green wins"),
    ]
    expected = [("red", "blue"), ("blue", "red"), ("green", "yellow")]
    for pair, (w, l) in zip(got, expected, strict=True):
        assert pair.preferred.mode == pair.unpreferred.mode == "RGB"
        assert is_colour(pair.preferred, w), (pair.row_id, pair.preferred.getpixel((4, 4)))
        assert is_colour(pair.unpreferred, l), (pair.row_id, pair.unpreferred.getpixel((4, 4)))


def test_ties_and_unlabeled_rows_are_dropped_and_counted(tmp_path):
    path = write_pickapic_parquet(
        tmp_path / "p.parquet",
        [
            PickapicRow("kept 0"),
            PickapicRow("tie", labels=TIE),
            PickapicRow("not rated", has_label=False),  # labels (1, 0) but has_label False
            PickapicRow("soft labels", labels=(0.3, 0.7)),
            PickapicRow("null labels", labels=(None, None)),
            PickapicRow("both win", labels=(1.0, 1.0)),
            PickapicRow("kept 6", labels=PREFER_1),
        ],
        row_group_size=3,
    )
    stats = PairStats()
    got = list(iter_pairs(path, stats=stats))
    assert [(p.index, p.prompt) for p in got] == [(0, "kept 0"), (6, "kept 6")]
    assert stats.as_dict() == {"rows": 7, "pairs": 2, "ties": 1, "unlabeled": 4, "undecodable": []}


def test_an_undecodable_row_is_skipped_reported_and_iteration_goes_on(tmp_path, caplog):
    path = write_pickapic_parquet(
        tmp_path / "p.parquet",
        [
            PickapicRow("ok 0"),
            PickapicRow("bad jpg_1", broken=1, ranking_id=501),
            PickapicRow("bad jpg_0", broken=0, labels=PREFER_1, ranking_id=502),
            PickapicRow("ok 3"),
        ],
    )
    stats = PairStats()
    with caplog.at_level(logging.WARNING, logger="img_guidance.data.pairs"):
        got = list(iter_pairs(path, stats=stats))
    assert [p.index for p in got] == [0, 3]
    assert stats.undecodable == ["p.parquet:1 ranking_id=501", "p.parquet:2 ranking_id=502"]
    assert (stats.rows, stats.pairs) == (4, 2)
    assert "p.parquet:1 ranking_id=501" in caplog.text and "jpg_1" in caplog.text
    assert "p.parquet:2 ranking_id=502" in caplog.text and "jpg_0" in caplog.text


def _mixed_folder(folder: Path) -> int:
    """Two files (5 rows in groups of 2, 4 rows in groups of 3) with every kind of row; returns 9."""
    kinds = [
        {},
        {"labels": PREFER_1},
        {"labels": TIE},
        {"colours": ("green", "white")},
        {"has_label": False},
        {"broken": 0},
        {"labels": PREFER_1, "colours": ("black", "yellow")},
        {},
        {"labels": (None, None)},
    ]
    rows = [PickapicRow(f"row {i}", **kind) for i, kind in enumerate(kinds)]
    write_pickapic_parquet(folder / "part-0.parquet", rows[:5], row_group_size=2)
    write_pickapic_parquet(folder / "part-1.parquet", rows[5:], row_group_size=3)
    return len(rows)


def test_start_stop_split_the_stream_exactly_across_files_and_row_groups(tmp_path):
    n = _mixed_folder(tmp_path)
    whole_stats = PairStats()
    whole = [_key(p) for p in iter_pairs(tmp_path, stats=whole_stats)]
    assert [k[0] for k in whole] == [0, 1, 3, 6, 7]
    assert whole_stats.undecodable == ["part-1.parquet:0 ranking_id=0"]
    for k in range(n + 2):
        head, tail = PairStats(), PairStats()
        first = [_key(p) for p in iter_pairs(tmp_path, stop=k, stats=head)]
        second = [_key(p) for p in iter_pairs(tmp_path, start=k, stats=tail)]
        assert first + second == whole, k
        assert all(key[0] < k for key in first) and all(key[0] >= k for key in second)
        assert (head.rows, tail.rows) == (min(k, n), max(n - k, 0))
    window = [_key(p) for p in iter_pairs(tmp_path, start=3, stop=7)]
    assert window == [key for key in whole if 3 <= key[0] < 7]


def test_rows_outside_the_range_are_not_read(tmp_path, parquet_log):
    # rows outside [3, 5) and [7, 8) have garbage images: reading them would report them
    def row(i: int) -> PickapicRow:
        return PickapicRow(f"row {i}", broken=None if i in (3, 4, 7) else 0)

    write_pickapic_parquet(tmp_path / "a.parquet", [row(i) for i in range(6)], row_group_size=2)
    write_pickapic_parquet(tmp_path / "b.parquet", [row(i) for i in range(6, 10)], row_group_size=2)
    write_pickapic_parquet(tmp_path / "c.parquet", [row(i) for i in range(10, 12)], row_group_size=2)

    stats = PairStats()
    assert [p.index for p in iter_pairs(tmp_path, start=3, stop=5, stats=stats)] == [3, 4]
    assert stats.as_dict() == {"rows": 2, "pairs": 2, "ties": 0, "unlabeled": 0, "undecodable": []}
    assert parquet_log.groups == [("a.parquet", 1), ("a.parquet", 2)]  # group 0 holds rows 0-1
    assert parquet_log.opened == ["a.parquet"]  # b and c start at rows 6 and 10

    parquet_log.groups.clear()
    parquet_log.opened.clear()
    stats = PairStats()
    assert [p.index for p in iter_pairs(tmp_path, start=7, stop=8, stats=stats)] == [7]
    assert stats.undecodable == []
    assert parquet_log.groups == [("b.parquet", 0)]  # a only had its footer read, c not even that
    assert parquet_log.opened == ["a.parquet", "b.parquet"]


def test_reading_streams_small_batches_of_the_needed_columns(tmp_path, parquet_log, monkeypatch):
    monkeypatch.setattr(pairs, "BATCH_ROWS", 3)
    path = write_pickapic_parquet(
        tmp_path / "p.parquet", [PickapicRow(f"row {i}") for i in range(10)], row_group_size=10
    )
    assert len(list(iter_pairs(path))) == 10
    assert parquet_log.groups == [("p.parquet", 0)]
    assert parquet_log.batches == [3, 3, 3, 1]  # never the whole group's 10 rows of images
    assert parquet_log.columns == {*pairs.REQUIRED_COLUMNS, "has_label", "ranking_id"}
    # no pre-buffering of whole column chunks; pages go through a bounded buffer
    assert parquet_log.open_kwargs[0]["pre_buffer"] is False
    assert parquet_log.open_kwargs[0]["buffer_size"] > 0


def test_peak_arrow_memory_stays_far_below_the_image_column(tmp_path):
    """One row group of 128 rows x 2 images x ~200 kB (valid JPEGs padded with random bytes, which
    decoders ignore) = 51 MB, in small pages. Arrow's peak allocation in a fresh process must stay under
    a quarter of that (streaming measures ~8.5 MB whatever the group size; reading column chunks whole
    measures more than the columns themselves)."""
    rows, pad = 128, 200_000
    images = [[encode_image(c) + os.urandom(pad) for _ in range(rows)] for c in ("red", "blue")]
    table = pa.table(
        {
            "caption": [f"row {i}" for i in range(rows)],
            "jpg_0": pa.array(images[0], pa.binary()),
            "jpg_1": pa.array(images[1], pa.binary()),
            "label_0": [1.0] * rows,
            "label_1": [0.0] * rows,
        }
    )
    path = tmp_path / "big.parquet"
    pq.write_table(table, path, row_group_size=rows, write_batch_size=1, data_page_size=64 * 1024)
    column_bytes = 2 * rows * pad
    code = (
        "import sys, pyarrow as pa\n"
        "from img_guidance.data import pairs\n"
        "pairs.BATCH_ROWS = 2\n"
        "n = sum(1 for _ in pairs.iter_pairs(sys.argv[1]))\n"
        "print(n, pa.default_memory_pool().max_memory())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True
    ).stdout
    n, peak = map(int, out.split())
    assert n == rows
    assert peak < column_bytes / 4, (peak, column_bytes)


def test_count_rows_reads_only_metadata(tmp_path, parquet_log):
    n = _mixed_folder(tmp_path)
    assert count_rows(tmp_path) == n == 9
    assert count_rows(tmp_path / "part-1.parquet") == 4
    assert parquet_log.groups == []  # no row group was read
    jsonl = write_pairs_jsonl(tmp_path / "j", [JsonlPair("a"), JsonlPair("b", broken="chosen")])
    jsonl.write_text(jsonl.read_text() + "\n\n")  # blank lines are not rows
    assert count_rows(jsonl) == 2


def test_a_folder_reads_its_files_recursively_in_path_order(tmp_path):
    write_pickapic_parquet(tmp_path / "b.parquet", [PickapicRow("b0"), PickapicRow("b1")])
    write_pickapic_parquet(tmp_path / "sub" / "c.parquet", [PickapicRow("c0")])
    write_pickapic_parquet(tmp_path / "a.parquet", [PickapicRow("a0", labels=TIE), PickapicRow("a1")])
    (tmp_path / "notes.txt").write_text("not data")
    got = list(iter_pairs(tmp_path))
    assert [(p.index, p.row_id, p.prompt) for p in got] == [
        (1, "a.parquet:1 ranking_id=1", "a1"),
        (2, "b.parquet:0 ranking_id=0", "b0"),
        (3, "b.parquet:1 ranking_id=1", "b1"),
        (4, "sub/c.parquet:0 ranking_id=0", "c0"),
    ]
    assert count_rows(tmp_path) == 5


def test_jsonl_with_relative_and_absolute_paths(tmp_path, monkeypatch, caplog):
    data = tmp_path / "data"
    path = write_pairs_jsonl(
        data,
        [
            JsonlPair("p0", "red", "blue"),
            JsonlPair("p1", "green", "yellow", missing="rejected"),
            JsonlPair("p2", broken="chosen"),
            JsonlPair("p3", "white", "black"),
        ],
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "g.png").write_bytes(encode_image("green", format="PNG"))
    (elsewhere / "y.png").write_bytes(encode_image("yellow", format="PNG"))
    lines = path.read_text().splitlines()
    absolute = {"prompt": "abs", "chosen": str(elsewhere / "g.png"), "rejected": str(elsewhere / "y.png")}
    # line 1: p0, line 2: blank, 3: p1, 4: p2, 5: p3, 6: abs
    path.write_text("\n".join([lines[0], "", *lines[1:], json.dumps(absolute)]) + "\n")
    monkeypatch.chdir(elsewhere)  # paths are relative to the JSONL file, not to the working directory

    stats = PairStats()
    with caplog.at_level(logging.WARNING, logger="img_guidance.data.pairs"):
        got = list(iter_pairs(path, stats=stats))
    assert [(p.index, p.row_id, p.prompt) for p in got] == [
        (0, "pairs.jsonl:1", "p0"),
        (3, "pairs.jsonl:5", "p3"),
        (4, "pairs.jsonl:6", "abs"),
    ]
    for pair, (w, l) in zip(got, [("red", "blue"), ("white", "black"), ("green", "yellow")], strict=True):
        assert is_colour(pair.preferred, w, tolerance=0) and is_colour(pair.unpreferred, l, tolerance=0)
    assert stats.as_dict() == {
        "rows": 5,
        "pairs": 3,
        "ties": 0,
        "unlabeled": 0,
        "undecodable": ["pairs.jsonl:3", "pairs.jsonl:4"],
    }
    assert "pairs.jsonl:3" in caplog.text and "0001_rejected.png" in caplog.text
    assert count_rows(path) == 5
    assert [p.index for p in iter_pairs(path, start=1, stop=4)] == [3]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        ('["a", "b"]', "expected an object with keys"),
        ('{"prompt": "x", "chosen": "a.png"}', r"missing key\(s\) \['rejected'\]"),
        ('{"prompt": "x", "chosen": 3, "rejected": "b.png"}', "'chosen' must be a non-empty string, got 3"),
        ('{"prompt": "", "chosen": "a.png", "rejected": "b.png"}', "'prompt' must be a non-empty string"),
    ],
)
def test_a_malformed_jsonl_line_is_an_error_naming_file_and_line(tmp_path, line, message):
    path = write_pairs_jsonl(tmp_path, [JsonlPair("a"), JsonlPair("b")])
    path.write_text(path.read_text() + line + "\n")
    # the whole file is checked when iter_pairs is called, even lines outside [start, stop)
    with pytest.raises(ValueError, match=rf"pairs\.jsonl:3: {message}"):
        iter_pairs(path, stop=1)


def _fake_dataset_cache(cache: Path, repo_id: str, files: dict[str, bytes]) -> None:
    """The on-disk layout of the huggingface_hub cache for a dataset repo, so ids resolve offline."""
    repo = cache / f"datasets--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    for name, data in files.items():
        target = repo / "snapshots" / COMMIT / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


@pytest.fixture
def hub_files(tmp_path) -> dict[str, bytes]:
    local = tmp_path / "local"
    write_pickapic_parquet(local / "data" / "train-0000.parquet", [PickapicRow("t0"), PickapicRow("t1")])
    write_pickapic_parquet(local / "data" / "train-0001.parquet", [PickapicRow("t2", labels=PREFER_1)])
    write_pickapic_parquet(local / "test" / "test-0000.parquet", [PickapicRow("v0")])
    files = {p.relative_to(local).as_posix(): p.read_bytes() for p in local.rglob("*.parquet")}
    return files | {"README.md": b"# a tiny Pick-a-Pic"}


@pytest.fixture
def download_log(monkeypatch) -> list[dict]:
    import huggingface_hub

    log, real = [], huggingface_hub.hf_hub_download

    def spy(repo_id, filename, **kwargs):
        log.append({"repo_id": repo_id, "filename": filename, **kwargs})
        return real(repo_id, filename, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", spy)
    return log


def test_a_hub_dataset_id_reads_offline_from_the_cache(tmp_path, hub_files, download_log, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "cache"
    _fake_dataset_cache(cache, "someone/pickapic", hub_files)
    got = list(iter_pairs("someone/pickapic/data", cache_dir=cache, local_files_only=True))
    assert [(p.index, p.row_id, p.prompt) for p in got] == [
        (0, "data/train-0000.parquet:0 ranking_id=0", "t0"),
        (1, "data/train-0000.parquet:1 ranking_id=1", "t1"),
        (2, "data/train-0001.parquet:0 ranking_id=0", "t2"),
    ]
    assert is_colour(got[2].preferred, "blue") and is_colour(got[2].unpreferred, "red")
    assert {(d["repo_type"], d["revision"]) for d in download_log} == {("dataset", COMMIT)}

    # files are fetched one at a time, and none past `stop`
    download_log.clear()
    assert [
        p.prompt for p in iter_pairs("someone/pickapic", stop=1, cache_dir=cache, local_files_only=True)
    ] == ["t0"]
    assert [d["filename"] for d in download_log] == ["data/train-0000.parquet"]

    # HF_HUB_OFFLINE alone is enough, as it is for models
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert count_rows("someone/pickapic", cache_dir=cache) == 4
    assert [p.prompt for p in iter_pairs("someone/pickapic/test/test-0000.parquet", cache_dir=cache)] == [
        "v0"
    ]

    with pytest.raises(FileNotFoundError, match=r"'someone/other'.*not in"):
        iter_pairs("someone/other", cache_dir=cache)
    with pytest.raises(FileNotFoundError, match=r"'someone/pickapic/nothing'.*holds no \.parquet files"):
        count_rows("someone/pickapic/nothing", cache_dir=cache)


def test_online_the_listing_and_downloads_are_pinned_to_one_commit(tmp_path, hub_files, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    calls = []

    class FakeApi:
        def dataset_info(self, repo_id, *, revision=None):
            calls.append(("dataset_info", repo_id, revision))
            return SimpleNamespace(sha="f" * 40)

        def list_repo_files(self, repo_id, *, repo_type=None, revision=None):
            calls.append(("list_repo_files", repo_id, repo_type, revision))
            return sorted(hub_files, reverse=True)  # the hub's order must not matter

    served = tmp_path / "served"
    for name, data in hub_files.items():
        (served / name).parent.mkdir(parents=True, exist_ok=True)
        (served / name).write_bytes(data)

    def fake_download(repo_id, filename, *, repo_type, revision, cache_dir, local_files_only):
        calls.append(("download", filename, repo_type, revision))
        return str(served / filename)

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    got = [p.prompt for p in iter_pairs("someone/pickapic/data", revision="v2", start=1)]
    assert got == ["t1", "t2"]
    assert calls == [
        ("dataset_info", "someone/pickapic", "v2"),
        ("list_repo_files", "someone/pickapic", "dataset", "f" * 40),
        ("download", "data/train-0000.parquet", "dataset", "f" * 40),
        ("download", "data/train-0001.parquet", "dataset", "f" * 40),
    ]

    # the hub unreachable: the cache answers, as it does for hf_hub_download
    class DownApi(FakeApi):
        def dataset_info(self, repo_id, *, revision=None):
            raise ConnectionError("no route to host")

    cache = tmp_path / "cache"
    _fake_dataset_cache(cache, "someone/pickapic", hub_files)
    monkeypatch.setattr(huggingface_hub, "HfApi", DownApi)
    calls.clear()
    assert count_rows("someone/pickapic/data", cache_dir=cache) == 3
    assert [c[3] for c in calls if c[0] == "download"] == [COMMIT, COMMIT]
    with pytest.raises(FileNotFoundError, match=r"'someone/gone'.*no route to host"):
        count_rows("someone/gone", cache_dir=cache)


def test_bad_sources_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist locally and is not a hub id"):
        iter_pairs(tmp_path / "missing.parquet")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("no data here")
    with pytest.raises(FileNotFoundError, match=r"empty holds no \.parquet files"):
        count_rows(tmp_path / "empty")
    (tmp_path / "pairs.csv").write_text("prompt,chosen,rejected\n")
    with pytest.raises(ValueError, match=r"pairs\.csv: unsupported file type '\.csv'"):
        iter_pairs(tmp_path / "pairs.csv")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match=r"empty\.jsonl holds no pairs"):
        iter_pairs(tmp_path / "empty.jsonl")
    (tmp_path / "fake.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=r"fake\.parquet: not a readable parquet file"):
        count_rows(tmp_path / "fake.parquet")
    with pytest.raises(ValueError, match="start must be a non-negative integer, got -1"):
        iter_pairs(tmp_path / "empty.jsonl", start=-1)
    with pytest.raises(ValueError, match=r"stop must be None or an integer >= start \(5\), got 2"):
        iter_pairs(tmp_path / "empty.jsonl", start=5, stop=2)


def test_a_parquet_without_the_pickapic_columns_names_them(tmp_path):
    path = write_pickapic_parquet(tmp_path / "p.parquet", [PickapicRow("a")])
    pq.write_table(pq.read_table(path).drop_columns(["label_0", "label_1"]), tmp_path / "nolabels.parquet")
    with pytest.raises(ValueError, match=r"nolabels\.parquet lacks the column\(s\) \['label_0', 'label_1'\]"):
        count_rows(tmp_path / "nolabels.parquet")
    with pytest.raises(ValueError, match=r"nolabels\.parquet lacks the column\(s\) \['label_0', 'label_1'\]"):
        list(iter_pairs(tmp_path))  # a folder: found when streaming reaches the file

    table = pq.read_table(path)
    as_text = table.set_column(table.schema.get_field_index("label_0"), "label_0", pa.array(["1.0"]))
    pq.write_table(as_text, tmp_path / "text_labels.parquet")
    with pytest.raises(ValueError, match=r"wrong type: \['label_0 \(string\)'\]"):
        count_rows(tmp_path / "text_labels.parquet")


def test_only_the_required_columns_are_needed(tmp_path):
    """has_label and ranking_id are optional: without them, rows are judged by their labels alone."""
    path = write_pickapic_parquet(tmp_path / "p.parquet", [PickapicRow("a"), PickapicRow("b", labels=TIE)])
    pq.write_table(pq.read_table(path, columns=list(pairs.REQUIRED_COLUMNS)), tmp_path / "min.parquet")
    stats = PairStats()
    got = list(iter_pairs(tmp_path / "min.parquet", stats=stats))
    assert [(p.index, p.row_id) for p in got] == [(0, "min.parquet:0")]
    assert (stats.rows, stats.ties) == (2, 1)
