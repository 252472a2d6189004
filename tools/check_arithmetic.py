"""How often the equations a model writes are right: a diagnostic for arithmetic tasks (the built-in task, GSM8K).

Reads evaluation JSONL files (``python -m sstoken_pl evaluate``, or ``eval_after.jsonl`` of a ``fit`` run) and prints,
per file: the problems, the exact match, the share of outputs with an answer line (``####``), and every binary
equation ``a op b = c`` written in the outputs (``op`` one of ``+ - * / x ×``) with the share whose result ``c`` is
right. A method that drops the computed digits of the training solutions shows it here: the model writes the
equations of the solution, with wrong results.

    python tools/check_arithmetic.py runs/a/eval_validation.jsonl runs/b/eval_validation.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import operator
import re
import sys

OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "x": operator.mul, "×": operator.mul, "/": operator.truediv}
NUMBER = r"(-?\d+(?:\.\d+)?)"
# Not the tail of a longer expression ("2 x 4 x 5 = 40" is not "4 x 5 = 40"); no percentages.
EQUATION = re.compile(r"(?<![\d.$])(?<![-+*/x×]\s)(?<![-+*/x×])\$?" + NUMBER + r"\s*([-+*/x×])\s*\$?" + NUMBER
                      + r"\s*=\s*\$?" + NUMBER)


def equations(text: str) -> list[tuple[float, str, float, float]]:
    """The binary equations ``a op b = c`` of a text, in order (commas in numbers removed, ``$`` ignored)."""
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)
    return [(float(a), op, float(b), float(c)) for a, op, b, c in EQUATION.findall(text)]


def is_right(a: float, op: str, b: float, c: float) -> bool:
    if op == "/" and b == 0:
        return False
    return math.isclose(OPS[op](a, b), c, rel_tol=1e-6, abs_tol=1e-6)


def summarize(rows: list[dict]) -> dict:
    found = [eq for row in rows for eq in equations(row["output"])]
    right = sum(is_right(*eq) for eq in found)
    return {
        "problems": len(rows),
        "exact_match": sum(bool(r["correct"]) for r in rows) / len(rows) if rows else None,
        "answer_line": sum("####" in r["output"] for r in rows) / len(rows) if rows else None,
        "equations": len(found),
        "equations_right": right / len(found) if found else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/check_arithmetic.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="evaluation JSONL files (one JSON object per line, with 'output' and 'correct')")
    args = parser.parse_args(argv)
    print("| file | problems | exact match | with an answer line | equations written | equations right |")
    print("|---|---|---|---|---|---|")
    for path in args.files:
        rows = []
        try:
            with open(path, encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                            rows[-1]["output"], rows[-1]["correct"]
                        except (json.JSONDecodeError, KeyError, TypeError) as e:
                            print(f"error: {path} line {number}: not an evaluation row ({e})", file=sys.stderr)
                            return 2
        except OSError as e:
            print(f"error: {path}: {e.strerror}", file=sys.stderr)
            return 2
        s = summarize(rows)
        pct = lambda x: "—" if x is None else f"{100 * x:.1f}%"
        print(f"| {path} | {s['problems']} | {pct(s['exact_match'])} | {pct(s['answer_line'])} | {s['equations']} | "
              f"{pct(s['equations_right'])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
