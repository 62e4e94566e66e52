// The official JavaScript client (replicate@1.4.0), unchanged, against a replicant server.
//
//   node client.mjs NODE_DIR stream|run BASE_URL MODEL INPUT_JSON
//
// NODE_DIR holds node_modules (scripts/install_test_deps.sh fills .cache/node). The token
// comes from REPLICATE_API_TOKEN, as the client reads it. Prints one JSON line:
// {"events": [...]} for stream, {"output": ...} for run, or {"error": "..."} if it threw.
import { createRequire } from "node:module";
import path from "node:path";

const [nodeDir, command, baseUrl, model, inputJson] = process.argv.slice(2);
const require = createRequire(path.join(path.resolve(nodeDir), "package.json"));
const Replicate = require("replicate");

// The JS client's base URL includes /v1 (the Python client's does not).
const replicate = new Replicate({ baseUrl: `${baseUrl}/v1` });
const input = JSON.parse(inputJson);

try {
  if (command === "stream") {
    const events = [];
    for await (const event of replicate.stream(model, { input })) {
      events.push({ event: event.event, data: event.data, id: event.id });
    }
    console.log(JSON.stringify({ events }));
  } else if (command === "run") {
    const output = await replicate.run(model, { input });
    console.log(JSON.stringify({ output }));
  } else {
    throw new Error(`unknown command ${command}`);
  }
} catch (err) {
  console.log(JSON.stringify({ error: String(err && err.message ? err.message : err) }));
}
