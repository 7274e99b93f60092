"""The layers of the package (docs/architecture.md): the library under the two commands, and what the
commands share defined once in ``selgroup_fast/cli_common.py`` (issue #21 item 2)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from selgroup_fast import cli_common

PACKAGE = Path(cli_common.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports (top-level or inside a function), relative imports made absolute."""
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _files(*places: str) -> list[Path]:
    paths = [PACKAGE / place for place in places]
    return [file for path in paths for file in ([path] if path.is_file() else sorted(path.rglob("*.py")))]


def test_relative_imports_resolve_as_python_does():
    # the checker's own rule, on files whose imports are known
    assert "selgroup_fast.models.vit_bench_model" in _imports(PACKAGE / "bench" / "timing.py")
    assert "selgroup_fast.tasks.PRESETS" in _imports(PACKAGE / "train" / "cli.py")
    assert "selgroup_fast.bench.cli.main" in _imports(PACKAGE / "bench" / "__init__.py")


@pytest.mark.parametrize(
    "place",
    ["train", "data", "models", "metrics.py", "tasks.py", "cli_common.py", "losses.py", "profiling.py", "methods"],
)
def test_the_library_and_the_trainer_import_nothing_from_the_bench(place):
    for path in _files(place):
        from_bench = sorted(name for name in _imports(path) if name.startswith("selgroup_fast.bench"))
        assert not from_bench, f"{path.relative_to(PACKAGE)} imports {from_bench}"


def test_the_library_imports_neither_command():
    for path in _files("data", "models", "metrics.py", "tasks.py", "cli_common.py"):
        commands = sorted(
            name for name in _imports(path) if name.startswith(("selgroup_fast.train", "selgroup_fast.bench"))
        )
        assert not commands, f"{path.relative_to(PACKAGE)} imports {commands}"


def test_bench_plots_does_not_import_the_report():
    # report.py draws through plots.py; the other way round was a cycle
    assert not {
        name for name in _imports(PACKAGE / "bench" / "plots.py") if name.startswith("selgroup_fast.bench.report")
    }


@pytest.mark.parametrize(
    "name", ["resolve_device", "markdown_table", "text_table", "MachineDefaults", "environment", "cpu_model", "pyplot"]
)
def test_what_both_commands_need_is_defined_once(name):
    where = [
        path.relative_to(PACKAGE).as_posix()
        for path in _files(".")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef | ast.ClassDef) and node.name.lstrip("_") == name
    ]
    assert where == ["cli_common.py"]


def test_both_commands_default_to_cpu_on_a_build_without_cuda_kernels(monkeypatch):
    # torch sees a GPU but this build of the extension has no CUDA kernels: the methods could not run there
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cli_common.ops, "cuda_available", lambda: False)
    assert cli_common.resolve_device(None) == torch.device("cpu")
    with pytest.raises(cli_common.UsageError, match="--device cuda: this build of selgroup_fast has no CUDA kernels"):
        cli_common.resolve_device("cuda")


def test_the_trainer_refuses_cuda_on_a_build_without_cuda_kernels(monkeypatch, capsys, tmp_path):
    from train_helpers import TINY_ARGS

    from selgroup_fast.train.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cli_common.ops, "cuda_available", lambda: False)
    out = tmp_path / "out"
    assert main([*TINY_ARGS, "--iters", "1", "--out", str(out), "--device", "cuda"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (
        "error: --device cuda: this build of selgroup_fast has no CUDA kernels; rebuild it where nvcc is present"
    )
    assert not out.exists()


@pytest.mark.parametrize(
    "text, message",
    [
        ("bogus", "--device 'bogus' is not a device (cpu, cuda, cuda:N)"),
        ("meta", "--device meta: only cpu and cuda are supported"),
    ],
)
def test_a_device_that_is_not_cpu_or_cuda_is_refused(text, message):
    with pytest.raises(cli_common.UsageError) as error:
        cli_common.resolve_device(text)
    assert str(error.value) == message
