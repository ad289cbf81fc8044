"""The score table of the last ``make mutation`` run: per module, killed of checked mutants.

Reads ``mutmut results --all true`` (run from the repository root, after ``mutmut run``) and
prints, per module, how many mutants the tests killed, how many survived (each listed, to be
judged: a missing test, or an equivalent mutant) and the score. Not a test: pytest does not
collect this file.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

LINE = re.compile(r"^\s*(?P<name>[\w.]+?)\.(?P<func>x[^.]*?)__mutmut_(?P<n>\d+): (?P<status>.+)$")


def main(patterns: list[str]) -> int:
    mutmut = Path(sys.executable).with_name("mutmut")
    out = subprocess.run(
        [str(mutmut), "results", "--all", "true"], capture_output=True, text=True, check=True
    ).stdout
    by_module: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for line in out.splitlines():
        m = LINE.match(line)
        if not m:
            continue
        full = f"{m['name']}.{m['func']}__mutmut_{m['n']}"
        if patterns and not any(re.fullmatch(p.replace(".", r"\.").replace("*", ".*"), full)
                                for p in patterns):  # fmt: skip
            continue
        by_module[m["name"]][m["status"].strip()].append(full)
    print(f"{'module':42} {'killed':>7} {'survived':>9} {'other':>6} {'score':>7}")
    for module, states in sorted(by_module.items()):
        killed = len(states.get("killed", []))
        survived = len(states.get("survived", []))
        other = sum(len(v) for k, v in states.items() if k not in ("killed", "survived"))
        score = killed / max(1, killed + survived)
        print(f"{module:42} {killed:7} {survived:9} {other:6} {score:7.1%}")
    for _, states in sorted(by_module.items()):
        for status, names in sorted(states.items()):
            if status != "killed":
                for name in names:
                    print(f"  {status}: {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
