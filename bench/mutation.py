"""Mutation score of the test suite over `methods/`: the share of one-line faults it catches.

Each mutant changes one token on one line of one method file (an arithmetic or comparison
operator swapped, `and`/`or`, `True`/`False`, a dropped `not`, a small integer changed,
min/max or mean/sum exchanged), is written over the file, and the test files that concern
that file run against it (pytest -x, in a fresh process); a failing run kills the mutant.
Mutants are enumerated from the tokens of the code (never inside strings or comments),
then a seeded sample is drawn when there are more than --sample. The file is always
restored (try/finally), so stop it with Ctrl-C, not kill -9.

Equivalent mutants (a change that cannot alter behaviour) count as survivors: the score is
a lower bound. The survivors are listed, for a person to judge.

    python bench/mutation.py --sample 40 --out bench/out/mutation.json
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import random
import subprocess
import sys
import time
import tokenize
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# which fast test files speak for which method file (run in this order, -x)
TESTS: dict[str, list[str]] = {
    "methods/ensemble.py": ["tests/test_ensemble.py", "tests/test_authors_protocol.py::test_renormalising_the_mix_changes_no_ranking",
                            "tests/test_xmore_protocol.py"],
    "methods/xmore.py": ["tests/test_xmore_protocol.py", "tests/test_one_line_faults.py"],
    "methods/retrieval.py": ["tests/test_xmore_protocol.py", "tests/test_one_line_faults.py"],
    "methods/zeroshot.py": ["tests/test_ensemble.py", "tests/test_one_line_faults.py", "tests/test_xmore_protocol.py"],
    "methods/tip_adapter.py": ["tests/test_coder.py", "tests/test_one_line_faults.py"],
    "methods/coder.py": ["tests/test_coder.py", "tests/test_one_line_faults.py"],
}

OPS = {"+": "-", "-": "+", "*": "/", "/": "*", "<": "<=", ">": ">=", "<=": "<", ">=": ">", "==": "!=", "!=": "==",
       "//": "/", "**": "*"}
NAMES = {"and": "or", "or": "and", "True": "False", "False": "True", "min": "max", "max": "min", "mean": "sum",
         "sum": "mean", "argmax": "argmin", "argmin": "argmax"}


@dataclass
class Mutant:
    file: str
    line: int
    col: int
    old: str
    new: str
    source_line: str


def _docstring_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            lines.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))
    return lines


def mutants(path: str) -> list[Mutant]:
    text = (ROOT / path).read_text()
    lines = text.splitlines()
    skip = _docstring_lines(ast.parse(text))
    out = []
    tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    for i, tok in enumerate(tokens):
        if tok.start[0] > len(lines):
            break  # ENDMARKER
        (row, col), line = tok.start, lines[tok.start[0] - 1]
        stripped = line.lstrip()
        if row in skip or stripped.startswith(("import ", "from ", "@", "def ", "class ")) or "Option(" in line:
            continue
        if tok.type == tokenize.OP and tok.string in OPS:
            if tok.string in ("-", "+", "*", "**") and i and tokens[i - 1].string in ("(", ",", "=", "[", "return", ":"):
                continue  # a sign or an unpacking, not a binary operator
            out.append(Mutant(path, row, col, tok.string, OPS[tok.string], line.strip()))
        elif tok.type == tokenize.NAME and tok.string in NAMES:
            out.append(Mutant(path, row, col, tok.string, NAMES[tok.string], line.strip()))
        elif tok.type == tokenize.NAME and tok.string == "not":
            out.append(Mutant(path, row, col, "not ", "", line.strip()))
        elif tok.type == tokenize.NUMBER and tok.string.isdigit() and int(tok.string) < 10:
            out.append(Mutant(path, row, col, tok.string, str((int(tok.string) + 1) % 3), line.strip()))
    return out


def apply(m: Mutant, text: str) -> str:
    lines = text.splitlines(keepends=True)
    line = lines[m.line - 1]
    assert line[m.col : m.col + len(m.old)] == m.old, (m, line)
    lines[m.line - 1] = line[: m.col] + m.new + line[m.col + len(m.old) :]
    return "".join(lines)


def run_tests(tests: list[str], timeout: float) -> tuple[bool, float, str]:
    """(killed, seconds, last line of pytest's output)."""
    t = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-m", "not slow", "-p", "no:cacheprovider",
                            "-p", "no:warnings", *tests], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        last = (p.stdout.strip().splitlines() or [""])[-1]
        return p.returncode != 0, time.perf_counter() - t, last
    except subprocess.TimeoutExpired:
        return True, time.perf_counter() - t, "timeout (a mutant that hangs is caught)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", nargs="*", default=list(TESTS), help="method files to mutate")
    ap.add_argument("--sample", type=int, default=40, help="mutants drawn (seeded) from all enumerated")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "mutation.json")
    args = ap.parse_args()
    everything = [m for f in args.files for m in mutants(f)]
    chosen = everything if len(everything) <= args.sample else random.Random(args.seed).sample(everything, args.sample)
    chosen.sort(key=lambda m: (m.file, m.line, m.col))
    print(f"{len(everything)} one-token mutants in {len(args.files)} files; running {len(chosen)} (seed {args.seed})", flush=True)
    results = []
    for n, m in enumerate(chosen, 1):
        path = ROOT / m.file
        original = path.read_text()
        try:
            path.write_text(apply(m, original))
            killed, secs, last = run_tests(TESTS[m.file], args.timeout)
        finally:
            path.write_text(original)
        results.append({**asdict(m), "killed": killed, "seconds": round(secs, 1), "pytest": last})
        print(f"[{n}/{len(chosen)}] {'killed  ' if killed else 'SURVIVED'} {m.file}:{m.line} {m.old!r}->{m.new!r}  "
              f"{m.source_line[:90]}  ({secs:.0f} s)", flush=True)
    killed = sum(r["killed"] for r in results)
    summary = {"enumerated": len(everything), "run": len(results), "killed": killed,
               "score": killed / len(results) if results else None, "seed": args.seed, "files": args.files,
               "tests": {f: TESTS[f] for f in args.files}, "mutants": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print(f"mutation score {killed}/{len(results)} = {summary['score']:.1%}; survivors:" if results else "no mutants")
    for r in results:
        if not r["killed"]:
            print(f"  {r['file']}:{r['line']} {r['old']!r}->{r['new']!r}  {r['source_line']}")


if __name__ == "__main__":
    main()
