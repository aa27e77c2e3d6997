// The search page: ask the JSON API (/openapi.json) and show the query beside its hits.
// Plain browser JavaScript, no build step, nothing loaded from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
const LABELS = { 0: "benign", 1: "malignant" };
const CHARACTERISTICS = [
  ["subtlety", "subtlety"], ["internalStructure", "internal structure"], ["calcification", "calcification"],
  ["sphericity", "sphericity"], ["margin", "margin"], ["lobulation", "lobulation"],
  ["spiculation", "spiculation"], ["texture", "texture"], ["malignancy", "malignancy"],
];
// LIDC's words for each rating (the readers' scale; malignancy is their suspicion, not a diagnosis).
const SCALES = {
  subtlety: { 1: "extremely subtle", 2: "moderately subtle", 3: "fairly subtle", 4: "moderately obvious", 5: "obvious" },
  internalStructure: { 1: "soft tissue", 2: "fluid", 3: "fat", 4: "air" },
  calcification: { 1: "popcorn", 2: "laminated", 3: "solid", 4: "non-central", 5: "central", 6: "absent" },
  sphericity: { 1: "linear", 3: "ovoid", 5: "round" },
  margin: { 1: "poorly defined", 5: "sharp" },
  lobulation: { 1: "none", 5: "marked" },
  spiculation: { 1: "none", 5: "marked" },
  texture: { 1: "non-solid (ground glass)", 3: "part solid", 5: "solid" },
  malignancy: {
    1: "highly unlikely", 2: "moderately unlikely", 3: "indeterminate", 4: "moderately suspicious", 5: "highly suspicious",
  },
};
let series = null; // the DICOM series being viewed (uploaded, or opened from the PACS)
let lastQuery = null; // the last JSON search, asked again to store its answer in the PACS

async function api(url, options = {}) {
  const response = await fetch(url, options);
  const body = await response.json().catch(() => ({ error: `${response.status} ${response.statusText}` }));
  if (response.status === 401) showSignIn(true);
  if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
  return body;
}

// The body's type, said explicitly: the server takes only its declared types (a .npy file has none).
const UPLOAD_TYPES = { png: "image/png", zip: "application/zip" };

function uploadOptions(file) {
  const extension = file.name.split(".").pop().toLowerCase();
  return { method: "POST", body: file, headers: { "Content-Type": UPLOAD_TYPES[extension] || "application/octet-stream" } };
}

// --- signing in, when the server was started with a token

function showSignIn(visible) {
  $("sign-in").hidden = !visible;
  if (visible) $("token").focus();
}

async function signIn(event) {
  event.preventDefault();
  $("sign-in-error").textContent = "";
  try {
    await api("/api/session", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ token: $("token").value }),
    });
    $("token").value = "";
    showSignIn(false);
    loadLibrary();
  } catch (error) {
    $("sign-in-error").textContent = error.message;
  }
}

async function signOut() {
  await api("/api/session", { method: "DELETE" });
  location.reload();
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function number(value, digits) {
  return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
}

// A reader's rating: whole as read (4), a median between two ratings with its half (3.5).
function rating(value) {
  return value === null || value === undefined ? "–" : Number.isInteger(Number(value)) ? String(Number(value)) : Number(value).toFixed(1);
}

async function loadLibrary() {
  try {
    const session = await api("/api/session");
    $("sign-out").hidden = !(session.token_required && session.signed_in);
    if (session.token_required && !session.signed_in) {
      $("provenance").textContent = "sign in to search the library";
      showSignIn(true);
      return;
    }
    const library = await api("/api/library");
    const line = $("provenance");
    line.textContent =
      `index ${library.index_version} · model ${library.model_version} · ${library.nodules} nodules ` +
      `(${library.items} reader annotations) of ${library.patients} patients · ${library.bits}-bit codes`;
    $("pacs-open").hidden = !library.pacs;
    for (const [name, url] of Object.entries(library.dagster || {})) {
      line.append(" · ");
      const link = element("a", "", `${name} in Dagster`);
      link.href = url;
      line.append(link);
    }
    await loadNodules("");
  } catch (error) {
    $("provenance").textContent = error.message;
  }
}

async function loadNodules(text) {
  const list = await api(`/api/nodules?${new URLSearchParams({ q: text, limit: 500 })}`);
  const select = $("nodule-select");
  select.replaceChildren(
    ...list.nodules.map((nodule) => {
      const option = element("option", "", `${nodule.nodule_id} · ${LABELS[nodule.label]} · ${nodule.annotations} reader(s)`);
      option.value = nodule.nodule_id;
      return option;
    }),
  );
  if (select.options.length) select.selectedIndex = 0;
}

function options() {
  return { k: Number($("k").value), mode: $("mode").value };
}

async function search(request) {
  showError("");
  $("busy").hidden = false;
  try {
    render(await request());
  } catch (error) {
    showError(error.message);
  } finally {
    $("busy").hidden = true;
  }
}

function searchJson(query) {
  lastQuery = query;
  return search(() =>
    api("/api/search", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ ...query, ...options() }),
    }),
  );
}

function ratingList(characteristics) {
  const list = element("dl");
  for (const [key, name] of CHARACTERISTICS) {
    if (!(key in characteristics)) continue;
    const word = (SCALES[key] || {})[characteristics[key]];
    list.append(element("dt", "", name), element("dd", "", rating(characteristics[key]) + (word ? ` ${word}` : "")));
  }
  return list;
}

function facts(pairs) {
  const list = element("dl");
  for (const [name, value] of pairs) list.append(element("dt", "", name), element("dd", "", value));
  return list;
}

// A nodule hit folds its readers' annotations: their malignancy ratings, the matched one marked.
function readerRatings(readers) {
  return readers.map((reader) => rating(reader.malignancy) + (reader.matched && readers.length > 1 ? "*" : "")).join(" · ");
}

function hitCard(hit) {
  const label = LABELS[hit.label];
  const card = element("li", `card hit ${label}`);
  const picture = element("img");
  picture.src = hit.thumbnail_url;
  picture.alt = `ROI of ${hit.nodule_id}`;
  const title = element("div", "title");
  const badge = element("span", `badge ${label}`, `readers: ${label}`);
  badge.title = "the readers' malignancy rating of this annotation: 1-2 benign, 4-5 malignant (suspicion, not a diagnosis)";
  title.append(element("span", "", `#${hit.rank}`), badge);
  const ratings = element("details");
  ratings.append(element("summary", "", "readers' characteristics"), ratingList(hit.characteristics));
  const confirmed = hit.diagnosis
    ? element("p", "confirmed", `confirmed: ${hit.diagnosis.value} (${hit.diagnosis.method}${hit.diagnosis.level === "patient" ? ", the patient's diagnosis" : ""})`)
    : element("p", "confirmed unknown", "no confirmed diagnosis");
  card.append(
    picture,
    title,
    confirmed,
    facts([
      ["nodule", hit.nodule_id],
      ["patient", hit.patient_id],
      ["malignancy", rating(hit.malignancy)],
      ...(hit.readers ? [["readers", readerRatings(hit.readers)]] : []),
      ["Hamming", String(hit.hamming)],
      ["Euclidean", number(hit.euclidean, 3)],
      ...(hit.rating_distance !== null && hit.rating_distance !== undefined
        ? [["rating distance", number(hit.rating_distance, 3)]] : []),
    ]),
    ratings,
  );
  return card;
}

function render(answer) {
  const query = answer.query;
  $("store").hidden = !query.dicomweb;
  $("stored").textContent = answer.stored
    ? `stored in the study: report ${answer.stored.report_uid}, key images ${answer.stored.key_images_uid}`
    : "";
  const figure = $("query");
  figure.querySelector("img").src = query.picture;
  const predicted = LABELS[query.predicted_label];
  const what = { nodule: query.nodule_id, upload: query.name, series: `voxel ${query.voxel}`, image: "image" }[query.kind];
  const caption = figure.querySelector("figcaption");
  caption.replaceChildren(
    element("div", "title", `query: ${what}`),
    facts([
      ["predicted", predicted],
      ["p(malignant)", number(query.malignant_probability, 2)],
      ...(query.kind === "nodule" ? [["readers' label", LABELS[query.label]], ["patient", query.patient_id]] : []),
    ]),
  );
  if (query.predicted_characteristics) {
    const predictedRatings = element("details", "predicted");
    predictedRatings.append(
      element("summary", "", "characteristics, as the model predicts the readers would rate them"),
      ratingList(query.predicted_characteristics),
    );
    caption.append(predictedRatings);
  }
  figure.className = `card query ${predicted}`;
  $("hits").replaceChildren(...answer.hits.map(hitCard));
  $("fallback").hidden = !answer.class_fallback;
  const warnings = answer.warnings || [];
  $("warnings").replaceChildren(...warnings.map((warning) => element("li", warning.code, warning.message)));
  $("warnings").hidden = !warnings.length;
  $("results").hidden = false;
  if (!answer.hits.length) showError("no library nodule to show (the library holds only this patient's nodules?)");
}

// --- a DICOM series: upload, scroll, window, click

function sliceUrl() {
  const query = new URLSearchParams({ level: $("level").value, width: $("width").value });
  return `/api/series/${series.series_id}/slices/${$("slice").value}.png?${query}`;
}

function showSlice() {
  $("slice-image").src = sliceUrl();
  $("slice-number").textContent = `${Number($("slice").value) + 1} / ${series.slices}`;
  $("marker").hidden = true;
}

// Read a series on the server (an upload, or a fetch from the PACS), then show its middle slice.
async function openSeries(ask) {
  showError("");
  $("busy").hidden = false;
  try {
    series = await ask();
    $("slice").max = series.slices - 1;
    $("slice").value = Math.floor(series.slices / 2);
    $("viewer").hidden = false;
    showSlice();
  } catch (error) {
    showError(error.message);
  } finally {
    $("busy").hidden = true;
  }
}

function uploadSeries(file) {
  return openSeries(() => api(`/api/series?${new URLSearchParams({ filename: file.name })}`, uploadOptions(file)));
}

// --- the PACS: its studies, a study's series, one CT series opened like an upload

async function listPacsStudies() {
  showError("");
  try {
    const { studies } = await api("/api/pacs/studies");
    const rows = studies.map((study) => {
      const row = element("tr", "pacs-study", "");
      for (const text of [study.patient_id, formatDate(study.date), study.description || "—", study.instances]) {
        row.append(element("td", "", String(text)));
      }
      row.tabIndex = 0;
      row.addEventListener("click", () => listPacsSeries(study, row));
      return row;
    });
    $("pacs-studies").tBodies[0].replaceChildren(...rows);
    $("pacs-series").replaceChildren();
    $("pacs").hidden = false;
    if (!studies.length) showError("the PACS holds no CT study");
  } catch (error) {
    showError(error.message);
  }
}

function formatDate(date) {
  return /^\d{8}$/.test(date) ? `${date.slice(0, 4)}-${date.slice(4, 6)}-${date.slice(6)}` : date || "—";
}

async function listPacsSeries(study, row) {
  showError("");
  for (const other of row.parentNode.children) other.classList.toggle("chosen", other === row);
  try {
    const found = await api(`/api/pacs/studies/${encodeURIComponent(study.study_uid)}/series`);
    const ctFirst = [...found.series].sort((a, b) => (b.modality === "CT") - (a.modality === "CT"));
    const items = ctFirst.map((one) => {
      const item = element("li", "", "");
      const button = element("button", "", `${one.modality} · ${one.description || "series"} · ${one.instances} images`);
      button.type = "button";
      button.disabled = one.modality !== "CT";
      button.addEventListener("click", () => openSeries(() => api("/api/pacs/series", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ dicomweb: { study: study.study_uid, series: one.series_uid } }),
      })));
      item.append(button);
      return item;
    });
    $("pacs-series").replaceChildren(...items);
  } catch (error) {
    showError(error.message);
  }
}

function clickNodule(event) {
  const image = $("slice-image");
  const box = image.getBoundingClientRect();
  const row = Math.floor(((event.clientY - box.top) / box.height) * series.rows);
  const column = Math.floor(((event.clientX - box.left) / box.width) * series.columns);
  const marker = $("marker");
  marker.style.left = `${event.clientX - box.left}px`;
  marker.style.top = `${event.clientY - box.top}px`;
  marker.hidden = false;
  searchJson({ series_id: series.series_id, voxel: [row, column, Number($("slice").value)] });
}

function bind() {
  let filterTimer = null;
  $("nodule-filter").addEventListener("input", (event) => {
    clearTimeout(filterTimer);
    filterTimer = setTimeout(() => loadNodules(event.target.value).catch((error) => showError(error.message)), 200);
  });
  const searchNodule = () => {
    const nodule = $("nodule-select").value;
    if (nodule) searchJson({ nodule_id: nodule });
    else showError("pick a library nodule first");
  };
  $("nodule-search").addEventListener("click", searchNodule);
  $("nodule-select").addEventListener("dblclick", searchNodule);
  $("roi-file").addEventListener("change", (event) => {
    const file = event.target.files[0];
    if (!file) return;
    const query = new URLSearchParams({ filename: file.name, ...options() });
    search(() => api(`/api/search/upload?${query}`, uploadOptions(file)));
  });
  $("series-file").addEventListener("change", (event) => {
    if (event.target.files[0]) uploadSeries(event.target.files[0]);
  });
  for (const id of ["slice", "level", "width"]) $(id).addEventListener("input", () => series && showSlice());
  for (const button of document.querySelectorAll("[data-window]")) {
    button.addEventListener("click", () => {
      [$("level").value, $("width").value] = button.dataset.window.split(",");
      if (series) showSlice();
    });
  }
  $("slice-image").addEventListener("click", clickNodule);
  $("pacs-open").addEventListener("click", listPacsStudies);
  $("store-results").addEventListener("click", () => lastQuery && searchJson({ ...lastQuery, store_results: true }));
  $("sign-in").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", signOut);
}

bind();
loadLibrary();
