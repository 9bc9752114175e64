"""Fail when a pytest JUnit report shows skipped tests under the given folders (CI's "0 skipped" check).

    python scripts/ci_check_skips.py REPORT.xml tests/comfyui tests/browser

CI runs with ComfyUI, the web UI packages and chromium installed, so nothing in those folders may
skip; a skip there means CI stopped testing what it claims to. Prints each skipped test with its
reason and exits 1; also exits 1 when no test from a folder ran at all.
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET


def _folder_of(classname: str, folders: list[str]) -> str | None:
    # pytest writes classname as the dotted module path (plus the class), e.g. tests.comfyui.test_nodes
    for folder in folders:
        prefix = folder.strip("/").replace("/", ".") + "."
        if classname.startswith(prefix):
            return folder
    return None


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    report, folders = argv[0], argv[1:]
    ran = dict.fromkeys(folders, 0)
    skipped = []
    for case in ET.parse(report).getroot().iter("testcase"):
        folder = _folder_of(case.get("classname", ""), folders)
        if folder is None:
            continue
        skip = case.find("skipped")
        if skip is not None:
            skipped.append(f"{case.get('classname')}::{case.get('name')}: {skip.get('message', '')}")
        else:
            ran[folder] += 1
    for line in skipped:
        print(f"skipped in CI: {line}", file=sys.stderr)
    empty = [f for f, n in ran.items() if n == 0]
    for folder in empty:
        print(f"no test from {folder} ran", file=sys.stderr)
    if skipped or empty:
        return 1
    print(f"no skips: {', '.join(f'{f} {n} ran' for f, n in ran.items())}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
