"""Export a saved genmod pipeline as a self-contained diffusers folder.

diffusers loads custom code that ships inside a pipeline folder when asked with
``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)``: ``model_index.json`` names
``["file_stem", "Class"]`` and the file lies at the folder root (the pipeline) or in the component's
subfolder. This module copies the source of every genmod module a component needs (found by following
its ``genmod.*`` imports) next to it, flattened to one level and
with the imports rewritten to relative ones, so people without genmod installed can load the folder.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import os
import shutil

from genmod.core.files import MANIFEST, CorruptFileError, atomic_dir, verify_manifest

OWN_PACKAGES = ("genmod",)


def _flat_name(module: str) -> str:
    return "gm_" + module.replace(".", "__")


def _module_file(module: str) -> str:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ValueError(f"cannot find the source of module {module}")
    return spec.origin


def _is_package(module: str) -> bool:
    return _module_file(module).endswith("__init__.py")


def _absolute(module: str, node: ast.ImportFrom) -> str | None:
    """The absolute module an ImportFrom names (resolving relative imports against ``module``)."""
    if node.level == 0:
        return node.module
    base = module.split(".") if _is_package(module) else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _own_imports(module: str) -> tuple[ast.Module, list[tuple[ast.AST, list[str]]]]:
    """Parse a module; list its import nodes that target our own packages with the modules they need."""
    source = open(_module_file(module)).read()
    tree = ast.parse(source)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = _absolute(module, node)
            if target and target.split(".")[0] in OWN_PACKAGES:
                needed = [target]
                for alias in node.names:  # "from genmod.nn import attention" imports a submodule
                    candidate = f"{target}.{alias.name}"
                    if importlib.util.find_spec(candidate.split(".")[0]) and _spec_exists(candidate):
                        needed.append(candidate)
                found.append((node, needed))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in OWN_PACKAGES:
                    raise ValueError(f"{module}: 'import {alias.name}' cannot be exported; use 'from ... import ...'")
    return tree, found


def _spec_exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def collect_modules(root_module: str) -> list[str]:
    """``root_module`` and every own-package module it imports, transitively."""
    seen, stack = [], [root_module]
    while stack:
        module = stack.pop()
        if module in seen:
            continue
        seen.append(module)
        _, imports = _own_imports(module)
        for _, needed in imports:
            stack.extend(m for m in needed if m not in seen)
    return seen


def _rewrite(module: str) -> str:
    """The module's source with own-package imports turned into relative flat imports."""
    tree, imports = _own_imports(module)
    lines = open(_module_file(module)).read().splitlines(keepends=True)
    replacements = []
    for node, needed in imports:
        target = needed[0]
        names = []
        extra = []
        for alias in node.names:
            submodule = f"{target}.{alias.name}"
            if submodule in needed:  # importing a submodule object
                extra.append(f"from . import {_flat_name(submodule)} as {alias.asname or alias.name}\n")
            else:
                names.append(alias.name + (f" as {alias.asname}" if alias.asname else ""))
        text = (f"from .{_flat_name(target)} import {', '.join(names)}\n" if names else "") + "".join(extra)
        indent = lines[node.lineno - 1][: len(lines[node.lineno - 1]) - len(lines[node.lineno - 1].lstrip())]
        text = "".join(indent + line for line in text.splitlines(keepends=True))
        replacements.append((node.lineno - 1, node.end_lineno, text))
    for start, end, text in sorted(replacements, reverse=True):
        lines[start:end] = [text]
    return "".join(lines)


def _write_modules(root_module: str, folder: str) -> str:
    os.makedirs(folder, exist_ok=True)
    modules = collect_modules(root_module)
    for module in modules:
        source = _rewrite(module)
        if module == root_module:
            # diffusers copies only the entry file's direct relative imports into its module cache,
            # so the entry file names every flattened module it needs, directly.
            source += "\n# modules this file needs indirectly (diffusers copies direct relative imports only)\n"
            source += "".join(f"from .{_flat_name(m)} import __name__ as _{_flat_name(m)}  # noqa: F401\n"
                              for m in modules[1:])
        with open(os.path.join(folder, _flat_name(module) + ".py"), "w") as f:
            f.write(source)
    return _flat_name(root_module)


def export_pipeline(pipeline_dir: str, out_dir: str) -> str:
    """Copy ``pipeline_dir`` to ``out_dir`` as a self-contained (trust_remote_code) diffusers folder, with a
    ``manifest.json`` (sizes and sha256 of its files; ``genmod verify OUT`` checks it)."""
    from genmod.pipelines.base import check_pipeline_folder

    index_path = os.path.join(pipeline_dir, "model_index.json")
    if not os.path.isfile(index_path):
        raise FileNotFoundError(f"{pipeline_dir}: not a pipeline folder (no model_index.json)")
    check_pipeline_folder(pipeline_dir)  # a broken folder is refused, not exported
    problems = verify_manifest(pipeline_dir) if os.path.isfile(os.path.join(pipeline_dir, MANIFEST)) else []
    if problems:
        raise CorruptFileError(f"{pipeline_dir}: does not match its {MANIFEST}: {problems[0]}")
    with atomic_dir(out_dir, manifest=True) as staging:  # a cut export leaves no out_dir and no staging folder
        shutil.rmtree(staging)
        shutil.copytree(pipeline_dir, staging)
        _write_export(index_path, pipeline_dir, staging)
    return out_dir


def _write_export(index_path: str, pipeline_dir: str, out_dir: str) -> None:
    """The flattened modules and rewritten ``model_index.json`` of the copy in ``out_dir``."""
    from genmod.pipelines.base import _import_named_components

    index = _import_named_components(pipeline_dir)
    import genmod.pipelines as registry

    pipeline_cls = getattr(registry, index["_class_name"])
    index["_class_name"] = [_write_modules(pipeline_cls.__module__, out_dir), pipeline_cls.__name__]
    for name, value in index.items():
        if isinstance(value, list) and value and isinstance(value[0], str) and value[0].split(".")[0] in OWN_PACKAGES:
            index[name] = [_write_modules(value[0], os.path.join(out_dir, name)), value[1]]
    with open(os.path.join(out_dir, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="genmod export-diffusers", description=__doc__.splitlines()[0])
    p.add_argument("pipeline_dir")
    p.add_argument("out_dir")
    args = p.parse_args(argv)
    export_pipeline(args.pipeline_dir, args.out_dir)
    print(f"wrote {args.out_dir}; load it with DiffusionPipeline.from_pretrained({args.out_dir!r}, trust_remote_code=True)")
    return 0
