import json
import logging
import re
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from img_guidance.data.triplets import (
    INSTRUCTION_COLUMN,
    REQUIRED_COLUMNS,
    TripletStats,
    count_triplet_rows,
    iter_triplets,
)
from img_guidance.testing.pairs import GARBAGE, encode_image, is_colour
from img_guidance.testing.triplets import (
    TripletRow,
    solid,
    write_instructpix2pix_parquet,
    write_triplets_jsonl,
)
from tests.test_pairs import _fake_dataset_cache


def _key(triplet) -> tuple:
    """Everything a triplet carries, comparable."""
    return (triplet.index, triplet.row_id, triplet.prompt, triplet.instruction, triplet.image.tobytes())


@pytest.fixture
def batches_read(monkeypatch) -> SimpleNamespace:
    """What pyarrow reads in record batches: the columns asked for and the instruction of every row."""
    log = SimpleNamespace(columns=set(), instructions=[])
    real = pq.ParquetFile.iter_batches

    def spy(self, *args, **kwargs):
        log.columns.update(kwargs["columns"])
        for batch in real(self, *args, **kwargs):
            log.instructions.extend(batch.column(INSTRUCTION_COLUMN).to_pylist())
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    return log


@pytest.mark.parametrize("image_as_struct", [False, True], ids=["bytes", "struct"])
def test_a_triplet_is_the_original_image_the_edited_prompt_and_the_instruction(tmp_path, image_as_struct):
    path = write_instructpix2pix_parquet(
        tmp_path / "train-00000-of-00262.parquet",
        [
            TripletRow(solid("red"), "a blue cube", "make it blue", original_prompt="a red cube"),
            TripletRow(encode_image("green"), "a ball at night", "make it night"),  # JPEG bytes
            TripletRow(solid(128, mode="L"), "a grey square", "make it grey"),
        ],
        image_as_struct=image_as_struct,
    )
    stats = TripletStats()
    got = list(iter_triplets(path, stats=stats))
    assert [(t.index, t.row_id, t.prompt, t.instruction) for t in got] == [
        (0, "train-00000-of-00262.parquet:0", "a blue cube", "make it blue"),
        (1, "train-00000-of-00262.parquet:1", "a ball at night", "make it night"),
        (2, "train-00000-of-00262.parquet:2", "a grey square", "make it grey"),
    ]
    assert all(t.image.mode == "RGB" for t in got)
    for triplet, colour in zip(got, ["red", "green", (128, 128, 128)], strict=True):
        assert is_colour(triplet.image, colour), (triplet.row_id, triplet.image.getpixel((4, 4)))
    assert stats.as_dict() == {"rows": 3, "triplets": 3, "empty": 0, "undecodable": []}


@pytest.mark.parametrize("image_as_struct", [False, True], ids=["bytes", "struct"])
def test_empty_and_undecodable_rows_are_skipped_and_counted_apart(tmp_path, caplog, image_as_struct):
    path = write_instructpix2pix_parquet(
        tmp_path / "p.parquet",
        [
            TripletRow(solid("red"), "ok 0", "edit 0"),
            TripletRow(GARBAGE, "garbage image", "edit 1"),
            TripletRow(solid("red"), "", "edit 2"),
            TripletRow(solid("red"), "no instruction", None),
            TripletRow(solid("red"), "  ", "edit 4"),
            TripletRow(None, "null image", "edit 5"),  # struct: {"bytes": None, "path": "...png"}
            TripletRow(GARBAGE, None, "edit 6"),  # empty first: its image is never decoded
            TripletRow(solid("blue"), "ok 7", "edit 7"),
        ],
        image_as_struct=image_as_struct,
    )
    stats = TripletStats()
    with caplog.at_level(logging.WARNING, logger="img_guidance.data.triplets"):
        got = list(iter_triplets(path, stats=stats))
    assert [t.index for t in got] == [0, 7]
    assert is_colour(got[1].image, "blue")
    assert stats == TripletStats(rows=8, triplets=2, empty=4, undecodable=["p.parquet:1", "p.parquet:5"])
    assert "p.parquet:1" in caplog.text and "original_image" in caplog.text
    assert "p.parquet:6" not in caplog.text


def test_jsonl_with_relative_and_absolute_paths(tmp_path, monkeypatch, caplog):
    data = tmp_path / "data"
    path = write_triplets_jsonl(
        data,
        [
            TripletRow(solid("red"), "p0", "i0"),
            TripletRow(None, "p1", "i1"),  # its file is not written
            TripletRow(GARBAGE, "p2", "i2"),
            TripletRow(solid("red"), "", "i3"),
            TripletRow(solid("red"), "p4", None),
            TripletRow(encode_image("green", format="JPEG"), "p5", "i5"),
        ],
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    solid("yellow").save(elsewhere / "y.png")
    absolute = {"image": str(elsewhere / "y.png"), "prompt": "abs", "instruction": "i6", "source": "mine"}
    lines = path.read_text().splitlines()
    # line 1: p0, line 2: blank, lines 3-7: p1-p5, line 8: abs (with a key that is ignored)
    path.write_text("\n".join([lines[0], "", *lines[1:], json.dumps(absolute)]) + "\n")
    monkeypatch.chdir(elsewhere)  # paths are relative to the JSONL file, not to the working directory

    stats = TripletStats()
    with caplog.at_level(logging.WARNING, logger="img_guidance.data.triplets"):
        got = list(iter_triplets(path, stats=stats))
    assert [(t.index, t.row_id, t.prompt, t.instruction) for t in got] == [
        (0, "triplets.jsonl:1", "p0", "i0"),
        (5, "triplets.jsonl:7", "p5", "i5"),
        (6, "triplets.jsonl:8", "abs", "i6"),
    ]
    for triplet, colour in zip(got, ["red", "green", "yellow"], strict=True):
        assert triplet.image.mode == "RGB" and is_colour(triplet.image, colour)
    assert stats == TripletStats(
        rows=7, triplets=3, empty=2, undecodable=["triplets.jsonl:3", "triplets.jsonl:4"]
    )
    assert "triplets.jsonl:3" in caplog.text and "images/0001.png" in caplog.text
    assert count_triplet_rows(path) == 7
    assert [t.index for t in iter_triplets(path, start=1, stop=6)] == [5]
    assert [t.index for t in iter_triplets(path, keep=lambda i: i != 5)] == [0, 6]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        (
            '["a.png", "x", "y"]',
            r"expected an object with keys \['image', 'prompt', 'instruction'\], got list",
        ),
        ('{"image": "a.png", "prompt": "x"}', r"missing key\(s\) \['instruction'\]"),
        ('{"image": "", "prompt": "x", "instruction": "y"}', "'image' must be a non-empty string"),
        ('{"image": "a.png", "prompt": 3, "instruction": "y"}', "'prompt' must be a string or null, got 3"),
    ],
)
def test_a_malformed_jsonl_line_is_an_error_naming_file_and_line(tmp_path, line, message):
    path = write_triplets_jsonl(tmp_path, [TripletRow(solid("red"), "a", "b"), TripletRow(GARBAGE, "c", "d")])
    path.write_text(path.read_text() + line + "\n")
    # the whole file is checked when iter_triplets is called, even lines outside [start, stop) or not kept
    with pytest.raises(ValueError, match=rf"triplets\.jsonl:3: {message}"):
        iter_triplets(path, stop=2, keep=lambda i: i == 0)


def _mixed_folder(folder: Path) -> int:
    """Two files (5 rows of bytes in groups of 2, 4 rows of structs in groups of 3) with every kind of
    row; returns 9. Row i's instruction is f"edit {i}"."""
    images = ["red", GARBAGE, "green", "blue", "red", "white", None, "black", "yellow"]
    prompts = ["p0", "p1", "", "p3", None, "p5", "p6", "p7", "p8"]
    rows = [
        TripletRow(solid(image) if isinstance(image, str) else image, prompt, f"edit {i}")
        for i, (image, prompt) in enumerate(zip(images, prompts, strict=True))
    ]
    write_instructpix2pix_parquet(folder / "part-0.parquet", rows[:5], row_group_size=2)
    write_instructpix2pix_parquet(folder / "part-1.parquet", rows[5:], row_group_size=3, image_as_struct=True)
    return len(rows)


def test_start_stop_split_the_stream_exactly_across_files_and_row_groups(tmp_path):
    n = _mixed_folder(tmp_path)
    whole_stats = TripletStats()
    whole = [_key(t) for t in iter_triplets(tmp_path, stats=whole_stats)]
    assert [k[:2] for k in whole] == [
        (0, "part-0.parquet:0"),
        (3, "part-0.parquet:3"),
        (5, "part-1.parquet:0"),
        (7, "part-1.parquet:2"),
        (8, "part-1.parquet:3"),
    ]
    assert whole_stats == TripletStats(
        rows=9, triplets=5, empty=2, undecodable=["part-0.parquet:1", "part-1.parquet:1"]
    )
    for k in range(n + 2):
        head, tail = TripletStats(), TripletStats()
        first = [_key(t) for t in iter_triplets(tmp_path, stop=k, stats=head)]
        second = [_key(t) for t in iter_triplets(tmp_path, start=k, stats=tail)]
        assert first + second == whole, k
        assert (head.rows, tail.rows) == (min(k, n), max(n - k, 0))
    window = [_key(t) for t in iter_triplets(tmp_path, start=3, stop=6)]
    assert window == [key for key in whole if 3 <= key[0] < 6]
    assert count_triplet_rows(tmp_path) == n
    assert count_triplet_rows(tmp_path / "part-1.parquet") == 4


def test_keep_deals_rows_to_processes_and_rejected_rows_are_never_decoded(tmp_path, batches_read):
    _mixed_folder(tmp_path)
    whole = [_key(t) for t in iter_triplets(tmp_path)]
    dealt, stats = [], []
    for p in range(3):
        stats.append(TripletStats())
        dealt += [_key(t) for t in iter_triplets(tmp_path, keep=lambda i, p=p: i % 3 == p, stats=stats[p])]
    assert sorted(dealt) == whole
    assert [s.rows for s in stats] == [3, 3, 3]  # rejected rows are not counted
    # the undecodable rows are 1 and 6: only the processes that own them decode (and report) them
    assert [s.undecodable for s in stats] == [["part-1.parquet:1"], ["part-0.parquet:1"], []]

    asked = []

    def keep(i: int) -> bool:
        asked.append(i)
        return i == 7

    batches_read.instructions.clear()
    stats = TripletStats()
    assert [t.index for t in iter_triplets(tmp_path, start=2, stop=8, keep=keep, stats=stats)] == [7]
    assert sorted(asked) == list(range(2, 8))  # global indices, each once, only inside [start, stop)
    assert stats.as_dict() == {"rows": 1, "triplets": 1, "empty": 0, "undecodable": []}
    # row groups without a kept row are not read: part-0's groups hold rows of [2, 8), none kept;
    # part-1's first group holds rows 5-7
    assert batches_read.instructions == ["edit 5", "edit 6", "edit 7"]


def test_only_the_three_needed_columns_are_read(tmp_path, batches_read):
    rows = [TripletRow(solid("red"), f"p{i}", f"edit {i}", edited_image=GARBAGE) for i in range(3)]
    path = write_instructpix2pix_parquet(tmp_path / "p.parquet", rows)
    stats = TripletStats()
    assert [t.prompt for t in iter_triplets(path, stats=stats)] == ["p0", "p1", "p2"]
    assert stats.undecodable == []
    assert batches_read.columns == set(REQUIRED_COLUMNS) == {"original_image", "edited_prompt", "edit_prompt"}

    # files with the three columns alone do as well
    (tmp_path / "min").mkdir()
    pq.write_table(pq.read_table(path, columns=list(REQUIRED_COLUMNS)), tmp_path / "min" / "m.parquet")
    assert [t.index for t in iter_triplets(tmp_path / "min")] == [0, 1, 2]


def test_a_parquet_without_the_instructpix2pix_columns_names_them(tmp_path):
    path = write_instructpix2pix_parquet(tmp_path / "p.parquet", [TripletRow(solid("red"), "a", "b")])
    table = pq.read_table(path)
    pq.write_table(table.drop_columns(["edited_prompt"]), tmp_path / "no_prompt.parquet")
    with pytest.raises(ValueError, match=r"no_prompt\.parquet lacks the column\(s\) \['edited_prompt'\]"):
        count_triplet_rows(tmp_path / "no_prompt.parquet")
    with pytest.raises(ValueError, match=r"an InstructPix2Pix parquet needs \['original_image'"):
        list(iter_triplets(tmp_path / "no_prompt.parquet"))

    column = table.schema.get_field_index("original_image")
    as_text = table.set_column(column, "original_image", pa.array(["/images/0.png"]))
    pq.write_table(as_text, tmp_path / "paths.parquet")
    with pytest.raises(ValueError, match=r"wrong type: \['original_image \(string\)'\]"):
        count_triplet_rows(tmp_path / "paths.parquet")


def test_a_hub_dataset_id_reads_offline_from_the_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    local = tmp_path / "local"
    write_instructpix2pix_parquet(
        local / "data" / "train-00000-of-00002.parquet",
        [TripletRow(solid("red"), "t0", "e0"), TripletRow(solid("green"), "t1", "e1")],
        image_as_struct=True,
    )
    write_instructpix2pix_parquet(
        local / "data" / "train-00001-of-00002.parquet",
        [TripletRow(solid("blue"), "t2", "e2")],
        image_as_struct=True,
    )
    files = {p.relative_to(local).as_posix(): p.read_bytes() for p in local.rglob("*.parquet")}
    cache = tmp_path / "cache"
    _fake_dataset_cache(cache, "someone/ip2p", files | {"README.md": b"# a tiny InstructPix2Pix"})

    got = list(iter_triplets("someone/ip2p", start=1, cache_dir=cache, local_files_only=True))
    assert [(t.index, t.row_id, t.prompt, t.instruction) for t in got] == [
        (1, "data/train-00000-of-00002.parquet:1", "t1", "e1"),
        (2, "data/train-00001-of-00002.parquet:0", "t2", "e2"),
    ]
    assert is_colour(got[0].image, "green") and is_colour(got[1].image, "blue")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # offline mode alone is enough
    assert count_triplet_rows("someone/ip2p/data", cache_dir=cache) == 3
    assert [t.prompt for t in iter_triplets("someone/ip2p", keep=lambda i: i != 1, cache_dir=cache)] == [
        "t0",
        "t2",
    ]
    with pytest.raises(FileNotFoundError, match=rf"'someone/other'.*not in {re.escape(str(cache))}"):
        iter_triplets("someone/other", cache_dir=cache)


def test_bad_arguments_and_sources_are_clear_errors(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match=r"empty\.jsonl holds no triplets"):
        count_triplet_rows(tmp_path / "empty.jsonl")
    path = write_triplets_jsonl(tmp_path, [TripletRow(solid("red"), "a", "b")])
    with pytest.raises(ValueError, match="keep must be None or a function of the row index, got 2"):
        iter_triplets(path, keep=2)
    with pytest.raises(ValueError, match=r"stop must be None or an integer >= start \(3\), got 1"):
        iter_triplets(path, start=3, stop=1)
    (tmp_path / "triplets.tsv").write_text("image\tprompt\tinstruction\n")
    with pytest.raises(ValueError, match=r"triplets\.tsv: unsupported file type '\.tsv'"):
        iter_triplets(tmp_path / "triplets.tsv")
