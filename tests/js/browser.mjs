// Opens a page in headless Chromium (Debian's, driven by playwright-core; no Playwright
// browser download) and prints the page's `window.state` once `state.finished` is true.
//
//   node browser.mjs NODE_DIR PAGE_URL USER_DATA_DIR TIMEOUT_MS
//
// Prints one JSON line: {"state": {...}, "console": [...]}. Exits non-zero on timeout.
import { createRequire } from "node:module";
import path from "node:path";

const [nodeDir, pageUrl, userDataDir, timeoutMs] = process.argv.slice(2);
const require = createRequire(path.join(path.resolve(nodeDir), "package.json"));
const { chromium } = require("playwright-core");

// A fresh profile per run; playwright adds --headless itself.
const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath: process.env.CHROMIUM_PATH || "/usr/bin/chromium",
  headless: true,
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
  ],
});
const messages = [];
try {
  const page = context.pages()[0] ?? (await context.newPage());
  page.on("console", (message) => messages.push(`${message.type()}: ${message.text()}`));
  page.on("pageerror", (error) => messages.push(`pageerror: ${error}`));
  await page.goto(pageUrl);
  await page.waitForFunction(() => window.state && window.state.finished === true, null, {
    timeout: Number(timeoutMs),
  });
  const state = await page.evaluate(() => window.state);
  console.log(JSON.stringify({ state, console: messages }));
} catch (error) {
  console.log(JSON.stringify({ error: String(error), console: messages }));
  process.exitCode = 1;
} finally {
  await context.close();
}
