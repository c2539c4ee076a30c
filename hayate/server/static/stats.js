// Numbers: each answer's speed (measured here, and the server's own usage fields) and the live
// strip read from /metrics.
import { call, storedKey } from "./api.js";

const POLL_MS = 2000;

// The unlabelled samples of a Prometheus text exposition, by metric name.
export function parseMetrics(text) {
  const values = {};
  for (const line of text.split("\n")) {
    const match = /^([a-zA-Z_:][a-zA-Z0-9_:]*)\s+(\S+)/.exec(line);
    if (match) values[match[1]] = Number(match[2]);
  }
  return values;
}

const ms = (seconds) => `${(seconds * 1000).toFixed(seconds < 0.01 ? 1 : 0)} ms`;
const percent = (share) => `${(share * 100).toFixed(share < 0.1 ? 1 : 0)}%`;

// [key, label, text] rows for one answer. `clock`: performance.now() instants (ms) of the
// request, its first and its last token; `usage`: the server's, when the stream carried it.
// tokens/s is measured here, between the first and the last token, as the user saw them.
export function answerStats(clock, usage) {
  const rows = [];
  if (clock.first !== null) rows.push(["ttft", "time to first token", ms((clock.first - clock.sent) / 1000)]);
  if (!usage) return rows;   // stopped: the server's count of tokens never came
  const decodeMs = clock.last - clock.first;
  if (usage.completion_tokens > 1 && decodeMs > 0) {
    rows.push(["tokens-per-second", "tokens/s", ((usage.completion_tokens - 1) / (decodeMs / 1000)).toFixed(1)]);
  }
  rows.push(["tokens", "tokens", `${usage.prompt_tokens} in, ${usage.completion_tokens} out`]);
  const cached = usage.prompt_tokens_details ? usage.prompt_tokens_details.cached_tokens : 0;
  rows.push(["cached", "from prefix cache", `${cached} prompt tokens`]);
  for (const [key, label] of [["queue_time", "queue"], ["prompt_time", "prompt"], ["completion_time", "completion"]]) {
    if (typeof usage[key] === "number") rows.push([key.replace("_", "-"), label, ms(usage[key])]);
  }
  const images = usage.image_usage;
  if (images) {
    const stages = `decode ${ms(images.decode_time)}, preprocess ${ms(images.preprocess_time)}, `
      + `encode ${ms(images.encode_time)}`;
    const cached = images.encoder_cache_hits ? `, ${images.encoder_cache_hits} from cache` : "";
    const label = `${images.images} image${images.images === 1 ? "" : "s"}, ${images.image_tokens} tokens`;
    rows.push(["images", label, stages + cached]);
  }
  for (const part of ["decode", "prefill"]) {
    const share = usage.floor_share ? usage.floor_share[part] : null;
    if (typeof share === "number") rows.push([`floor-${part}`, `${part} speed`, `${percent(share)} of floor`]);
  }
  return rows;
}

// A <dl> of the rows, every value as text.
export function renderStats(rows) {
  const list = document.createElement("dl");
  list.className = "stats";
  for (const [key, label, text] of rows) {
    const item = document.createElement("div");
    item.dataset.stat = key;
    const term = document.createElement("dt");
    term.textContent = label;
    const value = document.createElement("dd");
    value.textContent = text;
    item.append(term, value);
    list.append(item);
  }
  return list;
}

function showLive(values) {
  const text = (id, value) => { document.getElementById(id).textContent = value; };
  const known = (name) => typeof values[name] === "number" && !Number.isNaN(values[name]);
  text("live-running", known("hayate_num_running_requests") ? String(values.hayate_num_running_requests) : "–");
  text("live-waiting", known("hayate_num_waiting_requests") ? String(values.hayate_num_waiting_requests) : "–");
  if (known("hayate_kv_cache_usage_ratio")) {
    document.getElementById("live-kv-meter").value = values.hayate_kv_cache_usage_ratio;
    text("live-kv", percent(values.hayate_kv_cache_usage_ratio));
  }
  text("live-floor", known("hayate_decode_floor_tokens_per_second")
    ? `${values.hayate_decode_floor_tokens_per_second.toFixed(0)} tok/s` : "measuring…");
  const share = values.hayate_decode_floor_share;
  text("live-share", known("hayate_decode_floor_share") ? `${percent(share)} of floor` : "–");
}

// Poll /metrics while the tab is visible and `allowed()` (a key is known, where one is
// needed); never asks for a key (the chat does).
export function startLiveStrip(allowed) {
  let refusedKey;   // a key /metrics refused is not tried again
  const poll = async () => {
    if (document.visibilityState === "visible" && allowed() && storedKey() !== refusedKey) {
      try {
        const response = await call("/metrics", {}, false);
        if (response.ok) showLive(parseMetrics(await response.text()));
        if (response.status === 401) refusedKey = storedKey();
      } catch (_) { /* the server is away; the next poll tries again */ }
    }
    setTimeout(poll, POLL_MS);
  };
  poll();
}
