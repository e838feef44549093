"""How long a command leaves its terminal without a line: stamp each line of stdin as it arrives.

    PYTHONUNBUFFERED=1 make run 2>&1 | python3 bench/stamp_lines.py run.stamped

Writes each line to the file given, prefixed with the seconds since the start and since the line before, and
ends it (and stdout) with the line count, the total time and the longest silence with the line that ended it.
Standard library only, so it runs before `make install` has made the environment.
"""

from __future__ import annotations

import sys
import time


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: COMMAND 2>&1 | python3 bench/stamp_lines.py OUT_FILE")
    start = last = time.time()
    lines, worst, worst_line = 0, 0.0, ""
    with open(sys.argv[1], "w", encoding="utf-8") as out:
        for line in sys.stdin:
            now = time.time()
            if now - last > worst:
                worst, worst_line = now - last, line.strip()[:150]
            out.write(f"{now - start:8.1f} {now - last:6.1f} {line}")
            out.flush()
            last, lines = now, lines + 1
        summary = (f"# {lines} lines in {time.time() - start:.1f} s; longest silence {worst:.1f} s, "
                   f"ended by: {worst_line}")
        out.write(summary + "\n")
    print(summary)


if __name__ == "__main__":
    main()
