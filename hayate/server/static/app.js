// The hayate playground: a chat with the served model, streamed from /v1/chat/completions.
// Model output only ever reaches the page as textContent, never as HTML.
import { call, errorMessage, keyRequired, onKeyNeeded, storedKey, storeKey, streamEvents } from "./api.js";
import { Attachments, requestFields, systemPrompt, thumbnail, watchToolChoice } from "./panes.js";
import { answerStats, renderStats, startLiveStrip } from "./stats.js";

const $ = (id) => document.getElementById(id);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const page = {
  config: null,          // GET /playground/config
  history: [],           // the conversation as the API takes it, without the system prompt
  epoch: 0,              // bumped by Reset, so an answer still finishing stays out of the new history
  controller: null,      // the AbortController of the answer streaming now
  attachments: null,     // images for the next message (vision models only)
  keyPrompt: null,       // the key dialog's pending answer
  keyRequired: false,
};

function addMessage(role, text = "") {
  const item = document.createElement("li");
  item.className = `message ${role}`;
  const label = document.createElement("span");
  label.className = "role";
  label.textContent = role;
  const content = document.createElement("div");
  content.className = "content";
  content.textContent = text;
  item.append(label, content);
  $("messages").append(item);
  item.scrollIntoView({ block: "end" });
  return item;
}

function note(text) {
  $("composer-note").textContent = text;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

// ---- the API key ------------------------------------------------------------------------
function askForKey(reason) {
  if (page.keyPrompt) return page.keyPrompt;   // one dialog, whoever asks
  const dialog = $("key-dialog");
  $("key-reason").textContent = reason;
  $("key-input").value = "";
  page.keyPrompt = new Promise((resolve) => {
    const finish = (key) => {
      page.keyPrompt = null;
      if (dialog.open) dialog.close();
      resolve(key);
    };
    $("key-form").onsubmit = (event) => { event.preventDefault(); finish($("key-input").value.trim() || null); };
    $("key-cancel").onclick = () => finish(null);
    dialog.oncancel = (event) => { event.preventDefault(); finish(null); };
    dialog.showModal();
    $("key-input").focus();
  });
  return page.keyPrompt;
}

// ---- the served model ---------------------------------------------------------------------
async function loadConfig() {
  for (;;) {
    const response = await call("/playground/config").catch(() => null);
    if (response && response.ok) {
      page.config = await response.json();
      break;
    }
    $("model-name").textContent = response ? await errorMessage(response) : "server unreachable, retrying…";
    if (response && response.status !== 503) return;   // a refused key: Send asks again
    await sleep(response ? 1000 : 2000);                // loading, or away
  }
  $("model-name").textContent = page.config.model;
  if (page.config.accepts_images && !page.attachments) {
    page.attachments = new Attachments(page.config, note);
    page.attachments.enable();
  }
}

// ---- one turn -------------------------------------------------------------------------------
function userMessage(text, images) {
  if (!images.length) return { role: "user", content: text };
  const detail = $("image-detail").value;
  const parts = images.map((url) => ({ type: "image_url", image_url: { url, detail } }));
  return { role: "user", content: text ? [{ type: "text", text }, ...parts] : parts };
}

function renderUser(text, images) {
  const item = addMessage("user", text);
  if (images.length) {
    const strip = document.createElement("div");
    strip.className = "images";
    strip.append(...images.map(thumbnail));
    item.append(strip);
  }
  return item;
}

function conversation(turn) {
  const system = systemPrompt();
  return [...(system ? [{ role: "system", content: system }] : []), ...page.history, ...turn];
}

function lastIsToolResult() {
  const last = page.history[page.history.length - 1];
  return last !== undefined && last.role === "tool";
}

async function send() {
  if (page.controller) return;
  if (!page.config) await loadConfig();
  if (!page.config) return;
  let fields;
  try {
    fields = requestFields();
    $("settings-error").textContent = "";
  } catch (error) {
    $("settings-error").textContent = error.message;
    return;
  }
  const text = $("prompt").value.trim();
  const images = page.attachments ? page.attachments.take() : [];
  if (!text && !images.length && !lastIsToolResult()) return;
  const turn = text || images.length ? [userMessage(text, images)] : [];
  const userItem = turn.length ? renderUser(text, images) : null;
  $("prompt").value = "";
  note("");
  const epoch = page.epoch;
  const message = await answer(conversation(turn), fields);
  if (epoch !== page.epoch) return;   // reset meanwhile
  if (message) {
    page.history.push(...turn, message);
  } else if (userItem) {   // not sent: give the message back to edit
    userItem.classList.add("failed");
    $("prompt").value = text;
    if (page.attachments) page.attachments.restore(images);
  }
}

// Streams one answer into a new message; returns the assistant message for the history, or
// null when nothing came (an error, or stopped before the first token).
async function answer(messages, fields) {
  const item = addMessage("assistant");
  const content = item.querySelector(".content");
  const clock = { sent: performance.now(), first: null, last: null };
  const calls = new ToolCalls(item);
  let text = "";
  let usage = null;
  let stopped = false;
  page.controller = new AbortController();
  setBusy(true);
  try {
    const response = await call("/v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" }, signal: page.controller.signal,
      body: JSON.stringify({ model: page.config.model, messages, stream: true,
                             stream_options: { include_usage: true }, ...fields }),
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const chunk of streamEvents(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      const delta = chunk.choices && chunk.choices.length ? chunk.choices[0].delta : null;
      if (delta && (delta.content || delta.tool_calls)) {
        clock.last = performance.now();
        clock.first = clock.first === null ? clock.last : clock.first;
        text += delta.content || "";
        content.textContent = text;
        calls.merge(delta.tool_calls || []);
      }
      usage = chunk.usage || usage;
    }
  } catch (error) {
    if (error.name !== "AbortError") {
      if (!text && calls.empty) item.remove();
      addMessage("error", error.message).setAttribute("role", "alert");
      return null;
    }
    stopped = true;
  } finally {
    page.controller = null;
    setBusy(false);
  }
  return finishAnswer(item, { text, calls, clock, usage, stopped });
}

function finishAnswer(item, { text, calls, clock, usage, stopped }) {
  if (stopped) item.classList.add("stopped");
  if (stopped && !text && calls.empty) {
    item.querySelector(".content").textContent = "(stopped)";
    return null;
  }
  item.append(renderStats(answerStats(clock, usage)));
  calls.offerResults(addToolResult);
  item.scrollIntoView({ block: "end" });
  const message = { role: "assistant", content: text || (calls.empty ? "" : null) };
  if (!calls.empty) message.tool_calls = calls.list;
  return message;
}

function addToolResult(call, result) {
  page.history.push({ role: "tool", tool_call_id: call.id, content: result });
  addMessage("tool", result);
  note("Send with an empty message to let the model go on.");
  $("prompt").focus();
}

// Tool calls as they stream (OpenAI's deltas: id and name first, then argument text).
class ToolCalls {
  constructor(item) {
    this.item = item;
    this.list = [];
    this.views = [];
  }

  get empty() {
    return this.list.length === 0;
  }

  merge(deltas) {
    for (const delta of deltas) {
      if (!this.list[delta.index]) this.open(delta);
      const call = this.list[delta.index];
      const fn = delta.function || {};
      if (fn.name) call.function.name = fn.name;
      call.function.arguments += fn.arguments || "";
      this.views[delta.index].name.textContent = call.function.name;
      this.views[delta.index].args.textContent = call.function.arguments;
    }
  }

  open(delta) {
    this.list[delta.index] = { id: delta.id, type: "function", function: { name: "", arguments: "" } };
    const box = document.createElement("div");
    box.className = "tool-call";
    const name = document.createElement("code");
    const args = document.createElement("pre");
    box.append(name, args);
    this.item.append(box);
    this.views[delta.index] = { box, name, args };
  }

  // A field under each call where the user can type its result.
  offerResults(onResult) {
    this.list.forEach((call, index) => {
      const form = document.createElement("form");
      form.className = "tool-result";
      const input = document.createElement("input");
      input.placeholder = `result of ${call.function.name}`;
      input.setAttribute("aria-label", input.placeholder);
      const button = document.createElement("button");
      button.textContent = "Add result";
      form.append(input, button);
      form.addEventListener("submit", (event) => {
        event.preventDefault();
        onResult(call, input.value);
        form.remove();
      });
      this.views[index].box.append(form);
    });
  }
}

// ---- controls -------------------------------------------------------------------------------
function stop() {
  if (page.controller) page.controller.abort();
}

function reset() {
  stop();
  page.epoch += 1;
  page.history = [];
  $("messages").replaceChildren();
  if (page.attachments) page.attachments.take();
  note("");
  $("prompt").focus();
}

function wireControls() {
  $("composer").addEventListener("submit", (event) => { event.preventDefault(); send(); });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && page.controller) {
      event.preventDefault();
      stop();
    }
  });
  $("stop").addEventListener("click", stop);
  $("reset").addEventListener("click", reset);
  watchToolChoice();
}

async function main() {
  wireControls();
  onKeyNeeded(askForKey);
  page.keyRequired = await keyRequired();
  if (page.keyRequired && !storedKey()) {
    const key = await askForKey("This server wants an API key.");
    if (key) storeKey(key);
  }
  await loadConfig();
  startLiveStrip(() => !page.keyRequired || storedKey() !== null);
  $("prompt").focus();
}

main();
