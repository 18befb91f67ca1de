// camlens explorer: plain JavaScript, no build step, no network beyond this server.
//
// The API returns, per explained class, the heat map as an 8-bit gray PNG whose value is the
// row of a 256-colour table (GET /api/colormaps). The page blends it with the photo itself,
// with the same formula as camlens.render.overlay, so the opacity slider and the colour map
// redraw at once and give the same pixels as the server's "overlay" PNG.
//
// A detector or segmenter answers with "task" and "objects" instead: each detection (its box)
// or class region (its mask) with its map in the same form; the list beside the picture then
// shows them, and each one's map is drawn with its box or its region's outline.
"use strict";

const $ = (id) => document.getElementById(id);

const state = {
  config: null,      // GET /api/models
  tables: {},        // colour map name -> [[r, g, b] x 256]
  labels: [],        // class names of the current model
  source: null,      // {file: File} or {sample: "chelsea"}
  photo: null,       // ImageData of the photo at display size (of the current image)
  predictions: [],   // top 5 of the current model
  task: "classification", // of the current answer: or "detection", "segmentation"
  objects: [],       // a detector's or segmenter's objects in the current answer
  maps: new Map(),   // "model|method|id" -> {id, entry, heat: Uint8Array, mask, response, photo}
  selected: null,    // class id (or object id "o<k>") asked for in the main view
  shown: null,       // the record on screen (kept, marked, while another is computed)
  comparing: false,  // the "Compare methods" toggle
  compareToken: 0,   // bumped on every comparison: an older one stops drawing
  generation: 0,     // bumped on every new image/model/method: late answers are dropped
};

// Every request runs under the AbortController of a "flight": "main" (the main view) or
// "compare". Starting a flight cancels the one before it, so a request whose answer is no
// longer wanted does not keep running in the browser, and the server drops it from its
// queue when it has not started it yet.
const flights = { main: null, compare: null };

// Below this probability a class's map gets a note: it is scaled to its own maximum.
const UNLIKELY = 0.05;

// ---------------------------------------------------------------- requests

async function getJSON(url) {
  const response = await fetch(url);
  const body = await response.json();
  if (!response.ok) throw new Error(body.detail || response.statusText);
  return body;
}

async function requestExplain(method, target, signal) {
  for (let attempt = 0; ; attempt++) {
    const form = new FormData();
    if (state.source.file) form.append("file", state.source.file, state.source.file.name);
    else form.append("sample", state.source.sample);
    form.append("model", $("model").value);
    form.append("method", method);
    form.append("target", String(target));
    form.append("colormap", $("colormap").value);
    form.append("alpha", $("opacity").value);
    const threshold = $("score-threshold").value;
    if (threshold !== "" && Number(threshold) >= 0 && Number(threshold) <= 1) {
      form.append("score_threshold", threshold);
    }
    const response = await fetch("/api/explain", { method: "POST", body: form, signal });
    const body = await response.json().catch(() => ({ detail: response.statusText }));
    if (response.ok) return body;
    const retryAfter = Number(response.headers.get("Retry-After") || 0);
    if (response.status === 503 && attempt < 5) {
      setStatus(`The server is busy; trying again in ${retryAfter} s…`, "busy");
      await sleep(1000 * Math.max(1, retryAfter), signal);
      continue;
    }
    throw new Error(typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail));
  }
}

function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => {
      clearTimeout(timer);
      reject(new DOMException("cancelled", "AbortError"));
    }, { once: true });
  });
}

function beginFlight(kind) {
  if (flights[kind]) flights[kind].abort();
  flights[kind] = new AbortController();
  return flights[kind];
}

function cancelFlight(kind) {
  if (flights[kind]) flights[kind].abort();
  flights[kind] = null;
}

function isAbort(error) {
  return error instanceof DOMException && error.name === "AbortError";
}

function mapKey(model, method, classId) {
  return `${model}|${method}|${classId}`;
}

function isDense(response) {
  return response.task === "detection" || response.task === "segmentation";
}

// A detector's or segmenter's object k in the map cache and the list ("o0", "o1"...).
function objectId(index) {
  return `o${index}`;
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

async function decodeGray(dataUrl) {
  const rgba = (await decodePixels(dataUrl)).data;
  const gray = new Uint8Array(rgba.length / 4);
  for (let p = 0; p < gray.length; p++) gray[p] = rgba[4 * p];
  return gray;
}

// A detector's or segmenter's objects are kept under the method asked for (the server
// explains them with Grad-CAM when its default CAM was asked for).
async function absorb(response, method) {
  if (!state.photo) state.photo = await decodePixels(response.display.image);
  const dense = isDense(response);
  for (const entry of dense ? response.objects : response.maps) {
    const heat = await decodeGray(entry.heatmap);
    const mask = dense && entry.mask ? await decodeGray(entry.mask) : null;
    const id = dense ? objectId(entry.index) : entry.class;
    const record = { id, entry, heat, mask, response, photo: state.photo };
    state.maps.set(mapKey(response.model, dense ? method : response.method, id), record);
  }
}

async function explainClass(method, classId, signal) {
  const key = mapKey($("model").value, method, classId);
  if (!state.maps.has(key)) {
    const target = typeof classId === "string" ? "top1" : classId; // objects: all at once
    await absorb(await requestExplain(method, target, signal), method);
  }
  if (!state.maps.has(key)) throw new Error(`${method} found no object ${classId}`);
  return state.maps.get(key);
}

// ---------------------------------------------------------------- drawing

// numpy's rint: halves go to the even neighbour (values here are never negative).
function rint(x) {
  const r = Math.round(x);
  return x % 1 === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

function paint(canvas, record) {
  const { width, height } = record.photo;
  canvas.width = width;
  canvas.height = height;
  const context = canvas.getContext("2d");
  const out = context.createImageData(width, height);
  const table = state.tables[$("colormap").value];
  const alpha = parseFloat($("opacity").value);
  const photo = record.photo.data;
  const pixels = out.data;
  for (let p = 0, i = 0; p < record.heat.length; p++, i += 4) {
    const colour = table[record.heat[p]];
    pixels[i] = rint((1 - alpha) * photo[i] + alpha * colour[0]);
    pixels[i + 1] = rint((1 - alpha) * photo[i + 1] + alpha * colour[1]);
    pixels[i + 2] = rint((1 - alpha) * photo[i + 2] + alpha * colour[2]);
    pixels[i + 3] = 255;
  }
  if (isDense(record.response)) {
    // A detection's own box, or its region's outline, as on the server's overlay.
    if (record.entry.display_box) outlineBox(pixels, width, height, record.entry.display_box);
    if (record.mask) outlineMask(pixels, width, height, record.mask);
  } else if ($("show-box").checked && record.entry.display_box) {
    outlineBox(pixels, width, height, record.entry.display_box);
  }
  context.putImageData(out, 0, 0);
  canvas.dataset.class = String(record.id);
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

// Same as camlens.render.outline: the region's pixels with a 4-neighbour outside it (or on
// the picture's border), in white.
function outlineMask(pixels, width, height, mask) {
  for (let y = 0, p = 0; y < height; y++) {
    for (let x = 0; x < width; x++, p++) {
      if (!mask[p]) continue;
      const edge = x === 0 || y === 0 || x === width - 1 || y === height - 1 ||
        !mask[p - 1] || !mask[p + 1] || !mask[p - width] || !mask[p + width];
      if (edge) pixels[4 * p] = pixels[4 * p + 1] = pixels[4 * p + 2] = 255;
    }
  }
}

function redraw() {
  drawLegend();
  const record = state.shown;
  if (!record) return;
  paint($("overlay"), record);
  const photo = $("photo");
  photo.width = record.photo.width;
  photo.height = record.photo.height;
  photo.getContext("2d").putImageData(record.photo, 0, 0);
  const response = record.response;
  if (isDense(response)) {
    captionObject(record);
  } else {
    captionClass(record);
  }
  $("result").classList.remove("empty");
  $("compare").disabled = false;
  for (const button of $("top5").querySelectorAll("button")) {
    button.classList.toggle("selected", button.dataset.class === String(record.id));
  }
  for (const canvas of $("methods").querySelectorAll("canvas")) {
    const other = state.maps.get(mapKey(response.model, canvas.dataset.method, record.id));
    if (other) paint(canvas, other);
  }
  updateDownloads();
}

function captionObject(record) {
  const { entry, response } = record;
  let where;
  if (entry.box) {
    where = `score ${entry.score.toFixed(3)} · box [${entry.box.join(", ")}] px`;
  } else {
    const mean = entry.mean_prob === null ? "" : ` · mean p ${formatProb(entry.mean_prob)}`;
    where = `summed logit ${entry.score.toFixed(2)} · ${entry.pixels} px at the model's ` +
      `input (${(100 * entry.fraction).toFixed(1)} %)${mean}`;
  }
  $("caption").innerHTML = "";
  const name = document.createElement("strong");
  name.textContent = `${entry.label} (${entry.class})`;
  $("caption").append(name, ` ${where} · ${response.method}${describeOptions(response)} on ` +
    `${response.layer}`);
  $("unlikely").hidden = true;
  $("unlikely").textContent = "";
}

function captionClass(record) {
  const { entry, response } = record;
  const box = entry.box ? `box [${entry.box.join(", ")}] px` : "no positive evidence";
  const identity = response.identity_error === null ? "" :
    ` · CAM identity error ${response.identity_error.toExponential(1)}`;
  const options = describeOptions(response);
  $("caption").innerHTML = "";
  const name = document.createElement("strong");
  name.textContent = `${entry.label} (${entry.class})`;
  $("caption").append(name, ` p = ${formatProb(entry.prob)} · logit ${entry.score.toFixed(2)} · ` +
    `${response.method}${options} on ${response.layer} · ${box}${identity}`);
  const unlikely = entry.prob < UNLIKELY;
  $("unlikely").hidden = !unlikely;
  $("unlikely").textContent = unlikely ?
    `This class is unlikely (p = ${formatProb(entry.prob)}); its map is scaled to its own ` +
    "maximum, so it looks as strong as a likely class's: it shows where the network would " +
    `see "${entry.label}", not that it is there.` : "";
}

function formatProb(p) {
  return p > 0 && p < 0.001 ? p.toExponential(1) : p.toFixed(3);
}

// The colour scale: the map's value (0 .. its own maximum) left to right, in the chosen map.
function drawLegend() {
  const table = state.tables[$("colormap").value];
  if (!table) return;
  const canvas = $("legend");
  const context = canvas.getContext("2d");
  const image = context.createImageData(canvas.width, canvas.height);
  for (let y = 0, i = 0; y < canvas.height; y++) {
    for (let x = 0; x < canvas.width; x++, i += 4) {
      const colour = table[Math.floor((x * 256) / canvas.width)];
      image.data.set([colour[0], colour[1], colour[2], 255], i);
    }
  }
  context.putImageData(image, 0, 0);
  canvas.dataset.colormap = $("colormap").value;
}

function describeOptions(response) {
  const channels = (response.method_options || {}).max_channels;
  return channels ? ` (${channels} most active channels)` : "";
}

// The list beside the picture: the top 5 classes, or a detector's or segmenter's objects.
function listItems() {
  if (state.task === "classification") {
    return state.predictions.map((p) => ({
      id: p.class, label: p.label, value: `${(100 * p.prob).toFixed(1)} %`, share: p.prob,
    }));
  }
  return state.objects.map((o) => o.box ? {
    id: objectId(o.index), label: o.label, value: o.score.toFixed(3), share: o.score,
    detail: `[${o.box.join(", ")}] px`,
  } : {
    id: objectId(o.index), label: o.label, value: `${(100 * o.fraction).toFixed(1)} %`,
    share: o.fraction, detail: `${o.pixels} px` +
      (o.mean_prob === null ? "" : ` · mean p ${formatProb(o.mean_prob)}`),
  });
}

// The answer's kind: the list's title and hint, and the detections' threshold.
function setTask(response) {
  state.task = isDense(response) ? response.task : "classification";
  state.objects = isDense(response) ? response.objects : [];
  state.predictions = response.predictions;
  const noun = { detection: "detection", segmentation: "segment" }[state.task];
  $("list-title").textContent = noun ? `${noun[0].toUpperCase()}${noun.slice(1)}s` : "Top 5";
  $("list-hint").textContent = noun ? `Click a ${noun} to see where the network finds it.` :
    "Click a class to see where the network finds it.";
  $("threshold-row").hidden = state.task !== "detection";
}

function renderTop5() {
  const list = $("top5");
  list.innerHTML = "";
  for (const row of listItems()) {
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.class = String(row.id);
    const label = document.createElement("span");
    label.textContent = row.label;
    const prob = document.createElement("span");
    prob.className = "prob";
    prob.textContent = row.value;
    const bar = document.createElement("span");
    bar.className = "bar";
    const fill = document.createElement("span");
    fill.style.width = `${(100 * Math.min(1, Math.max(0, row.share))).toFixed(1)}%`;
    bar.append(fill);
    button.append(label, prob, bar);
    if (row.detail) {
      const detail = document.createElement("span");
      detail.className = "detail";
      detail.textContent = row.detail;
      button.append(detail);
    }
    button.addEventListener("click", () => selectClass(row.id));
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

// The elapsed time of the main view's request, with a Cancel button (Score-CAM takes s).
const progress = { timer: 0 };

function startProgress() {
  clearInterval(progress.timer);
  const started = performance.now();
  const tick = () => {
    const seconds = (performance.now() - started) / 1000;
    $("progress-text").textContent = `${seconds.toFixed(1)} s elapsed`;
  };
  tick();
  progress.timer = setInterval(tick, 100);
  $("progress").hidden = false;
}

function stopProgress() {
  clearInterval(progress.timer);
  $("progress").hidden = true;
}

function setRecomputing(on) {
  $("result").classList.toggle("recomputing", on && state.shown !== null);
  $("result").setAttribute("aria-busy", String(on));
  updateDownloads();
}

function updateDownloads() {
  const off = !state.shown || $("result").classList.contains("recomputing");
  $("download-png").disabled = $("download-json").disabled = off;
}

// Nothing on screen (an error, or a new photo): no old picture, and nothing to download.
function clearResult(keepPredictions) {
  state.shown = null;
  for (const id of ["overlay", "photo"]) {
    const canvas = $(id);
    canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
    delete canvas.dataset.class;
    delete canvas.dataset.method;
  }
  $("caption").textContent = "";
  $("unlikely").hidden = true;
  $("result").classList.add("empty");
  setComparing(false);
  if (!keepPredictions) {
    state.predictions = [];
    state.objects = [];
    renderTop5();
    $("compare").disabled = true;
  }
  updateDownloads();
}

// One computation for the main view: the picture on screen is marked as being recomputed,
// the elapsed time shows with a Cancel button, and an error clears the result.
async function mainJob(message, work, keepPredictions) {
  const controller = beginFlight("main");
  const generation = state.generation;
  setStatus(message, "busy");
  setRecomputing(true);
  startProgress();
  try {
    await work(controller.signal, generation);
    if (flights.main === controller) setStatus(describeSource());
  } catch (error) {
    if (isAbort(error) || controller.signal.aborted) return; // who cancelled says so
    if (generation === state.generation) {
      clearResult(keepPredictions);
      setStatus(error.message, "error");
    }
  } finally {
    if (flights.main === controller) {
      flights.main = null;
      stopProgress();
      setRecomputing(false);
    }
  }
}

function cancelMain() {
  cancelFlight("main");
  stopProgress();
  setRecomputing(false);
  setStatus("Cancelled. Pick a class, a method or an image to go on.");
}

function describeSource() {
  if (!state.source) return "";
  return state.source.file ? `Image: ${state.source.file.name}` : `Sample: ${state.source.sample}`;
}

function startOver(source) {
  if (source) {
    state.source = source;
    state.selected = null;
  }
  if (!state.source) return;
  state.generation++;
  state.maps.clear();
  state.photo = null;
  $("compare").disabled = true;
  if (source) clearResult(false); // another photo: the old picture is not of it
  else setComparing(false);
  mainJob(`Explaining with ${$("method").value}…`, async (signal, generation) => {
    const response = await requestExplain($("method").value, "top5", signal);
    if (generation !== state.generation) return;
    await absorb(response, $("method").value);
    setTask(response);
    renderTop5();
    if (isDense(response)) {
      if (!response.objects.length) throw new Error(nothingFound(response));
      const ids = response.objects.map((o) => objectId(o.index));
      state.selected = ids.includes(state.selected) ? state.selected : ids[0];
    } else {
      const keep = typeof state.selected === "number" && state.selected < state.labels.length;
      state.selected = keep ? state.selected : response.maps[0].class;
    }
    await showClass(state.selected, signal, generation);
    $("compare").disabled = false;
  }, false);
}

function nothingFound(response) {
  if (response.task === "detection") {
    return `No detection scores ${$("score-threshold").value} or more in this image ` +
      "(lower the threshold to see weaker ones).";
  }
  return "The model predicts no class but the background in this image.";
}

function selectClass(classId) {
  state.selected = classId;
  const cached = state.maps.get(mapKey($("model").value, $("method").value, classId));
  if (cached) {
    if (flights.main) cancelMain();
    setStatus(describeSource());
    state.shown = cached;
    redraw();
    if (state.comparing) compareMethods();
    return;
  }
  mainJob(`Explaining class ${classId}…`, (signal, generation) =>
    showClass(classId, signal, generation), true);
}

async function showClass(classId, signal, generation) {
  const record = await explainClass($("method").value, classId, signal);
  if (generation !== state.generation || state.selected !== classId) return;
  state.shown = record;
  redraw();
  if (state.comparing) compareMethods();
}

function setComparing(on) {
  const changed = on !== state.comparing;
  state.comparing = on;
  $("compare").setAttribute("aria-pressed", String(on));
  $("compare").textContent = on ? "Stop comparing" : "Compare methods";
  if (on && changed) compareMethods();
  if (!on) {
    cancelFlight("compare");
    state.compareToken++;
    $("methods").innerHTML = "";
  }
}

async function compareMethods() {
  const controller = beginFlight("compare");
  const token = ++state.compareToken;
  const generation = state.generation;
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
      const record = await explainClass(canvas.dataset.method, classId, controller.signal);
      if (token !== state.compareToken || generation !== state.generation) return;
      paint(canvas, record);
      caption.textContent =
        `${record.response.method}${describeOptions(record.response)} · ${record.response.layer}`;
    } catch (error) {
      if (isAbort(error) || token !== state.compareToken) return;
      caption.textContent = `${canvas.dataset.method}: ${error.message}`;
    }
  }
  if (flights.compare === controller) flights.compare = null;
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
  if (state.task !== "classification") { // a detector's or segmenter's object of that class
    const found = state.objects.find((o) => o.class === classId);
    if (!found) {
      const noun = state.task === "detection" ? "detection" : "segment";
      setStatus(`No ${noun} of "${state.labels[classId]}" in this image.`, "error");
      return;
    }
    selectClass(objectId(found.index));
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

function baseName(record) {
  const name = state.source.file ? state.source.file.name : state.source.sample;
  const stem = name.replace(/\.[^.]*$/, "").replace(/[^\w.-]+/g, "_");
  const shown = typeof record.id === "string" ? record.id : `c${record.entry.class}`;
  return `${stem}_${record.response.method}_${shown}`;
}

// The JSON of what the screen shows: its colour map, opacity and box setting, the top 5 and
// every class map computed for this image with this method (class, probability, logit, box).
// The pictures (PNG data URLs: the overlay as drawn here, the 8-bit map, the photo) only
// when asked for.
function answerJSON(record, withPictures) {
  const response = record.response;
  const maps = [];
  for (const other of state.maps.values()) {
    if (other.response.model !== response.model || other.response.method !== response.method) {
      continue;
    }
    const { overlay, heatmap, mask, ...entry } = other.entry;
    if (withPictures) Object.assign(entry, { heatmap });
    if (withPictures && mask) Object.assign(entry, { mask });
    maps.push(entry);
  }
  const answer = {
    image: state.source.file ? state.source.file.name : state.source.sample,
    model: response.model,
    method: response.method,
    method_options: response.method_options,
    layer: response.layer,
    identity_error: response.identity_error,
    size: response.size,
    display_size: response.display.size,
    colormap: $("colormap").value,
    alpha: parseFloat($("opacity").value),
    box_shown: $("show-box").checked,
    shown_class: record.entry.class,
    predictions: state.predictions,
    maps,
  };
  if (isDense(response)) { // the objects as listed, and the one shown
    answer.task = response.task;
    answer.objects = maps.sort((a, b) => a.index - b.index);
    answer.shown_object = record.entry.index;
    delete answer.maps;
    delete answer.box_shown;
  }
  if (withPictures) {
    answer.overlay = $("overlay").toDataURL("image/png");
    answer.photo = response.display.image;
  }
  return answer;
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
  drawLegend();
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
  $("score-threshold").addEventListener("change", () => startOver());
  $("opacity").addEventListener("input", () => {
    $("opacity-value").textContent = parseFloat($("opacity").value).toFixed(2);
    redraw();
  });
  $("compare").addEventListener("click", () => setComparing(!state.comparing));
  $("cancel").addEventListener("click", cancelMain);
  $("download-png").addEventListener("click", () => {
    const name = `${baseName(state.shown)}.png`;
    $("overlay").toBlob((blob) => download(blob, name), "image/png");
  });
  $("download-json").addEventListener("click", () => {
    const answer = answerJSON(state.shown, $("json-images").checked);
    const text = JSON.stringify(answer, null, 2);
    download(new Blob([text], { type: "application/json" }), `${baseName(state.shown)}.json`);
  });
  document.body.dataset.ready = "true";
}

init().catch((error) => setStatus(`Cannot start: ${error.message}`, "error"));
