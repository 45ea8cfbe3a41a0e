"""The page at `/`: drop an image (or pick one), see the classes the server answers. One
self-contained document (inline CSS and script, nothing fetched from elsewhere) that
talks to this server's own `POST /predict` and `GET /info`."""

from __future__ import annotations

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>vision_tl serve</title>
<style>
body{font:15px/1.4 system-ui,sans-serif;margin:24px auto;max-width:720px;color:#222}
h1{margin:0 0 4px;font-size:22px} #model{color:#666;margin-bottom:16px;word-break:break-all}
#drop{border:2px dashed #999;border-radius:8px;padding:36px;text-align:center;cursor:pointer}
#drop.over{border-color:#2a6;background:#efe}
#preview{max-width:320px;max-height:320px;display:none;margin:16px auto}
#answer{margin-top:16px} .error{color:#b00;font-weight:bold}
table{border-collapse:collapse;margin-top:8px} td,th{border:1px solid #ddd;padding:4px 10px}
td.p{text-align:right;font-variant-numeric:tabular-nums}
.bar{height:10px;background:#2a6;display:inline-block;vertical-align:middle}
</style>
</head>
<body>
<h1>vision_tl serve</h1>
<div id="model">loading the model's description...</div>
<label id="drop">Drop an image here, or click to choose one
<input id="file" type="file" accept="image/*" hidden></label>
<img id="preview" alt="the image sent">
<div id="answer" aria-live="polite"></div>
<script>
const drop = document.getElementById("drop");
const input = document.getElementById("file");
const answer = document.getElementById("answer");
const preview = document.getElementById("preview");

fetch("info").then((r) => r.json()).then((info) => {
  const m = info.model;
  document.getElementById("model").textContent =
    `${m.backbones.join(" + ")} - classes: ${m.classes.join(", ")} - ` +
    `version ${m.version} - ${m.precision}`;
});

function cell(row, text, cls) {
  const td = row.insertCell();
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

function show(result) {
  answer.replaceChildren();
  const head = document.createElement("p");
  head.id = "label";
  head.textContent = result.unknown
    ? `${result.label} (no class above the threshold)`
    : `${result.label} (${(100 * result.confidence).toFixed(1)}%)`;
  answer.appendChild(head);
  const table = document.createElement("table");
  table.id = "top";
  for (const t of result.top_k) {
    const row = table.insertRow();
    cell(row, t.label);
    cell(row, t.prob.toFixed(4), "p");
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = `${Math.round(200 * t.prob)}px`;
    cell(row, "").appendChild(bar);
  }
  answer.appendChild(table);
}

async function send(file) {
  preview.src = URL.createObjectURL(file);
  preview.style.display = "block";
  answer.textContent = "...";
  const body = new FormData();
  body.append("file", file, file.name);
  try {
    const response = await fetch("predict", { method: "POST", body });
    const data = await response.json();
    if (!response.ok) {
      answer.innerHTML = "";
      const p = document.createElement("p");
      p.id = "error";
      p.className = "error";
      p.textContent = `${response.status}: ${data.detail}`;
      answer.appendChild(p);
      return;
    }
    show(data.predictions[0]);
  } catch (err) {
    answer.textContent = `request failed: ${err}`;
  }
}

input.addEventListener("change", () => input.files.length && send(input.files[0]));
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files.length) send(e.dataTransfer.files[0]);
});
</script>
</body>
</html>
"""
