"""The review page: one self-contained HTML document; its script asks /api/assets and posts
each decision to /api/decide."""

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>batcher review</title>
<style>
body{font-family:system-ui,sans-serif;margin:1rem 1.5rem;background:#fafafa;color:#222}
h1{font-size:1.3rem;margin:.2rem 0}
.help{color:#666;font-size:.85rem;margin-bottom:1rem}
.asset{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.5rem;margin:.6rem 0}
.asset h2{font-size:1rem;margin:.1rem 0 .4rem}.asset h2 .state{color:#888;font-weight:normal}
.variants{display:flex;flex-wrap:wrap;gap:.5rem}
.variant{width:168px;border:3px solid transparent;border-radius:6px;padding:2px;cursor:pointer;
  position:relative;background:#f4f4f4}
.variant img{width:160px;height:160px;object-fit:cover;display:block;background:#eee}
.variant pre{width:160px;height:160px;overflow:hidden;white-space:pre-wrap;font-size:.7rem;
  margin:0}
.variant .label{font-size:.75rem;color:#555;padding:.15rem 0}
.variant.focus{border-color:#36c}
.variant.picked{outline:3px solid #2a2;outline-offset:1px}
.variant.chosen .label::after{content:" \\2190 published";color:#2a2}
.variant.rejected{opacity:.35}.variant.rejected .label::after{content:" rejected";color:#a00}
.variant.missing .label::after{content:" not ok";color:#a00}
body.undecided .asset.decided{display:none}
</style></head>
<body>
<h1>batcher review</h1>
<div class="help">Click or <b>P</b>: pick. <b>X</b>: reject (again: take back).
Arrow keys: move. <b>U</b>: <label><input type="checkbox" id="undecided"> only undecided
</label>. Each decision is written to the picks file at once.</div>
<div id="assets"></div>
<script>
"use strict";
let assets = [];
let focus = {a: 0, v: 0};

function visible() {
  const only = document.body.classList.contains("undecided");
  return assets.map((a, i) => i).filter(i => !only || !assets[i].decided);
}

function cell(asset, ai, variant, vi) {
  const div = document.createElement("div");
  div.className = "variant";
  for (const flag of ["picked", "rejected", "chosen"]) {
    if (variant[flag]) div.classList.add(flag);
  }
  if (!variant.ok) div.classList.add("missing");
  if (focus.a === ai && focus.v === vi) div.classList.add("focus");
  div.dataset.asset = asset.name;
  div.dataset.variant = String(vi);
  div.title = asset.name + ": " + variant.label;
  if (variant.thumb) {
    const img = document.createElement("img");
    img.loading = "lazy";
    img.src = variant.thumb;
    img.alt = asset.name + " " + variant.label;
    div.appendChild(img);
  } else {
    const pre = document.createElement("pre");
    pre.textContent = variant.text || "(not ok)";
    div.appendChild(pre);
  }
  const label = document.createElement("div");
  label.className = "label";
  label.textContent = variant.label;
  div.appendChild(label);
  div.addEventListener("click", () => { focus = {a: ai, v: vi}; decide("pick"); });
  return div;
}

function render() {
  const root = document.getElementById("assets");
  root.replaceChildren();
  assets.forEach((asset, ai) => {
    const box = document.createElement("section");
    box.className = "asset" + (asset.decided ? " decided" : "");
    box.dataset.name = asset.name;
    const head = document.createElement("h2");
    head.textContent = asset.name + " ";
    const state = document.createElement("span");
    state.className = "state";
    state.textContent = asset.decided ? "picked" : "undecided";
    head.appendChild(state);
    box.appendChild(head);
    const row = document.createElement("div");
    row.className = "variants";
    asset.variants.forEach((v, vi) => row.appendChild(cell(asset, ai, v, vi)));
    box.appendChild(row);
    root.appendChild(box);
  });
  const focused = document.querySelector(".variant.focus");
  if (focused) focused.scrollIntoView({block: "nearest"});
}

async function load() {
  const answer = await fetch("/api/assets");
  assets = (await answer.json()).assets;
  render();
}

// Decisions go one at a time, in the order they were made, each for the asset and variant in
// focus when its key was pressed; an answer updates the asset it is for, wherever the focus is.
let queue = Promise.resolve();

function decide(action) {
  const asset = assets[focus.a];
  if (!asset) return;
  const name = asset.name, variant = focus.v;
  queue = queue.then(() => send(name, variant, action)).catch(() => {});
}

async function send(name, variant, action) {
  const answer = await fetch("/api/decide", {method: "POST",
    headers: {"Content-Type": "application/json"},
    body: JSON.stringify({asset: name, variant: variant, action: action})});
  if (answer.ok) {
    const updated = await answer.json();
    const at = assets.findIndex(a => a.name === updated.name);
    if (at >= 0) assets[at] = updated;
    render();
    document.body.dataset.saved = String(Number(document.body.dataset.saved || 0) + 1);
  }
}

function move(da, dv) {
  const shown = visible();
  if (!shown.length) return;
  let at = shown.indexOf(focus.a);
  if (at < 0) at = 0;
  at = Math.max(0, Math.min(shown.length - 1, at + da));
  const a = shown[at];
  const count = assets[a].variants.length;
  const v = da ? Math.min(focus.v, count - 1) : Math.max(0, Math.min(count - 1, focus.v + dv));
  focus = {a: a, v: v};
  render();
}

function setUndecided(on) {
  document.body.classList.toggle("undecided", on);
  document.getElementById("undecided").checked = on;
  move(0, 0);
}

document.getElementById("undecided").addEventListener("change",
  (event) => setUndecided(event.target.checked));
document.addEventListener("keydown", (event) => {
  if (event.target instanceof HTMLInputElement) return;
  const key = event.key;
  if (key === "ArrowRight") move(0, 1);
  else if (key === "ArrowLeft") move(0, -1);
  else if (key === "ArrowDown") move(1, 0);
  else if (key === "ArrowUp") move(-1, 0);
  else if (key === "p" || key === "P") decide("pick");
  else if (key === "x" || key === "X") decide("reject");
  else if (key === "u" || key === "U") setUndecided(!document.body.classList.contains("undecided"));
  else return;
  event.preventDefault();
});
load();
</script>
</body></html>
"""
