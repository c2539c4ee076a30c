// Talking to the server: the API key (kept in sessionStorage only, sent as a Bearer token),
// calls that ask for a key when answered 401, and the server-sent events of a stream.

const KEY_ITEM = "hayate-api-key";
let askForKey = async () => null;   // set by the page: (reason) => Promise<key or null>

export function onKeyNeeded(ask) {
  askForKey = ask;
}

export function storedKey() {
  return sessionStorage.getItem(KEY_ITEM);
}

export function storeKey(key) {
  sessionStorage.setItem(KEY_ITEM, key);
}

function withKey(headers = {}) {
  const key = storedKey();
  return key ? { ...headers, Authorization: `Bearer ${key}` } : headers;
}

// The message of an OpenAI-format error body, or the status line.
export async function errorMessage(response) {
  try {
    const body = await response.clone().json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (_) { /* not JSON */ }
  return `${response.status} ${response.statusText}`.trim();
}

// fetch with the stored key; a 401 asks for a key (unless ask is false) and tries again.
export async function call(path, options = {}, ask = true) {
  for (;;) {
    const response = await fetch(path, { ...options, headers: withKey(options.headers) });
    if (response.status !== 401 || !ask) return response;
    const key = await askForKey(await errorMessage(response));
    if (!key) return response;
    storeKey(key);
  }
}

// Whether the server wants a key (answered without one, so no 401 reaches the console).
export async function keyRequired() {
  const response = await fetch("/playground/auth.json");
  return response.ok && (await response.json()).key_required === true;
}

// Complete events in `buffer` (separated by a blank line) and the incomplete rest.
export function splitEvents(buffer) {
  const parts = buffer.replace(/\r\n/g, "\n").split("\n\n");
  const rest = parts.pop();
  const events = parts.map((event) => event.split("\n")
    .filter((line) => line.startsWith("data:"))
    .map((line) => line.slice(5).replace(/^ /, ""))
    .join("\n")).filter((data) => data !== "");
  return { events, rest };
}

// The JSON of each `data:` event of a text/event-stream response, until [DONE].
export async function* streamEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    const { events, rest } = splitEvents(buffer + value);
    buffer = rest;
    for (const data of events) {
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}
