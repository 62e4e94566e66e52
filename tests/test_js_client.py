"""The official JavaScript client (replicate@1.4.0 from npm), run with node, against the server.

`replicate.stream()` fetches `urls.stream` with no Authorization header (the URL is the
capability) and parses it with its own SSE parser; `replicate.run()` creates with
`Prefer: wait`. Both must give the prediction's final output. The npm package lives in
.cache/node (scripts/install_test_deps.sh); without node these tests skip and say why.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

from server import keys
from server.events import SSE_LINE_BREAKS
from tests.conftest import TOKEN, LiveStarter
from tests.test_streams_support import LiveServer, Script, Scripts

JS = Path(__file__).resolve().parent / "js"
SMOL = "huggingfacetb/smollm2-135m-instruct"
INPUT = {"prompt": "Tell me a story about a fox.", "max_tokens": 40, "min_tokens": 20}


async def node_client(
    node_dir: Path, command: str, server: LiveServer, model: str, input: dict[str, Any]
) -> dict[str, Any]:
    """Run tests/js/client.mjs and return what it printed."""
    process = await asyncio.create_subprocess_exec(
        "node",
        str(JS / "client.mjs"),
        str(node_dir),
        command,
        server.url,
        model,
        json.dumps(input),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "REPLICATE_API_TOKEN": TOKEN},
    )
    try:
        async with asyncio.timeout(60):
            stdout, stderr = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, stderr.decode()
    result: dict[str, Any] = json.loads(stdout)
    return result


async def newest_output(server: LiveServer) -> list[str]:
    """The output of the most recent prediction, once it has ended."""
    page = await server.app[keys.STORE].page(limit=1)
    (newest,) = page.predictions
    prediction = await server.app[keys.PREDICTIONS].wait(newest.id, 30)
    assert prediction.status.terminal
    assert isinstance(prediction.output, list)
    return prediction.output


async def test_js_stream_gives_the_final_output(live_server: LiveStarter, node_dir: Path) -> None:
    server = await live_server()
    result = await node_client(node_dir, "stream", server, SMOL, INPUT)
    events = result["events"]
    assert events[-1] == {"event": "done", "data": "{}", "id": events[-1]["id"]}
    assert all(e["id"] for e in events)
    text = "".join(e["data"] for e in events if e["event"] == "output")
    output = await newest_output(server)
    assert len(output) >= 10
    assert text == SSE_LINE_BREAKS.sub("\n", "".join(output))
    # The client fetched the stream URL without a token: the capability is enough.
    assert ("GET", "/v1/streams/", 200) in [(m, p[:12], s) for m, p, s in server.seen]


async def test_js_run_gives_the_final_output(live_server: LiveStarter, node_dir: Path) -> None:
    server = await live_server()
    result = await node_client(node_dir, "run", server, SMOL, INPUT)
    assert result["output"] == await newest_output(server)


async def test_js_stream_of_tricky_text_and_errors(
    live_server: LiveStarter, scripts: Scripts, node_dir: Path
) -> None:
    server = await live_server()
    chunks = ["Hello", " wörld\n", "", "🚀\n\nnext: not a field", " x\ry"]
    scripts["tricky"] = Script(chunks)
    result = await node_client(node_dir, "stream", server, SMOL, {"prompt": "tricky"})
    outputs = [e["data"] for e in result["events"] if e["event"] == "output"]
    assert outputs == [SSE_LINE_BREAKS.sub("\n", c) for c in chunks]
    scripts["boom"] = Script(["partial"], error="the model broke")
    result = await node_client(node_dir, "stream", server, SMOL, {"prompt": "boom"})
    assert json.loads(result["error"]) == {"detail": "the model broke"}
