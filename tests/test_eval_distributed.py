"""``eval run`` over several processes: the split of the batches and its inverse worked out by hand, the
score lines of two processes (threads with a barrier) merged into what one process writes, part folders
left by a killed run merged without duplicates, and ``eval run shapes`` under torchrun with two real
processes on the CPU, fresh and resuming a folder cut short, equal to one process: the same images byte
for byte, the same score lines, summary and report."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from img_guidance.cli import app
from img_guidance.eval.distributed import (
    SingleProcess,
    check_parts,
    launch_size,
    launched_processes,
    merge_batches,
    merge_parts,
    part_folder,
    part_records,
    process_device,
    split_batches,
)
from img_guidance.eval.harness import score_folder
from img_guidance.eval.scorers import load_scorer
from img_guidance.outputs import OutputFolder, SettingsMismatch
from img_guidance.shapes.render import render
from tests.helpers import run_as_processes

runner = CliRunner()
RUN = ["eval", "run", "shapes", "--model", "shapes", "--limit", "5", "--images-per-prompt", "2"]
RUN += ["--steps", "2", "--device", "cpu"]  # 5 prompts x 2 seeds: 10 entries; 20 images, 2 score batches
TIMINGS = ("seconds_per_round", "peak_memory_bytes")  # what differs between two runs of the same work


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # the subprocesses run one thread each (OMP_NUM_THREADS=1); the reference in this process too
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- the split and the merge


def test_split_batches_deals_batches_round_robin_and_merge_undoes_it():
    items = list("abcdefg")  # batches of 2: ab cd ef g
    assert split_batches(items, 2, 0, 2) == list("abef")
    assert split_batches(items, 2, 1, 2) == list("cdg")
    assert split_batches(items, 2, 2, 3) == list("ef")
    assert split_batches(items, 1, 1, 3) == list("be")
    assert split_batches(items, 8, 1, 2) == []  # one batch: the second process gets nothing
    assert merge_batches([list("abef"), list("cdg")], 2) == items
    assert merge_batches([list("ad"), list("b"), list("c")], 1) == list("abcd")


def test_merge_batches_inverts_split_batches_and_rebatching_a_share_keeps_its_batches():
    for total in range(12):
        items = list(range(total))
        for batch_size in (1, 2, 3, 5):
            batches = [items[s : s + batch_size] for s in range(0, total, batch_size)]
            for count in (1, 2, 3, 4):
                shares = [split_batches(items, batch_size, i, count) for i in range(count)]
                assert merge_batches(shares, batch_size) == items
                for i, share in enumerate(shares):  # batched again, a share is the batches it was dealt
                    again = [share[s : s + batch_size] for s in range(0, len(share), batch_size)]
                    assert again == batches[i::count]


def test_merge_batches_names_a_share_of_the_wrong_length():
    # 7 items in batches of 2 are shared 4 + 3 (0 1 4 5, 2 3 6), not 3 + 4
    with pytest.raises(
        ValueError, match=r"process 0 of 2 has 3 items, 4 expected for 7 items in batches of 2"
    ):
        merge_batches([[0, 1, 4], [2, 3, 5, 6]], 2)
    with pytest.raises(ValueError, match="0 <= index < count"):
        split_batches([1, 2], 2, 2, 2)


def test_the_launchers_process_count_and_each_processs_device(monkeypatch):
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert launch_size() == 1 and isinstance(launched_processes("auto"), SingleProcess)  # no accelerate
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    assert launch_size() == 4
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert launch_size() == 8

    class State:
        num_processes, device = 8, torch.device("cuda", 3)

    assert [process_device(d, State()) for d in ("auto", "cuda", "cuda:0", "cpu")] == [
        "cuda:3",
        "cuda:3",
        "cuda:0",  # named: as given
        "cpu",
    ]
    State.device = torch.device("cpu")
    assert process_device("auto", State()) == "cpu"
    assert process_device("auto", SingleProcess()) == "auto"  # one process: resolved as before


# ---------------------------------------------------------------- scoring in two processes


class Recording:
    """A scorer that records the prompts of each batch it scores."""

    def __init__(self, scorer):
        self.scorer, self.name, self.batches = scorer, scorer.name, []

    def score(self, images, prompts):
        self.batches.append(list(prompts))
        return self.scorer.score(images, prompts)

    def describe(self):
        return self.scorer.describe()


def images_folder(folder: Path) -> Path:
    """Seven ShapesWorld renders with images.jsonl, the fifth a file that does not decode."""
    prompts = ["a red circle", "two blue squares", "a green triangle", "a yellow square"]
    folder.mkdir(parents=True)
    lines = []
    for k in range(7):
        prompt, name = prompts[k % 4], f"im{k}.png"
        if k == 4:
            (folder / name).write_bytes(b"not a png")
        else:
            render(prompts[(k + k // 4) % 4], seed=k).save(folder / name)  # some right, some wrong
        lines.append({"file": name, "prompt": prompt, "seed": k // 4, "system": "s", "category": f"c{k % 2}"})
    (folder / "images.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return folder


def test_two_processes_score_their_batches_and_the_main_one_writes_what_one_process_does(tmp_path):
    one = images_folder(tmp_path / "one")
    two = shutil.copytree(one, tmp_path / "two")
    judges = [load_scorer("shapes-judge"), load_scorer("shapes-checks")]
    expected = score_folder(one, judges, batch_size=2)

    recordings = [[Recording(s) for s in judges] for _ in range(2)]
    warnings: list[str] = []
    results = run_as_processes(
        lambda p, process: score_folder(
            two, recordings[p], batch_size=2, warn=warnings.append, processes=process
        )
    )
    # batches of 2 over 7 images: 0-1, 2-3, 4-5 (im4 does not decode), 6: process 0 has 0-1 and 4-5
    prompts = [line["prompt"] for line in map(json.loads, (one / "images.jsonl").read_text().splitlines())]
    assert recordings[0][0].batches == [prompts[0:2], prompts[5:6]]
    assert recordings[1][0].batches == [prompts[2:4], prompts[6:7]]
    assert warnings == [f"warning: {two / 'im4.png'} does not decode; left out of the scores"]
    assert results[0] == results[1] == json.loads(json.dumps(expected))
    for name in ("scores.jsonl", "summary.json"):
        assert (two / "eval" / name).read_bytes() == (one / "eval" / name).read_bytes(), name
    assert sorted(p.name for p in (two / "eval").iterdir()) == ["scores.jsonl", "summary.json"]


# ---------------------------------------------------------------- part folders


def tiny(color: str) -> Image.Image:
    return Image.new("RGB", (4, 4), color)


def test_merge_parts_moves_finished_prompts_in_index_order_and_never_twice(tmp_path):
    out, settings = tmp_path / "out", {"steps": 2}
    OutputFolder(out).start(settings)
    OutputFolder(out).write("p0", tiny("red"), [tiny("blue")], {"index": 0})
    for rank, names in ((0, ["p4", "p2"]), (1, ["p3", "p1"])):
        part = OutputFolder(part_folder(out, rank))
        part.start(settings)
        for name in names:
            part.write(name, tiny("red"), [tiny("green")], {"index": int(name[1])})
    # a kill left: p3's images without their line, p5's line cut short, a temporary file
    rank1 = part_folder(out, 1)
    OutputFolder(rank1).write("p5", tiny("red"), [tiny("green")], {"index": 5})
    lines = (rank1 / "metadata.jsonl").read_text().splitlines()
    (rank1 / "metadata.jsonl").write_text(f"{lines[1]}\n{lines[2][:30]}")  # p3's line gone, p5's cut
    (rank1 / "initial" / ".p3.png.tmp").write_bytes(b"half")
    (part_folder(out, 0) / "initial" / "p2.png").unlink()  # p2's images are not all there

    assert [r["name"] for _, r in part_records(out)] == ["p1", "p4"]
    check_parts(out, settings)
    with pytest.raises(SettingsMismatch, match=r"rank-0 holds images made with other settings \(steps: 2"):
        check_parts(out, {"steps": 3})

    assert merge_parts(out) == 2
    assert [r["name"] for r in OutputFolder(out).records()] == ["p0", "p1", "p4"]
    assert OutputFolder(out).finished() == {"p0", "p1", "p4"}
    assert Image.open(out / "calibrated" / "p4.png").getpixel((0, 0)) == (0, 128, 0)
    assert not (out / "parts").exists()

    # a merge cut short after its lines were appended: the same lines are not appended again
    part = OutputFolder(part_folder(out, 0))
    part.start(settings)
    line = part.write("p6", tiny("red"), [tiny("green")], {"index": 6})
    shutil.copytree(part.root / "initial", out / "initial", dirs_exist_ok=True)
    for sub in ("calibrated", "compare"):
        os.replace(part.root / sub / "p6.png", out / sub / "p6.png")
    with open(out / "metadata.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")
    assert merge_parts(out) == 1
    names = [json.loads(x)["name"] for x in (out / "metadata.jsonl").read_text().splitlines()]
    assert names == ["p0", "p1", "p4", "p6"] and not (out / "parts").exists()


# ---------------------------------------------------------------- eval run, end to end


class Launched:
    """A process of a launch, as the CLI sees it, that must fail before it waits for the others."""

    def __init__(self, index: int):
        self.process_index, self.num_processes, self.is_main_process = index, 2, index == 0

    def wait_for_everyone(self):
        raise AssertionError("reached a barrier: the input was not checked first")

    def destroy_process_group(self):
        pass


def one_line_error(result, needle: str) -> None:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize("index", [0, 1])
def test_bad_input_fails_in_every_process_before_any_model_or_barrier(tmp_path, monkeypatch, index):
    import img_guidance.cli
    import img_guidance.eval.distributed

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(img_guidance.cli, "load_pipeline", no_loading)
    monkeypatch.setattr(img_guidance.eval.distributed, "launched_processes", lambda device: Launched(index))
    out = tmp_path / "out"
    one_line_error(runner.invoke(app, [*RUN, "--out", str(out), "--ip-scale", "inf"]), "--ip-scale")
    one_line_error(runner.invoke(app, [*RUN, "--out", str(out), "--scorers", "hps"]), "unknown scorer 'hps'")
    (tmp_path / "file").write_text("")
    one_line_error(runner.invoke(app, [*RUN, "--out", str(tmp_path / "file")]), "not a folder")
    part = OutputFolder(part_folder(out, 1))  # a killed run's part, made with 3 steps
    part.start({"steps": 3})
    part.write("x", tiny("red"), [tiny("red")], {"index": 0})
    one_line_error(
        runner.invoke(app, [*RUN, "--out", str(out)]), "rank-1 holds images made with other settings"
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, str]:
    """``eval run shapes`` in this process, one process: the folder and what it printed."""
    out = tmp_path_factory.mktemp("one") / "run"
    result = runner.invoke(app, [*RUN, "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out, result.stdout


def torchrun(*args: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 -m img_guidance.cli ARGS`` on the CPU, offline."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*command, "-m", "img_guidance.cli", *args], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def records(folder: Path) -> list[dict]:
    lines = (folder / "metadata.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k not in TIMINGS} for x in lines]


def assert_same_run(folder: Path, reference: Path) -> None:
    """The same images byte for byte, metadata (but timings), score lines and summary; nothing else."""
    files = sorted(str(p.relative_to(reference)) for p in reference.rglob("*") if p.is_file())
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) == files
    for name in files:
        if name != "metadata.jsonl":
            assert (folder / name).read_bytes() == (reference / name).read_bytes(), name
    assert records(folder) == records(reference)  # one line per (prompt, seed), none twice
    assert len(records(folder)) == 10


def report(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("|")]


def test_eval_run_on_two_processes_equals_one_process(reference, tmp_path):
    one, printed = reference
    out = tmp_path / "run"
    done = torchrun(*RUN, "--out", str(out))
    assert_same_run(out, one)
    assert report(done.stdout) == report(printed) and len(report(printed)) == 4
    assert done.stdout.count("wrote 10 prompts") == 1  # the main process reports


def cut_short(reference: Path, dest: Path, *, in_out: list[int], in_part: list[int], stray: int) -> Path:
    """A copy of ``reference`` as a killed run leaves it: the prompts ``in_out`` finished in ``dest``,
    ``in_part`` finished in process 1's part folder (and a line cut short after them), and the
    images of prompt ``stray`` written without their line."""
    lines = (reference / "metadata.jsonl").read_text().splitlines()
    part = part_folder(dest, 1)
    part.mkdir(parents=True)
    for folder in (dest, part):
        shutil.copy(reference / "settings.json", folder / "settings.json")
    for folder, chosen in ((dest, in_out), (part, in_part)):
        with open(folder / "metadata.jsonl", "w") as f:
            f.write("".join(lines[k] + "\n" for k in chosen))
        for k in [*chosen, stray] if folder == part else chosen:
            for file in json.loads(lines[k])["files"].values():
                (folder / file).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(reference / file, folder / file)
    with open(part / "metadata.jsonl", "a") as f:
        f.write(lines[stray][:40])
    return dest


def test_a_run_cut_short_resumes_under_another_process_count(reference, tmp_path):
    one, _ = reference
    # a killed two-process run, resumed by one process
    out = cut_short(one, tmp_path / "a", in_out=[0, 1], in_part=[3, 2], stray=4)
    result = runner.invoke(app, [*RUN, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "4 of 10 prompts already in" in result.stdout
    assert_same_run(out, one)
    # a killed one-process run (prompt 2's images written, its line not), resumed by two processes
    out = cut_short(one, tmp_path / "b", in_out=[0, 1], in_part=[], stray=2)
    shutil.copytree(part_folder(out, 1), out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.json*"))
    shutil.rmtree(out / "parts")
    done = torchrun(*RUN, "--out", str(out))
    assert "2 of 10 prompts already in" in done.stdout
    assert_same_run(out, one)
