"""The documentation: it builds strictly, its generated pages are current, and every code
sample that talks to the server runs against a real one.

A sample "talks to the server" when it contains the default address `http://127.0.0.1:5000`.
Such a block runs (bash, python or js), with that address replaced by a live test server's
and `r8_...` by its token, unless an HTML comment `<!-- not run: <why> -->` right before it
says why it cannot (a receiver that waits forever, output recorded from a real run, ...).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.conftest import TOKEN, LiveStarter

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
DEFAULT_URL = "http://127.0.0.1:5000"
FENCE = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
SKIP = re.compile(r"<!--\s*not run:\s*(.+?)-->\s*$")
LANGUAGES = {"bash": "bash", "sh": "bash", "python": "python", "js": "js", "javascript": "js"}


class Sample(NamedTuple):
    page: str
    line: int
    language: str
    code: str

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"


def samples() -> Iterator[Sample]:
    for page in [*sorted(DOCS.glob("*.md")), ROOT / "README.md"]:
        text = page.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            language = LANGUAGES.get(match.group(1))
            code = match.group(2)
            if language is None or DEFAULT_URL not in code:
                continue
            before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
            if SKIP.search(before):
                continue
            line = text.count("\n", 0, match.start()) + 1
            yield Sample(page.relative_to(ROOT).as_posix(), line, language, code)


SAMPLES = list(samples())


def test_there_are_samples_in_every_language() -> None:
    assert {s.language for s in SAMPLES} == {"bash", "python", "js"}


def test_mkdocs_build_is_strict_and_clean(tmp_path: Path) -> None:
    mkdocs = Path(sys.executable).parent / "mkdocs"
    done = subprocess.run(
        [str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_generated_configuration_page_is_current() -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    from gen_docs import configuration_page

    assert (DOCS / "configuration.md").read_text() == configuration_page(), (
        "docs/configuration.md is stale: run .venv/bin/python scripts/gen_docs.py"
    )


@pytest.mark.parametrize("sample", SAMPLES, ids=str)
async def test_sample_runs_against_the_server(
    sample: Sample, live_server: LiveStarter, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    server = await live_server()
    code = sample.code.replace(DEFAULT_URL, server.url).replace("r8_...", TOKEN)
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    (work / "data" / "api-token").write_text(TOKEN + "\n")
    env = {**os.environ, "REPLICATE_API_TOKEN": TOKEN, "REPLICATE_BASE_URL": server.url}
    if sample.language == "bash":
        argv = ["bash", "-euo", "pipefail", "-c", code]
    elif sample.language == "python":
        argv = [sys.executable, "-c", code]
    else:
        if shutil.which("node") is None:
            pytest.skip("node is not installed; the JavaScript samples need it")
        node_dir = request.getfixturevalue("node_dir")
        script = node_dir / f"docs-sample-{os.getpid()}-{sample.line}.mjs"
        script.write_text(code)
        request.addfinalizer(lambda: script.unlink(missing_ok=True))
        argv = ["node", str(script)]
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=work,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, f"{sample} failed:\n{out.decode()}\n{err.decode()}"
    assert out.strip(), f"{sample} printed nothing"
