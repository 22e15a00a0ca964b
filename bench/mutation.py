"""Mutation score of the test suite over `methods/`: the share of one-line faults it catches.

Each mutant changes one token on one line of one method file (an arithmetic or comparison
operator swapped, `and`/`or`, `True`/`False`, a dropped `not`, a small integer changed,
min/max or mean/sum exchanged), and the test files that concern that file (`TESTS`) run
against it (pytest -x, -m "not slow", in a fresh process); a failing run kills the mutant.
Mutants are enumerated from the tokens of the code (never inside strings or comments),
then a seeded sample is drawn when there are more than --sample.

The mutants are written into a private copy of the tree (a temporary folder whose `xm`
package is put first on PYTHONPATH, ahead of the editable install), never over the
working tree: the worktree stays usable while a run goes on, and an interrupted run
leaves nothing mutated. Bytecode is not written there, so no stale .pyc can hide a mutant.

Equivalent mutants (a change that cannot alter behaviour) are listed in `EQUIVALENT` with
the reason a person judged them so; the score is stated both ways: killed / run, and
killed / (run - equivalent).

    python bench/mutation.py --sample 100 --seed 1 --out bench/out/mutation.json
    python bench/mutation.py --rerun bench/out/mutation.json   # its survivors again, against today's tests
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import tokenize
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# which fast test files speak for which method file (run in this order, -x: the most
# focused and quickest first, so a killed mutant costs little)
SURVIVORS = "tests/test_mutation_survivors.py"
THREADS = "tests/test_method_hooks.py::test_thread_safety_is_declared_by_the_method"  # what each method declares
XMORE = [SURVIVORS, THREADS, "tests/test_xmore_protocol.py", "tests/test_one_line_faults.py"]
TESTS: dict[str, list[str]] = {
    "methods/base.py": [SURVIVORS, "tests/test_seams.py", "tests/test_method_hooks.py"],
    "methods/clip.py": [SURVIVORS, "tests/test_method_hooks.py"],
    "methods/coder.py": ["tests/test_coder_faithful.py", SURVIVORS, THREADS, "tests/test_coder.py",
                         "tests/test_one_line_faults.py"],
    "methods/ensemble.py": ["tests/test_ensemble.py", SURVIVORS,
                            "tests/test_authors_protocol.py::test_renormalising_the_mix_changes_no_ranking",
                            "tests/test_xmore_protocol.py"],
    "methods/protocols.py": [SURVIVORS, "tests/test_authors_protocol.py", "tests/test_xmore_protocol.py"],
    "methods/reco.py": [SURVIVORS, THREADS, "tests/test_reco.py"],
    "methods/reco_model.py": [SURVIVORS, "tests/test_reco.py", "tests/test_reco_defaults.py"],
    "methods/registry.py": [SURVIVORS, "tests/test_seams.py", "tests/test_method_hooks.py"],
    "methods/retrieval.py": XMORE,
    "methods/tip_adapter.py": [SURVIVORS, THREADS, "tests/test_coder.py", "tests/test_one_line_faults.py"],
    "methods/xmore.py": XMORE,
    "methods/xmore_diagnostics.py": [SURVIVORS, "tests/test_method_hooks.py"],
    "methods/zeroshot.py": ["tests/test_ensemble.py", *XMORE],
}

# mutants judged equivalent (no input can tell them from the original), with the reason:
# (file, the line's code, column, old token, new token) -> why
EQUIVALENT: dict[tuple[str, str, int, str, str], str] = {
    ("methods/reco.py", 'if int(meta.get("dim", -1)) != self.encoder.dim:', 32, "1", "2"):
        "the default only stands in for a missing width: -1 and -2 both differ from every encoder's width, "
        "and the message prints meta.get('dim') itself",
    ("methods/xmore.py", "votes = softmax(self.caption_logits(ids)) if len(ids) else np.zeros((0, len(self.ctx.classnames)))",
     77, "0", "1"):
        "with no kept id there is no memory row, and the zip over rows, similarities and votes stops at the empty rows",
    ("methods/reco.py", "emb = other.gather(np.where(valid, ids, 0).ravel()).reshape(len(ids), k, -1)", 82, "1", "2"):
        "numpy (1.26, pinned) takes any negative size as the one to infer: reshape(..., -2) is reshape(..., -1)",
    ("methods/reco.py", "self.prompt_ids, self.prompt_sims, self.prompt_texts = ids.reshape(c, m, -1), "
                        "sims.reshape(c, m, -1), texts", 82, "1", "2"):
        "numpy (1.26, pinned) takes any negative size as the one to infer: reshape(..., -2) is reshape(..., -1)",
    ("methods/reco.py", "self.prompt_ids, self.prompt_sims, self.prompt_texts = ids.reshape(c, m, -1), "
                        "sims.reshape(c, m, -1), texts", 106, "1", "2"):
        "numpy (1.26, pinned) takes any negative size as the one to infer: reshape(..., -2) is reshape(..., -1)",
    ("methods/reco_model.py", "a, _ = self.attn(h[:, :1], h, h, key_padding_mask=ignore, need_weights=False)", 79,
     "False", "True"):
        "need_weights only adds the attention weights to what is returned, and they are discarded (`a, _ =`); "
        "the attention output is the same",
    ("methods/reco_model.py", "total /= (1 + valid.sum(axis=1))[:, None]", 24, "sum", "mean"):
        "each row is divided by a positive number and then normalised to unit length on the next line: "
        "the divisor cancels",
    ("methods/tip_adapter.py",
     '"val_feature_seconds": round(_FEATURE_SECONDS.get(vkey, time.perf_counter() - t1), 3)})', 103, "-", "+"):
        "the default of .get is never used: support_features has just recorded the seconds under this very key",
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


def key(m: dict | Mutant) -> tuple[str, str, int, str, str]:
    d = m if isinstance(m, dict) else asdict(m)
    return d["file"], d["source_line"], d["col"], d["old"], d["new"]


def sandbox() -> tuple[Path, dict[str, str]]:
    """A private copy of the tree (tracked and untracked files, nothing ignored) with an `xm`
    package assembled from it on PYTHONPATH, and the environment the tests run in."""
    where = Path(tempfile.mkdtemp(prefix="xm-mutation-"))
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    tree = where / "tree"
    for rel in filter(None, listed):
        if (ROOT / rel).is_file():
            (tree / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, tree / rel)
    # the package-dir mapping of pyproject.toml, rebuilt as links: xm = api/, xm.methods = methods/, ...
    import tomllib

    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    pkg = where / "pkg" / "xm"
    pkg.mkdir(parents=True)
    for entry in (tree / mapping["xm"]).iterdir():
        (pkg / entry.name).symlink_to(entry)
    for name, folder in mapping.items():
        if name != "xm":
            (pkg / name.split(".", 1)[1]).symlink_to(tree / folder)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(where / "pkg"), os.environ.get("PYTHONPATH")])),
           "PYTHONDONTWRITEBYTECODE": "1"}
    return where, env


def run_tests(tests: list[str], cwd: Path, env: dict[str, str], timeout: float) -> tuple[bool, float, str]:
    """(killed, seconds, last line of pytest's output)."""
    t = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-m", "not slow", "-p", "no:cacheprovider",
                            "-p", "no:warnings", *tests], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        last = (p.stdout.strip().splitlines() or [""])[-1]
        return p.returncode != 0, time.perf_counter() - t, last
    except subprocess.TimeoutExpired:
        return True, time.perf_counter() - t, "timeout (a mutant that hangs is caught)"


def summarise(results: list[dict], args: argparse.Namespace, enumerated: int, files: list[str]) -> dict:
    killed = sum(r["killed"] for r in results)
    equivalent = sum(1 for r in results if not r["killed"] and r.get("equivalent"))
    real = len(results) - equivalent
    return {"enumerated": enumerated, "run": len(results), "killed": killed, "equivalent": equivalent,
            "score": killed / len(results) if results else None,
            "score_non_equivalent": killed / real if real else None,
            "seed": args.seed, "sample": args.sample, "rerun": str(args.rerun) if args.rerun else None,
            "machine": f"{os.cpu_count()} cores, no GPU", "files": files,
            "tests": {f: TESTS[f] for f in files}, "mutants": results}


def merged(earlier: list[dict], rerun: list[dict]) -> list[dict]:
    """The earlier run's mutants, each survivor replaced by its re-run (killed ones stay killed:
    tests were only added), equivalence judged by today's `EQUIVALENT`."""
    if not earlier:
        return rerun
    again = {key(r): r for r in rerun}
    out = []
    for r in earlier:
        r = {**again.get(key(r), r)}
        r.pop("equivalent", None)
        if not r["killed"] and key(r) in EQUIVALENT:
            r["equivalent"] = EQUIVALENT[key(r)]
        out.append(r)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", nargs="*", default=list(TESTS), help="method files to mutate")
    ap.add_argument("--sample", type=int, default=40, help="mutants drawn (seeded) from all enumerated")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rerun", type=Path, help="run only the survivors (not judged equivalent) of this earlier result file")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "mutation.json")
    args = ap.parse_args()
    unknown = sorted(set(args.files) - set(TESTS))
    if unknown:
        sys.exit(f"--files: {', '.join(unknown)} not in TESTS (which tests speak for them?)")
    everything = [m for f in args.files for m in mutants(f)]
    earlier: list[dict] = []
    if args.rerun:
        before = json.loads(args.rerun.read_text())
        earlier, args.seed, args.sample = before["mutants"], before["seed"], before["sample"]
        wanted = {key(r) for r in earlier if not r["killed"] and key(r) not in EQUIVALENT}  # those judged stay as they are
        chosen = sorted((m for m in everything if key(m) in wanted), key=lambda m: (m.file, m.line, m.col))
        print(f"{len(wanted)} survivors in {args.rerun}; {len(chosen)} still enumerated (the others' lines changed)")
    else:
        chosen = everything if len(everything) <= args.sample else random.Random(args.seed).sample(everything, args.sample)
    # (a sample stays in its drawn order: a run stopped early is still a random sample)
    print(f"{len(everything)} one-token mutants in {len(args.files)} files; running {len(chosen)} (seed {args.seed})", flush=True)
    where, env = sandbox()
    tree = where / "tree"
    results: list[dict] = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    try:
        for n, m in enumerate(chosen, 1):
            path = tree / m.file
            original = path.read_text()
            try:
                path.write_text(apply(m, original))
                killed, secs, last = run_tests(TESTS[m.file], tree, env, args.timeout)
            finally:
                path.write_text(original)
            results.append({**asdict(m), "killed": killed, "seconds": round(secs, 1), "pytest": last,
                            **({"equivalent": EQUIVALENT[key(m)]} if key(m) in EQUIVALENT else {})})
            print(f"[{n}/{len(chosen)}] {'killed  ' if killed else 'SURVIVED'} {m.file}:{m.line} {m.old!r}->{m.new!r}  "
                  f"{m.source_line[:90]}  ({secs:.0f} s)", flush=True)
            args.out.write_text(json.dumps(summarise(merged(earlier, results), args, len(everything), args.files), indent=2))
    finally:
        shutil.rmtree(where, ignore_errors=True)
    results = merged(earlier, results)
    summary = summarise(results, args, len(everything), args.files)
    if not results:
        print("no mutants")
        return
    real = summary["run"] - summary["equivalent"]
    print(f"mutation score {summary['killed']}/{summary['run']} = {summary['score']:.1%} of all run; "
          f"{summary['killed']}/{real} = {summary['score_non_equivalent']:.1%} of the non-equivalent; survivors:")
    for r in results:
        if not r["killed"]:
            why = f"  [equivalent: {r['equivalent']}]" if r.get("equivalent") else ""
            print(f"  {r['file']}:{r['line']} {r['old']!r}->{r['new']!r}  {r['source_line']}{why}")


if __name__ == "__main__":
    main()
