"""The import graph of musilingo_jax, read from the source with `ast` (nothing is imported).

Every `import` / `from ... import` of a musilingo_jax module is an edge, at module level or inside a
function alike: a cycle held together by function-local imports is still a cycle. `from musilingo_jax.p import
x` is an edge to the submodule `musilingo_jax.p.x` when there is one, else to `musilingo_jax.p`; a package's
`__init__.py` is the module named after the package.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "musilingo_jax"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

# Cycles that exist today in files other engineers own, each as the sorted tuple of its modules (without the
# "musilingo_jax." prefix). Remove an entry when its cycle is gone; the test fails for any cycle not listed.
KNOWN_CYCLES: set[tuple[str, ...]] = set()


def _module_name(path: Path) -> str:
  parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def _modules() -> dict[str, Path]:
  return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
  """The musilingo_jax modules that module `name` (file `path`) imports, anywhere in its body."""
  is_package = path.name == "__init__.py"
  out = set()

  def resolve(dotted: str) -> str | None:  # the longest module prefix of a dotted name
    parts = dotted.split(".")
    while parts:
      cand = ".".join(parts)
      if cand in modules:
        return cand
      parts.pop()
    return None

  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
          target = resolve(alias.name)
          if target:
            out.add(target)
    elif isinstance(node, ast.ImportFrom):
      if node.level:  # relative: from the module's package, one level up per extra dot
        base = name.split(".") if is_package else name.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)]
        mod = ".".join(base + ([node.module] if node.module else []))
      else:
        mod = node.module or ""
      if not (mod == PACKAGE or mod.startswith(PACKAGE + ".")):
        continue
      for alias in node.names:
        sub = f"{mod}.{alias.name}"
        target = sub if sub in modules else resolve(mod)
        if target:
          out.add(target)
  out.discard(name)
  return out


def import_graph() -> dict[str, set[str]]:
  modules = _modules()
  return {name: _imports(name, path, modules) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Every strongly connected component with more than one module (Tarjan), each with one cycle through it."""
  index, low, stack, on_stack, sccs = {}, {}, [], set(), []
  counter = [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        sccs.append(sorted(comp))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return sccs


def _a_cycle(graph: dict[str, set[str]], comp: list[str]) -> list[str]:
  """One concrete cycle a -> b -> ... -> a inside the component (for the failure message)."""
  members = set(comp)
  start = comp[0]
  paths = {start: [start]}
  queue = [start]
  while queue:
    v = queue.pop(0)
    for w in sorted(graph[v] & members):
      if w == start:
        return paths[v] + [start]
      if w not in paths:
        paths[w] = paths[v] + [w]
        queue.append(w)
  return comp


def _short(name: str) -> str:
  return name[len(PACKAGE) + 1:] if name.startswith(PACKAGE + ".") else name


def test_checker_sees_local_imports_and_cycles(tmp_path):
  """The checker itself: function-local and `from pkg import submodule` imports are edges; a cycle is found."""
  a = tmp_path / "a.py"
  a.write_text(f"def f():\n  from {PACKAGE} import b\n")
  b = tmp_path / "b.py"
  b.write_text(f"import numpy\nfrom {PACKAGE}.a import f\nfrom {PACKAGE}.c import *\n")
  modules = {f"{PACKAGE}.a": a, f"{PACKAGE}.b": b, f"{PACKAGE}.c": b, PACKAGE: b}
  graph = {name: _imports(name, path, modules) for name, path in list(modules.items())[:2]}
  assert graph == {f"{PACKAGE}.a": {f"{PACKAGE}.b"}, f"{PACKAGE}.b": {f"{PACKAGE}.a", f"{PACKAGE}.c"}}
  assert find_cycles(graph) == [[f"{PACKAGE}.a", f"{PACKAGE}.b"]]
  assert _a_cycle(graph, [f"{PACKAGE}.a", f"{PACKAGE}.b"]) == [f"{PACKAGE}.a", f"{PACKAGE}.b", f"{PACKAGE}.a"]


def test_graph_sees_the_package():
  graph = import_graph()
  assert f"{PACKAGE}.convert.rules" in graph and f"{PACKAGE}.models.llama" in graph
  assert f"{PACKAGE}.convert.rules" in graph[f"{PACKAGE}.models.llama"]


def test_no_import_cycles():
  graph = import_graph()
  found = {tuple(_short(m) for m in comp): comp for comp in find_cycles(graph)}
  new = {k: v for k, v in found.items() if k not in KNOWN_CYCLES}
  assert not new, "import cycles between musilingo_jax modules:\n" + "\n".join(
      "  " + " -> ".join(_short(m) for m in _a_cycle(graph, comp)) for comp in new.values())
  gone = KNOWN_CYCLES - set(found)
  assert not gone, f"KNOWN_CYCLES lists cycles that no longer exist (remove them): {sorted(gone)}"


def test_convert_does_not_import_models_or_tokenizer():
  graph = import_graph()
  banned = (f"{PACKAGE}.models", f"{PACKAGE}.tokenizer")
  bad = {m: sorted(t for t in targets if any(t == b or t.startswith(b + ".") for b in banned))
         for m, targets in graph.items() if m == f"{PACKAGE}.convert" or m.startswith(f"{PACKAGE}.convert.")}
  assert not {m: t for m, t in bad.items() if t}, bad


def test_convert_rules_is_a_leaf():
  graph = import_graph()
  assert graph[f"{PACKAGE}.convert.rules"] == set()


def test_convert_package_init_imports_nothing():
  graph = import_graph()
  assert graph[f"{PACKAGE}.convert"] == set()
