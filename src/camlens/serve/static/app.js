// camlens explorer: plain JavaScript, no build step, no network beyond this server.
//
// The API returns, per explained class, the heat map as an 8-bit gray PNG whose value is the
// row of a 256-colour table (GET /api/colormaps). The page blends it with the photo itself,
// with the same formula as camlens.render.overlay, so the opacity slider and the colour map
// redraw at once and give the same pixels as the server's "overlay" PNG.
"use strict";

const $ = (id) => document.getElementById(id);

const state = {
  config: null,      // GET /api/models
  tables: {},        // colour map name -> [[r, g, b] x 256]
  labels: [],        // class names of the current model
  source: null,      // {file: File} or {sample: "chelsea"}
  photo: null,       // ImageData of the photo at display size
  predictions: [],   // top 5 of the current model
  maps: new Map(),   // "model|method|class" -> {entry, heat: Uint8Array, response}
  selected: null,    // class id shown in the main view
  comparing: false,
  compareToken: 0,   // bumped on every comparison: an older one stops drawing
  generation: 0,     // bumped on every new image/model/method: late answers are dropped
};

// ---------------------------------------------------------------- requests

async function getJSON(url) {
  const response = await fetch(url);
  const body = await response.json();
  if (!response.ok) throw new Error(body.detail || response.statusText);
  return body;
}

async function requestExplain(method, target) {
  for (let attempt = 0; ; attempt++) {
    const form = new FormData();
    if (state.source.file) form.append("file", state.source.file, state.source.file.name);
    else form.append("sample", state.source.sample);
    form.append("model", $("model").value);
    form.append("method", method);
    form.append("target", String(target));
    form.append("colormap", $("colormap").value);
    form.append("alpha", $("opacity").value);
    const response = await fetch("/api/explain", { method: "POST", body: form });
    const body = await response.json().catch(() => ({ detail: response.statusText }));
    if (response.ok) return body;
    const retryAfter = Number(response.headers.get("Retry-After") || 0);
    if (response.status === 503 && attempt < 5) {
      setStatus(`The server is busy; trying again in ${retryAfter} s…`, "busy");
      await new Promise((resolve) => setTimeout(resolve, 1000 * Math.max(1, retryAfter)));
      continue;
    }
    throw new Error(typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail));
  }
}

function mapKey(model, method, classId) {
  return `${model}|${method}|${classId}`;
}

async function decodePixels(dataUrl) {
  const image = new Image();
  image.src = dataUrl;
  await image.decode();
  const canvas = document.createElement("canvas");
  canvas.width = image.naturalWidth;
  canvas.height = image.naturalHeight;
  const context = canvas.getContext("2d", { willReadFrequently: true });
  context.drawImage(image, 0, 0);
  return context.getImageData(0, 0, canvas.width, canvas.height);
}

async function absorb(response) {
  if (!state.photo) state.photo = await decodePixels(response.display.image);
  for (const entry of response.maps) {
    const gray = (await decodePixels(entry.heatmap)).data;
    const heat = new Uint8Array(gray.length / 4);
    for (let p = 0; p < heat.length; p++) heat[p] = gray[4 * p];
    state.maps.set(mapKey(response.model, response.method, entry.class), { entry, heat, response });
  }
}

async function explainClass(method, classId) {
  const key = mapKey($("model").value, method, classId);
  if (!state.maps.has(key)) await absorb(await requestExplain(method, classId));
  return state.maps.get(key);
}

// ---------------------------------------------------------------- drawing

// numpy's rint: halves go to the even neighbour (values here are never negative).
function rint(x) {
  const r = Math.round(x);
  return x % 1 === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

function paint(canvas, record) {
  const { width, height } = state.photo;
  canvas.width = width;
  canvas.height = height;
  const context = canvas.getContext("2d");
  const out = context.createImageData(width, height);
  const table = state.tables[$("colormap").value];
  const alpha = parseFloat($("opacity").value);
  const photo = state.photo.data;
  const pixels = out.data;
  for (let p = 0, i = 0; p < record.heat.length; p++, i += 4) {
    const colour = table[record.heat[p]];
    pixels[i] = rint((1 - alpha) * photo[i] + alpha * colour[0]);
    pixels[i + 1] = rint((1 - alpha) * photo[i + 1] + alpha * colour[1]);
    pixels[i + 2] = rint((1 - alpha) * photo[i + 2] + alpha * colour[2]);
    pixels[i + 3] = 255;
  }
  if ($("show-box").checked && record.entry.display_box) {
    outlineBox(pixels, width, height, record.entry.display_box);
  }
  context.putImageData(out, 0, 0);
  canvas.dataset.class = String(record.entry.class);
  canvas.dataset.method = record.response.method;
}

// Same outline as camlens.render: white, drawn inward, max(1, round(min(W, H) / 150)) wide.
function outlineBox(pixels, width, height, box) {
  const line = Math.max(1, rint(Math.min(width, height) / 150));
  const x0 = Math.max(0, box[0]), y0 = Math.max(0, box[1]);
  const x1 = Math.min(width, box[2]), y1 = Math.min(height, box[3]);
  if (x1 <= x0 || y1 <= y0) return;
  const solid = 2 * line >= Math.min(x1 - x0, y1 - y0);
  for (let y = y0; y < y1; y++) {
    for (let x = x0; x < x1; x++) {
      const edge = x < x0 + line || x >= x1 - line || y < y0 + line || y >= y1 - line;
      if (solid || edge) {
        const i = 4 * (y * width + x);
        pixels[i] = pixels[i + 1] = pixels[i + 2] = 255;
      }
    }
  }
}

function redraw() {
  const key = mapKey($("model").value, $("method").value, state.selected);
  const record = state.maps.get(key);
  if (!record) return;
  paint($("overlay"), record);
  const entry = record.entry;
  const response = record.response;
  const box = entry.box ? `box [${entry.box.join(", ")}] px` : "no positive evidence";
  const identity = response.identity_error === null ? "" :
    ` · CAM identity error ${response.identity_error.toExponential(1)}`;
  const options = describeOptions(response);
  $("caption").innerHTML = "";
  const name = document.createElement("strong");
  name.textContent = `${entry.label} (${entry.class})`;
  $("caption").append(name, ` p = ${entry.prob.toFixed(3)} · logit ${entry.score.toFixed(2)} · ` +
    `${response.method}${options} on ${response.layer} · ${box}${identity}`);
  for (const button of $("top5").querySelectorAll("button")) {
    button.classList.toggle("selected", Number(button.dataset.class) === state.selected);
  }
  for (const canvas of $("methods").querySelectorAll("canvas")) {
    const other = state.maps.get(mapKey($("model").value, canvas.dataset.method, state.selected));
    if (other) paint(canvas, other);
  }
  $("download-png").disabled = $("download-json").disabled = false;
}

function describeOptions(response) {
  const channels = (response.method_options || {}).max_channels;
  return channels ? ` (${channels} most active channels)` : "";
}

function renderTop5() {
  const list = $("top5");
  list.innerHTML = "";
  for (const prediction of state.predictions) {
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.class = String(prediction.class);
    const label = document.createElement("span");
    label.textContent = prediction.label;
    const prob = document.createElement("span");
    prob.className = "prob";
    prob.textContent = `${(100 * prediction.prob).toFixed(1)} %`;
    const bar = document.createElement("span");
    bar.className = "bar";
    const fill = document.createElement("span");
    fill.style.width = `${(100 * prediction.prob).toFixed(1)}%`;
    bar.append(fill);
    button.append(label, prob, bar);
    button.addEventListener("click", () => selectClass(prediction.class));
    const item = document.createElement("li");
    item.append(button);
    list.append(item);
  }
}

// ---------------------------------------------------------------- actions

function setStatus(text, kind = "") {
  $("status").textContent = text;
  $("status").className = `status ${kind}`;
}

async function run(message, action) {
  const generation = state.generation;
  setStatus(message, "busy");
  try {
    await action(generation);
    if (generation === state.generation) setStatus(describeSource());
  } catch (error) {
    if (generation === state.generation) setStatus(error.message, "error");
  }
}

function describeSource() {
  if (!state.source) return "";
  return state.source.file ? `Image: ${state.source.file.name}` : `Sample: ${state.source.sample}`;
}

function startOver(source) {
  if (source) {
    state.source = source;
    state.photo = null;
    state.selected = null;
  }
  if (!state.source) return;
  state.generation++;
  state.maps.clear();
  $("methods").innerHTML = "";
  $("compare").disabled = true;
  run(`Explaining with ${$("method").value}…`, async (generation) => {
    const response = await requestExplain($("method").value, "top5");
    if (generation !== state.generation) return;
    await absorb(response);
    state.predictions = response.predictions;
    renderTop5();
    const keep = state.selected !== null && state.selected < state.labels.length;
    await selectClass(keep ? state.selected : response.maps[0].class, generation);
    $("compare").disabled = false;
  });
}

async function selectClass(classId, generation = state.generation) {
  state.selected = classId;
  const key = mapKey($("model").value, $("method").value, classId);
  if (!state.maps.has(key)) {
    setStatus(`Explaining class ${classId}…`, "busy");
    try {
      await explainClass($("method").value, classId);
    } catch (error) {
      setStatus(error.message, "error");
      return;
    }
    setStatus(describeSource());
  }
  if (generation === state.generation && state.selected === classId) {
    redraw();
    if (state.comparing) compareMethods(generation);
  }
}

async function compareMethods(generation = state.generation) {
  state.comparing = true;
  const token = ++state.compareToken;
  const classId = state.selected;
  const grid = $("methods");
  grid.innerHTML = "";
  for (const method of state.config.methods) {
    const figure = document.createElement("figure");
    const canvas = document.createElement("canvas");
    canvas.dataset.method = method;
    const caption = document.createElement("figcaption");
    caption.textContent = `${method}: computing…`;
    figure.append(canvas, caption);
    grid.append(figure);
  }
  for (const figure of Array.from(grid.children)) {
    const canvas = figure.querySelector("canvas");
    const caption = figure.querySelector("figcaption");
    try {
      const record = await explainClass(canvas.dataset.method, classId);
      if (token !== state.compareToken || generation !== state.generation) return;
      paint(canvas, record);
      caption.textContent =
        `${record.response.method}${describeOptions(record.response)} · ${record.response.layer}`;
    } catch (error) {
      caption.textContent = `${canvas.dataset.method}: ${error.message}`;
    }
  }
}

function searchClass(event) {
  event.preventDefault();
  const text = $("class-query").value.trim();
  const byId = text.match(/\((\d+)\)\s*$/) || text.match(/^(\d+)$/);
  let classId = byId ? Number(byId[1]) : -1;
  if (!byId) classId = state.labels.findIndex((l) => l.toLowerCase() === text.toLowerCase());
  if (classId < 0 || classId >= state.labels.length) {
    setStatus(`No class is called "${text}"; pick one from the list.`, "error");
    return;
  }
  if (!state.source) {
    setStatus("Choose an image first.", "error");
    return;
  }
  selectClass(classId);
}

async function loadLabels() {
  const body = await getJSON(`/api/labels?model=${encodeURIComponent($("model").value)}`);
  state.labels = body.labels;
  const list = $("class-names");
  list.innerHTML = "";
  body.labels.forEach((label, index) => {
    const option = document.createElement("option");
    option.value = `${label} (${index})`;
    list.append(option);
  });
}

function download(blob, name) {
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = name;
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
}

function baseName() {
  const name = state.source.file ? state.source.file.name : state.source.sample;
  return `${name.replace(/\.[^.]*$/, "").replace(/[^\w.-]+/g, "_")}_${$("method").value}_c${state.selected}`;
}

function fillSelect(select, values, chosen) {
  select.innerHTML = "";
  for (const value of values) select.append(new Option(value, value, false, value === chosen));
}

// ---------------------------------------------------------------- start

async function init() {
  const [config, tables] = await Promise.all([getJSON("/api/models"), getJSON("/api/colormaps")]);
  state.config = config;
  state.tables = tables;
  fillSelect($("model"), config.models, config.default_model);
  fillSelect($("method"), config.methods, config.default_method);
  fillSelect($("colormap"), config.colormaps, config.colormaps[0]);
  fillSelect($("sample"), config.samples, config.samples[0]);
  await loadLabels();

  $("file-input").addEventListener("change", () => {
    const file = $("file-input").files[0];
    if (file) startOver({ file });
  });
  const zone = $("dropzone");
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    const file = event.dataTransfer.files[0];
    if (file) startOver({ file });
  });
  $("use-sample").addEventListener("click", () => startOver({ sample: $("sample").value }));
  $("model").addEventListener("change", async () => {
    state.selected = null;
    await loadLabels().catch((error) => setStatus(error.message, "error"));
    startOver();
  });
  $("method").addEventListener("change", () => startOver());
  $("class-search").addEventListener("submit", searchClass);
  $("colormap").addEventListener("change", redraw);
  $("show-box").addEventListener("change", redraw);
  $("opacity").addEventListener("input", () => {
    $("opacity-value").textContent = parseFloat($("opacity").value).toFixed(2);
    redraw();
  });
  $("compare").addEventListener("click", () => compareMethods());
  $("download-png").addEventListener("click", () =>
    $("overlay").toBlob((blob) => download(blob, `${baseName()}.png`), "image/png"));
  $("download-json").addEventListener("click", () => {
    const record = state.maps.get(mapKey($("model").value, $("method").value, state.selected));
    const text = JSON.stringify(record.response, null, 2);
    download(new Blob([text], { type: "application/json" }), `${baseName()}.json`);
  });
  document.body.dataset.ready = "true";
}

init().catch((error) => setStatus(`Cannot start: ${error.message}`, "error"));
