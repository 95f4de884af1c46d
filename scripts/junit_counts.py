#!/usr/bin/env python3
"""Print one line of test counts from a pytest JUnit XML file: `N passed, N failed, N errors, N skipped (of N)`.

Used by scripts/gpu_test.sh, whose callers keep only its `[gpu_test]` lines; a missing or unreadable file says so.
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET


def counts(path: str) -> str:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as e:
        return f"no counts ({type(e).__name__}: {e})"
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    passed = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    return (f"{passed} passed, {total['failures']} failed, {total['errors']} errors, {total['skipped']} skipped "
            f"(of {total['tests']})")


if __name__ == "__main__":
    print(counts(sys.argv[1]))
