"""Imports point one way: core <- interfaces <- implementations <- pipeline and recipes <- faces.

Every ``import`` of ``img_guidance`` in the package is read from the source (module level and inside
functions alike: a function-level import is still a dependency, only a deferred one) and must name a
module of the same layer or a lower one. A module with no layer below fails the test too, so that a
new file gets a place on purpose.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# (layer, module prefixes); a module takes the layer of its longest matching prefix
LAYERS: dict[str, tuple[str, ...]] = {
    # the aligner, its objective, and what every part shares; ShapesWorld's models and data
    "core": (
        "img_guidance",  # the package's __init__: lazy names of the core only
        "img_guidance.aligner",
        "img_guidance.objective",
        "img_guidance.hub",
        "img_guidance.precision",
        "img_guidance.offload",
        "img_guidance.outputs",
        "img_guidance.presets",
        "img_guidance.data",
        "img_guidance.shapes",  # grammar, render, judge, correct, splits, data, models
    ),
    # what a backend and a guidance model are
    "interfaces": (
        "img_guidance.backends.base",
        "img_guidance.guidance.base",
        "img_guidance.guidance.prompts",
        "img_guidance.guidance.questions",
    ),
    # the backends, guidance models and scorers themselves, their registries and converters
    "implementations": (
        "img_guidance.backends",
        "img_guidance.guidance",
        "img_guidance.shapes.detector",  # makes the world's LLaVA in the guidance's prompt formats
        "img_guidance.eval.scorers",
        "img_guidance.eval.imagereward",
        "img_guidance.eval.convert_imagereward",
        "img_guidance.eval.convert_open_clip",
    ),
    # what runs the parts: the pipeline, the feature stage, training, evaluation
    "pipeline and recipes": (
        "img_guidance.pipeline",
        "img_guidance.features",
        "img_guidance.recipes",
        "img_guidance.recipes.train_shapes_generator",
        "img_guidance.eval",
    ),
    # what a user runs
    "faces": (
        "img_guidance.cli",
        "img_guidance.serve",
        "img_guidance.demo",
        "img_guidance.study",
    ),
    # tiny models for the tests and benchmarks: nothing in the package imports them
    "testing": ("img_guidance.testing",),
}
ORDER = list(LAYERS)


def layer_of(module: str) -> str:
    best = max(
        ((prefix, name) for name, prefixes in LAYERS.items() for prefix in prefixes),
        key=lambda item: len(item[0]) if module == item[0] or module.startswith(item[0] + ".") else -1,
    )
    prefix, name = best
    if not (module == prefix or module.startswith(prefix + ".")):
        raise LookupError(module)
    return name


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of ``img_guidance`` in the file, relative ones resolved."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            # ``from package import submodule`` depends on the submodule
            found += [(node.lineno, f"{name}.{alias.name}") for alias in node.names]
    return sorted((line, name) for line, name in found if name.split(".")[0] == "img_guidance")


def target_of(name: str) -> str:
    """The module an imported name lives in: the longest prefix that is a file or package."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        path = SRC.joinpath(*parts[:end])
        if path.with_suffix(".py").is_file() or (path / "__init__.py").is_file():
            return ".".join(parts[:end])
    raise LookupError(name)


SOURCES = sorted((SRC / "img_guidance").rglob("*.py"))


def test_every_module_has_a_layer():
    missing = []
    for path in SOURCES:
        try:
            layer_of(module_name(path))
        except LookupError:
            missing.append(module_name(path))
    assert missing == []


def test_imports_point_down_the_layers():
    upward = []
    for path in SOURCES:
        module = module_name(path)
        here = ORDER.index(layer_of(module))
        for line, name in imports_of(path):
            target = target_of(name)
            if ORDER.index(layer_of(target)) > here:
                upward.append(
                    f"{path.relative_to(SRC)}:{line}: {module} ({layer_of(module)}) imports "
                    f"{target} ({layer_of(target)})"
                )
    assert upward == [], "\n".join(upward)


@pytest.mark.parametrize(
    ("module", "layer"),
    [
        ("img_guidance.aligner", "core"),
        ("img_guidance.shapes.grammar", "core"),
        ("img_guidance.backends.base", "interfaces"),
        ("img_guidance.backends.shapes", "implementations"),
        ("img_guidance.guidance", "implementations"),
        ("img_guidance.recipes.train_shapes_generator", "pipeline and recipes"),
        ("img_guidance.recipes.train_shapes", "pipeline and recipes"),
        ("img_guidance.cli", "faces"),
    ],
)
def test_a_module_takes_the_layer_of_its_longest_prefix(module, layer):
    assert layer_of(module) == layer


def test_the_check_reads_function_level_and_relative_imports(tmp_path, monkeypatch):
    package = tmp_path / "img_guidance" / "shapes"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (tmp_path / "img_guidance" / "__init__.py").write_text("")
    (tmp_path / "img_guidance" / "pipeline.py").write_text("")
    source = package / "grammar.py"
    source.write_text("def f():\n    from img_guidance.pipeline import IMGPipeline\n\nfrom . import render\n")
    monkeypatch.setitem(globals(), "SRC", tmp_path)
    assert imports_of(source) == [(2, "img_guidance.pipeline.IMGPipeline"), (4, "img_guidance.shapes.render")]
    assert target_of("img_guidance.pipeline.IMGPipeline") == "img_guidance.pipeline"
    assert layer_of("img_guidance.shapes.grammar") == "core" and layer_of("img_guidance.pipeline") != "core"
