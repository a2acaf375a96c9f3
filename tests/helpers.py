"""Shared test helpers."""

import threading
from collections.abc import Callable

import torch


def official_state_dict(cfg: dict, *, prefix: str = "module.", scale: float = 0.2) -> dict:
    """Random tensors with the official key names and shapes (zero_linear non-zero, so the output
    is not the identity), written the way the official .pth files are: keys with a DDP prefix."""
    g, d, inner = cfg["guidance_dim"], cfg["image_dim"], cfg["heads"] * cfg["head_dim"]
    hidden = cfg["ff_mult"] * d
    shapes = {
        "proj_in.weight": (d, g),
        "proj_in.bias": (d,),
        "proj_out.weight": (d, d),
        "proj_out.bias": (d,),
        "norm_out.weight": (d,),
        "norm_out.bias": (d,),
        "zero_linear.weight": (d, d),
        "zero_linear.bias": (d,),
    }
    for i in range(cfg["depth"]):
        shapes |= {
            f"layers.{i}.0.norm1.weight": (d,),
            f"layers.{i}.0.norm1.bias": (d,),
            f"layers.{i}.0.norm2.weight": (d,),
            f"layers.{i}.0.norm2.bias": (d,),
            f"layers.{i}.0.to_q.weight": (inner, d),
            f"layers.{i}.0.to_kv.weight": (2 * inner, d),
            f"layers.{i}.0.to_out.weight": (d, inner),
            f"layers.{i}.1.0.weight": (d,),
            f"layers.{i}.1.0.bias": (d,),
            f"layers.{i}.1.1.weight": (hidden, d),
            f"layers.{i}.1.3.weight": (d, hidden),
        }
    state = {}
    for key, shape in shapes.items():
        t = torch.randn(shape) * scale
        if key.endswith("norm1.weight") or key.endswith("norm2.weight") or key.endswith(".1.0.weight"):
            t = 1 + t
        if key == "norm_out.weight":
            t = 1 + t
        state[prefix + key] = t
    return state


class ThreadProcess:
    """What the project reads from accelerate's ``Accelerator``/``PartialState`` (index, count, main,
    barrier), for one of several threads standing in for processes."""

    def __init__(self, index: int, count: int, barrier: threading.Barrier):
        self.process_index, self.num_processes, self.barrier = index, count, barrier
        self.is_main_process = index == 0

    def wait_for_everyone(self):
        self.barrier.wait(timeout=120)


def run_as_processes(work: Callable[[int, ThreadProcess], object], count: int = 2) -> dict[int, object]:
    """``work(p, process)`` in ``count`` threads at once, sharing one barrier; their results by index.
    A thread that fails aborts the barrier (so none waits forever) and its error is raised."""
    barrier, results, failures = threading.Barrier(count), {}, []

    def run(p: int):
        try:
            results[p] = work(p, ThreadProcess(p, count, barrier))
        except BaseException as err:
            failures.append(err)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(p,)) for p in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not failures, failures
    return results
