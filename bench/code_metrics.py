"""Size of the code: files, the longest functions, the most parameters, qavtp imports inside functions.

python bench/code_metrics.py [REPO_ROOT]   (default: this checkout; e.g. a worktree of an older commit)
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def measure(root: Path) -> None:
    files = [p for d in ("qavtp", "calibrate", "export") for p in sorted((root / d).rglob("*.py"))]
    # the links qavtp/calibrate, qavtp/export and qavtp/cli.py would count those files twice
    files = [f for f in files if not any(q.is_symlink() for q in (f, *f.parents))] + [root / "cli.py"]
    funcs, inner, sizes = [], 0, []
    for f in files:
        src = f.read_text()
        sizes.append((len(src.splitlines()), str(f.relative_to(root))))
        for n in ast.walk(ast.parse(src)):
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef):
                a = n.args
                funcs.append(
                    (n.end_lineno - n.lineno + 1, len(a.args) + len(a.kwonlyargs) + len(a.posonlyargs), n.name)
                )
                inner += sum(
                    isinstance(m, ast.Import | ast.ImportFrom) and (getattr(m, "module", "") or "").startswith("qavtp")
                    for m in ast.walk(n)
                )
    print(f"files {len(files)}, lines {sum(s for s, _ in sizes)}")
    print("largest files:", sorted(sizes, reverse=True)[:6])
    print("longest functions (lines, parameters, name):", sorted(funcs, reverse=True)[:6])
    print("most parameters:", sorted(funcs, key=lambda r: -r[1])[:5])
    print("qavtp imports inside functions:", inner)


if __name__ == "__main__":
    measure(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent)
