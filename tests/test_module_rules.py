"""Module-dependency rules of `clips_jax`, checked on the source with `ast` (every import, also inside functions).

* `clips_jax.curricula` imports only its own modules and the leaf modules `clips_jax.errors` / `clips_jax.fileio`
  (which themselves import nothing of `clips_jax`): curricula are pure functions, no trainer, data, runs or
  evaluation.
* `clips_jax.data` knows no network: nothing of the model, tiled inference, the cascade and its command, the
  trainer, the run folder or the evaluation.
* `clips_jax.inference` takes arrays: nothing of `clips_jax.data` (nor of the cascade built on both).
* Only command-line modules (those with a `main`, and `clips_jax.cli`) call `print` or define absl flags;
  library functions report through a `log` sink the command passes in.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "clips_jax"

CURRICULA_MAY_IMPORT = ("clips_jax.curricula", "clips_jax.errors", "clips_jax.fileio")
LEAVES = ("clips_jax.errors", "clips_jax.fileio")
DATA_MUST_NOT_IMPORT = (
    "clips_jax.model",
    "clips_jax.inference",
    "clips_jax.trainer",
    "clips_jax.cascade",
    "clips_jax.evaluation",
    "clips_jax.stage_a",
    "clips_jax.runs",
)
INFERENCE_MUST_NOT_IMPORT = ("clips_jax.data", "clips_jax.cascade")


def module_name(path: Path) -> str:
    """`clips_jax/data/store.py` -> "clips_jax.data.store"; a package's `__init__.py` -> the package."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_names(path: Path) -> set[str]:
    """Every module (or module attribute) the source file `path` imports (see `names_imported_by`)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    return names_imported_by(path.read_text(encoding="utf-8"), package)


def names_imported_by(source: str, package: str) -> set[str]:
    """Every module (or module attribute) `source` imports, as dotted names, wherever the import statement is.

    `import a.b` -> "a.b"; `from a.b import c` -> "a.b.c" (c may be a submodule or an attribute: either way it
    lies inside a.b); relative imports are resolved against `package` (the package the module belongs to);
    `importlib.import_module("x")` and `__import__("x")` with a literal name count too.
    """
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            out.update(f"{base}.{alias.name}" if base else alias.name for alias in node.names)
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            f = node.func
            called = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if called in ("import_module", "__import__"):
                out.add(node.args[0].value)
    return out


def within(name: str, prefixes) -> bool:
    """True if dotted `name` is one of `prefixes` or lies inside one of them."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def imports_of(package: str) -> dict[str, set[str]]:
    """{module: the clips_jax names it imports} for every module of `package` (a module or a package)."""
    base = PACKAGE.parent.joinpath(*package.split("."))
    files = sorted(base.rglob("*.py")) if base.is_dir() else [base.with_suffix(".py")]
    assert files and all(f.is_file() for f in files), f"no source found for {package}"
    return {module_name(f): {n for n in imported_names(f) if within(n, ("clips_jax",))} for f in files}


def violations(package: str, bad) -> list[str]:
    return sorted(f"{mod} imports {n}" for mod, names in imports_of(package).items() for n in names if bad(n))


def test_the_import_collector_sees_function_local_relative_and_dynamic_imports():
    # function-local imports of a real module (experiments.teacher imports the case store inside functions)
    assert "clips_jax.data.store.CaseStore" in imported_names(PACKAGE / "experiments" / "teacher.py")
    src = (
        "import os\nfrom clips_jax.errors import ConfigError\n\n\ndef f():\n    from ..model import UNet\n"
        "    from . import store\n    import importlib\n    importlib.import_module('clips_jax.trainer')\n"
    )
    assert names_imported_by(src, "clips_jax.data") == {
        "os",
        "clips_jax.errors.ConfigError",
        "clips_jax.model.UNet",
        "clips_jax.data.store",
        "importlib",
        "clips_jax.trainer",
    }
    assert within("clips_jax.inference.tiled_inference", ("clips_jax.inference",))
    assert not within("clips_jax.inference_extra", ("clips_jax.inference",))


def test_the_cascade_sits_above_data_and_inference():
    names = set().union(*imports_of("clips_jax.cascade").values())
    assert any(within(n, ("clips_jax.inference",)) for n in names)
    assert any(within(n, ("clips_jax.data",)) for n in names)


def test_curricula_import_only_curricula_and_leaf_modules():
    assert violations("clips_jax.curricula", lambda n: not within(n, CURRICULA_MAY_IMPORT)) == []
    # the named layers above, explicitly (implied by the line above)
    assert (
        violations(
            "clips_jax.curricula",
            lambda n: within(n, ("clips_jax.trainer", "clips_jax.data", "clips_jax.runs", "clips_jax.evaluation")),
        )
        == []
    )


@pytest.mark.parametrize("leaf", LEAVES)
def test_leaf_modules_import_nothing_of_clips_jax(leaf):
    assert violations(leaf, lambda n: True) == []


def test_data_knows_no_network():
    assert violations("clips_jax.data", lambda n: within(n, DATA_MUST_NOT_IMPORT)) == []


def test_inference_knows_no_data():
    assert violations("clips_jax.inference", lambda n: within(n, INFERENCE_MUST_NOT_IMPORT)) == []


def calls_print_or_defines_flags(path: Path) -> list[str]:
    """Lines of `path` that call `print(...)` or use absl flags (`flags.DEFINE_*`, `FlagValues`, `FLAGS`)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
            found.append(f"{path.name}:{node.lineno} print(...)")
        elif isinstance(node, ast.Attribute) and (
            node.attr.startswith("DEFINE") or node.attr in ("FLAGS", "FlagValues")
        ):
            found.append(f"{path.name}:{node.lineno} flags.{node.attr}")
    return found


def is_command(path: Path) -> bool:
    """A command-line module: it defines `main` (its console script / `python -m` entry), or is `cli.py`, the
    convention's own module; `statistics.py` prints its simulation table under `__main__`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    has_main = any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body)
    return has_main or path.name == "cli.py" or path == PACKAGE / "experiments" / "statistics.py"


def test_only_command_line_modules_print_or_parse_flags(tmp_path):
    # library code reports through a `log` / `echo` sink a command passes in (its default may be print itself)
    offenders = [
        hit for f in sorted(PACKAGE.rglob("*.py")) if not is_command(f) for hit in calls_print_or_defines_flags(f)
    ]
    assert offenders == []
    # the rule does see what it forbids
    planted = tmp_path / "planted.py"
    planted.write_text("def f(log=print):\n    print('x')\n    flags.DEFINE_string('a', None, '')\n")
    hits = [h.split(" ", 1)[1] for h in calls_print_or_defines_flags(planted)]
    assert hits == ["print(...)", "flags.DEFINE_string"]
