import json

import pytest
from PIL import Image

from img_guidance.data.prompts import PromptItem, read_prompts
from img_guidance.outputs import METADATA, OutputFolder, entry_name, side_by_side


def test_read_prompt_files(tmp_path):
    (tmp_path / "p.txt").write_text("a red circle\n\n  two blue squares  \n")
    assert read_prompts(tmp_path / "p.txt") == [PromptItem("a red circle"), PromptItem("two blue squares")]
    (tmp_path / "p.jsonl").write_text('{"prompt": "a cat", "seed": 4}\n\n{"prompt": "a dog"}\n')
    assert read_prompts(tmp_path / "p.jsonl") == [PromptItem("a cat", 4), PromptItem("a dog")]
    (tmp_path / "p.json").write_text('["x", "y"]')
    assert read_prompts(tmp_path / "p.json") == [PromptItem("x"), PromptItem("y")]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", "\n  \n", "holds no prompts"),
        (
            "mixed.jsonl",
            '"a cat"\n{"prompt": "a dog"}\n',
            r"mixes plain strings \(.*mixed.jsonl:1\) and objects",
        ),
        ("mixed.json", '["a", {"prompt": "b"}]', "mixes plain strings"),
        (
            "badseed.jsonl",
            '{"prompt": "a", "seed": "3"}\n',
            r"badseed.jsonl:1: seed must be an integer, got '3'",
        ),
        ("noprompt.jsonl", '{"seed": 3}\n', "noprompt.jsonl:1: prompt must be a non-empty string, got None"),
        ("number.json", "[1, 2]", r"number.json\[0\]: expected a prompt string or an object, got 1"),
        ("broken.jsonl", '{"prompt": "a"}\n{"prompt": \n', r"broken.jsonl:2: not valid JSON"),
        ("extra.jsonl", '{"prompt": "a", "steps": 3}\n', r"unknown keys \['steps'\]"),
        ("prompts.csv", "a,b\n", "unsupported prompt file type '.csv'"),
    ],
)
def test_bad_prompt_files_name_the_file_and_line(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=message):
        read_prompts(tmp_path / name)


def test_missing_prompt_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.txt"):
        read_prompts(tmp_path / "nope.txt")


def test_output_folder_writes_files_then_metadata_and_knows_what_is_finished(tmp_path):
    folder = OutputFolder(tmp_path / "out")
    assert folder.finished() == set()
    red, green, blue = (Image.new("RGB", (4, 3), c) for c in ("red", "green", "blue"))
    name = entry_name("A Red circle!", 5)
    assert name.startswith("a-red-circle-s5-") and name != entry_name("a red circle", 5)
    assert name == entry_name("A Red circle!", 5) != entry_name("A Red circle!", 6)
    line = folder.write(name, red, [green, blue], {"prompt": "A Red circle!", "seed": 5})
    assert line["files"] == {
        "initial": f"initial/{name}.png",
        "calibrated_round1": f"calibrated/{name}-round1.png",
        "calibrated": f"calibrated/{name}.png",
        "compare": f"compare/{name}.png",
    }
    compare = Image.open(tmp_path / "out" / line["files"]["compare"])
    assert compare.size == (4 * 3 + 2 * 4, 3)
    assert compare.getpixel((0, 0)) == (255, 0, 0) and compare.getpixel((compare.width - 1, 0)) == (0, 0, 255)
    assert folder.finished() == {name}
    records = [json.loads(x) for x in (tmp_path / "out" / METADATA).read_text().splitlines()]
    assert records[0]["seed"] == 5 and records[0]["name"] == name

    # an image that no longer decodes is reported, and its prompt is not finished
    compare_path = tmp_path / "out" / line["files"]["compare"]
    good = compare_path.read_bytes()
    compare_path.write_bytes(good[:40])
    assert folder.finished() == set()
    assert folder.undecodable == [str(compare_path)]
    compare_path.write_bytes(good)
    assert folder.finished() == {name} and folder.undecodable == []

    # a deleted image, or a line cut short by a kill, means the prompt is not finished
    (tmp_path / "out" / line["files"]["calibrated"]).unlink()
    with open(tmp_path / "out" / METADATA, "a") as f:
        f.write('{"name": "half-written')
    assert folder.finished() == set()
    assert not list((tmp_path / "out").rglob(".*.tmp"))


def test_side_by_side_handles_different_heights():
    out = side_by_side([Image.new("RGB", (2, 5), "red"), Image.new("RGB", (3, 2), "blue")], gap=1)
    assert out.size == (6, 5)
