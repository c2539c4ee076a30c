// The settings panes (sampling, JSON schema, tools) as request fields, and images attached by
// the file picker, paste or drop, held as data: URLs for image_url parts.

const $ = (id) => document.getElementById(id);

function numberField(id, name, fields, integer = false) {
  const raw = $(id).value.trim();
  if (raw === "") return;
  const value = Number(raw);
  if (!Number.isFinite(value) || (integer && !Number.isInteger(value))) {
    throw new Error(`${name} must be ${integer ? "a whole number" : "a number"}`);
  }
  fields[name] = value;
}

function parsedJSON(id, name) {
  const raw = $(id).value.trim();
  if (raw === "") return null;
  try {
    return JSON.parse(raw);
  } catch (error) {
    throw new Error(`${name} is not valid JSON: ${error.message}`);
  }
}

// A bare schema, or {name, schema, strict} as OpenAI's json_schema takes it.
function responseFormat() {
  const schema = parsedJSON("schema", "the JSON schema");
  if (schema === null) return null;
  const named = schema && typeof schema.schema === "object" && typeof schema.name === "string";
  return { type: "json_schema", json_schema: named ? schema : { name: "answer", schema, strict: true } };
}

function toolFields(fields) {
  const tools = parsedJSON("tools", "tools");
  if (tools === null) return;
  if (!Array.isArray(tools)) throw new Error("tools must be a JSON list");
  fields.tools = tools.map((tool) => (tool && tool.type ? tool : { type: "function", function: tool }));
  const choice = $("tool-choice").value;
  if (choice !== "named") {
    fields.tool_choice = choice;
    return;
  }
  const name = $("tool-name").value.trim();
  if (!name) throw new Error("name the function tool_choice must call");
  fields.tool_choice = { type: "function", function: { name } };
}

// The request fields the panes set; throws an Error naming the field that is wrong.
export function requestFields() {
  const fields = {};
  numberField("temperature", "temperature", fields);
  numberField("top-p", "top_p", fields);
  numberField("max-tokens", "max_tokens", fields, true);
  numberField("seed", "seed", fields, true);
  const format = responseFormat();
  if (format) fields.response_format = format;
  toolFields(fields);
  return fields;
}

export function systemPrompt() {
  return $("system").value.trim();
}

export function watchToolChoice() {
  const sync = () => { $("tool-name").disabled = $("tool-choice").value !== "named"; };
  $("tool-choice").addEventListener("change", sync);
  sync();
}

// Images waiting to go with the next message; shown as thumbnails with a remove button.
export class Attachments {
  constructor(limits, onError) {
    this.urls = [];
    this.limits = limits;
    this.onError = onError;
    this.box = $("attachments");
  }

  enable() {
    $("attach-label").hidden = false;
    $("attach").addEventListener("change", (event) => {
      this.add(event.target.files);
      event.target.value = "";
    });
    $("prompt").addEventListener("paste", (event) => {
      const files = imageFiles(event.clipboardData && event.clipboardData.files);
      if (files.length) {
        event.preventDefault();
        this.add(files);
      }
    });
    const composer = $("composer");
    composer.addEventListener("dragover", (event) => { event.preventDefault(); composer.classList.add("dropping"); });
    composer.addEventListener("dragleave", () => composer.classList.remove("dropping"));
    composer.addEventListener("drop", (event) => {
      event.preventDefault();
      composer.classList.remove("dropping");
      this.add(event.dataTransfer && event.dataTransfer.files);
    });
  }

  async add(files) {
    for (const file of imageFiles(files)) {
      if (this.urls.length >= this.limits.max_images) {
        this.onError(`at most ${this.limits.max_images} images per message`);
        break;
      }
      if (file.size > this.limits.max_image_bytes) {
        this.onError(`${file.name} is over ${(this.limits.max_image_bytes / 2 ** 20).toFixed(0)} MB`);
        continue;
      }
      this.urls.push(await dataURL(file));
    }
    this.render();
  }

  take() {
    const urls = this.urls;
    this.urls = [];
    this.render();
    return urls;
  }

  restore(urls) {
    this.urls = urls;
    this.render();
  }

  render() {
    this.box.replaceChildren(...this.urls.map((url, index) => {
      const figure = document.createElement("figure");
      figure.append(thumbnail(url));
      const remove = document.createElement("button");
      remove.type = "button";
      remove.textContent = "×";
      remove.setAttribute("aria-label", "remove image");
      remove.addEventListener("click", () => { this.urls.splice(index, 1); this.render(); });
      figure.append(remove);
      return figure;
    }));
    this.box.hidden = this.urls.length === 0;
  }
}

export function thumbnail(url) {
  const image = document.createElement("img");
  image.src = url;
  image.alt = "attached image";
  return image;
}

function imageFiles(files) {
  return Array.from(files || []).filter((file) => file.type.startsWith("image/"));
}

function dataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}
