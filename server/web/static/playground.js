// The playground's script: progressive enhancement of server-rendered pages.
//
// Without it every page still works (forms post and redirect; a file input then takes a
// URL). With it: sliders and number boxes stay in step, file pickers upload the file through
// the files API and fill in its URL, the form runs the model in place, and a running
// prediction streams its output through its `urls.stream` EventSource.
//
// Text from the server or the model is only ever inserted as text (textContent, append of
// strings). The one HTML insertion is the prediction panel, rendered and escaped by the
// server (GET /web/api/predictions/{id}/panel).

const HEADERS = { "X-Replicant-Web": "1" };
const POLL_MS = 1000;

function api(url, options = {}) {
  return fetch(url, {
    credentials: "same-origin",
    ...options,
    headers: { ...HEADERS, ...(options.headers || {}) },
  });
}

async function problemText(response) {
  try {
    const body = await response.json();
    return { detail: body.detail || response.statusText, fields: body.invalid_fields || [] };
  } catch {
    return { detail: `${response.status} ${response.statusText}`, fields: [] };
  }
}

// -- sliders -------------------------------------------------------------------------------

function syncSliders(root) {
  for (const range of root.querySelectorAll("input[type=range][data-sync]")) {
    const box = document.getElementById(range.dataset.sync);
    if (!box) continue;
    range.addEventListener("input", () => {
      box.value = range.value;
      box.dispatchEvent(new Event("input", { bubbles: true }));
    });
    box.addEventListener("input", () => {
      if (box.value !== "" && !Number.isNaN(Number(box.value))) range.value = box.value;
    });
  }
}

// -- file pickers --------------------------------------------------------------------------

function filePickers(root) {
  for (const picker of root.querySelectorAll("input[type=file][data-upload-for]")) {
    const target = document.getElementById(picker.dataset.uploadFor);
    const status = document.getElementById(`${picker.dataset.uploadFor}-upload`);
    picker.addEventListener("change", async () => {
      const file = picker.files && picker.files[0];
      if (!file || !target) return;
      status.textContent = `Uploading ${file.name}…`;
      const body = new FormData();
      body.append("content", file, file.name);
      try {
        const response = await api("/web/api/files", { method: "POST", body });
        if (response.ok) {
          const uploaded = await response.json();
          target.value = uploaded.urls.get;
          status.textContent = `Uploaded ${file.name}.`;
          return;
        }
        status.textContent = `Upload failed: ${(await problemText(response)).detail}`;
      } catch (error) {
        status.textContent = `Upload failed: ${error}`;
      }
    });
  }
}

// -- the prediction panel ------------------------------------------------------------------

// Live behaviour of one panel; `close()` stops its stream and polling.
class LivePanel {
  // `stream: false` polls even when the panel names a stream (it failed before).
  constructor(panel, { stream = true } = {}) {
    this.panel = panel;
    this.id = panel.dataset.id;
    this.source = null;
    this.timer = null;
    this.closed = false;
    panel.querySelector(".cancel-form")?.addEventListener("submit", (event) => {
      event.preventDefault();
      this.cancel();
    });
    if (panel.dataset.terminal === "true") return;
    if (panel.dataset.stream && stream) this.stream(panel.dataset.stream);
    else this.poll();
  }

  close() {
    this.closed = true;
    this.source?.close();
    clearTimeout(this.timer);
  }

  stream(url) {
    const output = this.panel.querySelector("#prediction-output");
    const logs = this.panel.querySelector("#prediction-logs");
    const status = this.panel.querySelector("#prediction-status");
    // The stream replays everything from the start: show it from the stream alone.
    const text = document.createElement("pre");
    text.className = "output-text";
    output.replaceChildren(text);
    logs.textContent = "";
    const source = new EventSource(url);
    this.source = source;
    source.addEventListener("output", (event) => {
      if (status.textContent === "starting") {
        status.textContent = "processing";
        status.className = "status status-processing";
      }
      text.append(event.data);
    });
    source.addEventListener("logs", (event) => {
      logs.append(event.data);
    });
    source.addEventListener("error", (event) => {
      if (event instanceof MessageEvent && event.data) {
        const box = this.panel.querySelector("#prediction-error");
        try {
          box.textContent = JSON.parse(event.data).detail || event.data;
        } catch {
          box.textContent = event.data;
        }
        box.hidden = false;
      } else if (source.readyState === EventSource.CLOSED && !this.closed) {
        // The stream is gone (expired, or the server restarted): ask for the state instead.
        this.poll();
      }
    });
    source.addEventListener("done", () => {
      source.close();
      output.setAttribute("aria-busy", "false");
      this.refresh();
    });
  }

  poll() {
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.refresh(), POLL_MS);
  }

  async refresh() {
    if (this.closed) return;
    let response;
    try {
      response = await api(`/web/api/predictions/${encodeURIComponent(this.id)}/panel`);
    } catch {
      this.poll();
      return;
    }
    if (!response.ok) {
      const box = this.panel.querySelector("#prediction-error");
      box.textContent = (await problemText(response)).detail;
      box.hidden = false;
      return;
    }
    const html = await response.text();
    if (this.closed) return;
    const template = document.createElement("template");
    template.innerHTML = html;
    const next = template.content.firstElementChild;
    const hadFocus = this.panel.contains(document.activeElement);
    this.close();
    this.panel.replaceWith(next);
    // Still running here means the stream is not there: the new panel polls.
    current = new LivePanel(next, { stream: false });
    if (hadFocus) next.querySelector("h2").focus();
  }

  async cancel() {
    const button = this.panel.querySelector("[data-action=cancel]");
    button.disabled = true;
    button.textContent = "Cancelling…";
    const response = await api(`/web/api/predictions/${encodeURIComponent(this.id)}/cancel`, {
      method: "POST",
    });
    if (!response.ok) {
      button.disabled = false;
      button.textContent = "Cancel";
      const box = this.panel.querySelector("#prediction-error");
      box.textContent = (await problemText(response)).detail;
      box.hidden = false;
      return;
    }
    this.source?.close();
    this.refresh();
  }
}

let current = null;

// -- the model form ------------------------------------------------------------------------

function clearErrors(form) {
  for (const error of form.querySelectorAll(".field-error")) {
    error.textContent = "";
    error.hidden = true;
  }
  for (const control of form.querySelectorAll("[aria-invalid]")) {
    control.removeAttribute("aria-invalid");
  }
  const summary = form.querySelector("#form-errors");
  summary.replaceChildren();
  summary.hidden = true;
}

function showErrors(form, detail, fields) {
  const summary = form.querySelector("#form-errors");
  let first = null;
  const general = [];
  for (const { field, message } of fields) {
    const control = form.querySelector(`[name="${CSS.escape(field)}"]`);
    const error = document.getElementById(`field-${field}-error`);
    if (!control || !error) {
      general.push(`${field}: ${message}`);
      continue;
    }
    error.textContent = message;
    error.hidden = false;
    control.setAttribute("aria-invalid", "true");
    first ??= control;
  }
  if (!fields.length) general.push(detail);
  if (general.length) {
    summary.replaceChildren(
      ...general.map((line) => {
        const p = document.createElement("p");
        p.textContent = line;
        return p;
      }),
    );
    summary.hidden = false;
    summary.focus();
  } else {
    first?.focus();
  }
}

function modelForm(form) {
  const result = document.getElementById("result");
  const button = form.querySelector("#run-button");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors(form);
    button.disabled = true;
    button.textContent = "Running…";
    try {
      const response = await api(form.dataset.api, { method: "POST", body: new FormData(form) });
      if (!response.ok) {
        const problem = await problemText(response);
        if (response.status === 401) problem.detail += " Reload the page to sign in.";
        showErrors(form, problem.detail, problem.fields);
        return;
      }
      const prediction = await response.json();
      const panel = await api(`/web/api/predictions/${encodeURIComponent(prediction.id)}/panel`);
      if (!panel.ok) {
        showErrors(form, (await problemText(panel)).detail, []);
        return;
      }
      const template = document.createElement("template");
      template.innerHTML = await panel.text();
      const next = template.content.firstElementChild;
      current?.close();
      result.replaceChildren(next);
      current = new LivePanel(next);
    } catch (error) {
      showErrors(form, `The request failed: ${error}`, []);
    } finally {
      button.disabled = false;
      button.textContent = "Run";
    }
  });
  // Ctrl+Enter (or Cmd+Enter) in any field runs the model.
  form.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      form.requestSubmit();
    }
  });
  // After a reset, put the sliders back next to their boxes.
  form.addEventListener("reset", () => {
    setTimeout(() => {
      clearErrors(form);
      for (const range of form.querySelectorAll("input[type=range][data-sync]")) {
        const box = document.getElementById(range.dataset.sync);
        if (box && box.value !== "") range.value = box.value;
      }
    });
  });
}

// -- start ---------------------------------------------------------------------------------

syncSliders(document);
filePickers(document);
const form = document.getElementById("prediction-form");
if (form) modelForm(form);
const panel = document.getElementById("prediction");
if (panel) current = new LivePanel(panel);
