// The avatarforge API's page: upload selfies, train, watch, render a style pack.
// Plain script, no build step, nothing from elsewhere; every text is set as text, never markup.
"use strict";

const $ = (id) => document.getElementById(id);
let training = null; // the current training's id
let sheetShown = false;

function key() {
  return $("key").value.trim();
}

function user() {
  return $("user").value.trim();
}

async function api(method, path, body, isForm) {
  const headers = { Authorization: "Bearer " + key() };
  if (body !== undefined && !isForm) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : isForm ? body : JSON.stringify(body),
  });
  const type = response.headers.get("Content-Type") || "";
  const data = type.includes("application/json") ? await response.json() : await response.blob();
  if (!response.ok) {
    const error = new Error((data && data.error) || "HTTP " + response.status);
    error.status = response.status;
    error.retryAfter = Number(response.headers.get("Retry-After") || 0);
    throw error;
  }
  return data;
}

function item(list, text, rejected) {
  const li = document.createElement("li");
  li.textContent = text;
  if (rejected) li.className = "rejected";
  list.append(li);
}

async function loadOptions() {
  sessionStorage.setItem("avatarforge-key", key());
  try {
    const found = await api("GET", "/v1/packs");
    const select = $("pack");
    const chosen = select.value;
    select.replaceChildren();
    for (const pack of found.packs) {
      const option = new Option(pack.name + " (" + pack.avatars + ")", pack.name);
      option.selected = pack.name === chosen;
      select.append(option);
    }
  } catch (error) {
    $("upload-status").textContent = error.message;
  }
}

async function upload(files) {
  if (!files.length) return;
  const form = new FormData();
  for (const file of files) form.append("photos", file, file.name);
  $("upload-status").textContent = "uploading " + files.length + " photo(s)...";
  $("upload-list").replaceChildren();
  try {
    const answer = await api("POST", "/v1/users/" + encodeURIComponent(user()) + "/photos", form, true);
    for (const name of answer.stored) item($("upload-list"), "stored " + name, false);
    for (const r of answer.rejected) item($("upload-list"), r.file + ": " + r.reason, true);
    $("upload-status").textContent = answer.photos + " photo(s) stored for " + answer.user;
    $("train").disabled = false;
  } catch (error) {
    $("upload-status").textContent = error.message;
  }
}

async function train() {
  $("train").disabled = true;
  sheetShown = false;
  $("failure").textContent = "";
  $("gallery").replaceChildren();
  try {
    const view = await api("POST", "/v1/trainings", { user: user(), preset: $("preset").value });
    training = view.id;
    show(view);
    setTimeout(poll, 1000);
  } catch (error) {
    $("failure").textContent = error.message;
    $("train").disabled = false;
  }
}

async function poll() {
  let view;
  try {
    view = await api("GET", "/v1/trainings/" + encodeURIComponent(training));
  } catch (error) {
    $("failure").textContent = error.message;
    setTimeout(poll, (error.retryAfter || 3) * 1000);
    return;
  }
  show(view);
  if (view.state === "succeeded") {
    $("train").disabled = false;
    render();
  } else if (view.state === "failed") {
    $("train").disabled = false;
  } else {
    setTimeout(poll, 2000);
  }
}

function show(view) {
  $("state").textContent = view.state;
  const p = view.progress;
  $("stage").textContent = p.stage + (p.total ? " (step " + p.step + " of " + p.total + ")" : "");
  $("progress").value = p.fraction;
  if (view.failure) {
    const whose = view.failure.client_fault ? "the request or photos must change" : "ours; try again";
    $("failure").textContent = view.failure.reason + " (" + whose + ")";
  }
  if (view.photos) {
    const list = $("photo-reasons");
    list.replaceChildren();
    for (const name of view.photos.kept || []) item(list, "kept " + name, false);
    for (const r of view.photos.rejected || []) item(list, r.source + ": " + r.reason, true);
  }
  if (view.contact_sheet && !sheetShown) {
    sheetShown = true;
    api("GET", view.contact_sheet).then((blob) => {
      $("sheet").src = URL.createObjectURL(blob);
      $("sheet").hidden = false;
    }, () => { sheetShown = false; });
  }
}

function genArgs() {
  const text = $("gen-args").value.trim();
  return text ? JSON.parse(text) : undefined;
}

async function render() {
  const body = { user: user(), pack: $("pack").value, gen_args: genArgs() };
  $("gallery-status").textContent = "rendering the " + body.pack + " pack...";
  let answer;
  for (;;) {
    try {
      answer = await api("POST", "/v1/predictions", body);
      break;
    } catch (error) {
      if (error.status !== 503) {
        $("gallery-status").textContent = error.message;
        return;
      }
      $("gallery-status").textContent = "the model is loading; retrying in " + error.retryAfter + " s";
      await new Promise((done) => setTimeout(done, (error.retryAfter || 5) * 1000));
    }
  }
  const gallery = $("gallery");
  gallery.replaceChildren();
  for (const avatar of answer.avatars) {
    for (const jpeg of avatar.images) {
      const figure = document.createElement("figure");
      const img = document.createElement("img");
      img.alt = avatar.style + " x " + avatar.framing;
      img.src = "data:image/jpeg;base64," + jpeg;
      const caption = document.createElement("figcaption");
      caption.textContent = avatar.style + " x " + avatar.framing + ": " + avatar.prompt;
      figure.append(img, caption);
      gallery.append(figure);
    }
  }
  $("gallery-status").textContent = gallery.children.length + " avatars";
}

addEventListener("DOMContentLoaded", () => {
  $("key").value = sessionStorage.getItem("avatarforge-key") || "";
  $("key").addEventListener("change", loadOptions);
  if (key()) loadOptions();
  $("files").addEventListener("change", (event) => upload([...event.target.files]));
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    upload([...event.dataTransfer.files]);
  });
  $("train").addEventListener("click", train);
});
