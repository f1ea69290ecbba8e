// The chat page: keeps the conversation in OpenAI's message format, sends it to
// /v1/chat/completions with stream: true and shows the answer as its events arrive.
"use strict";

const $ = (id) => document.getElementById(id);
const SETTINGS = ["system", "temperature", "top_p", "top_k", "repetition_penalty", "max_tokens", "seed", "api_key"];

let messages = [];       // the conversation sent with every question
let pending = [];        // data URLs of images attached to the next question
let controller = null;   // aborts the answer being streamed
let modelId = null;

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

function setStatus(text) { $("status").textContent = text; }

function busy(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
}

function scrollDown() {
  const c = $("conversation");
  c.scrollTop = c.scrollHeight;
}

function bubble(role, text, images) {
  $("empty").hidden = true;
  const node = el("div", "message " + role);
  for (const url of images || []) {
    const img = el("img");
    img.src = url;
    img.alt = "attached image";
    node.appendChild(img);
  }
  node.appendChild(el("span", "text", text));
  $("conversation").appendChild(node);
  scrollDown();
  return node;
}

// ------------------------------------------------------------------ images
function attachFiles(files) {
  for (const file of files) {
    if (!file.type.startsWith("image/")) continue;
    const reader = new FileReader();
    reader.onload = () => { pending.push(reader.result); showAttachments(); };
    reader.readAsDataURL(file);
  }
}

function showAttachments() {
  const box = $("attachments");
  box.replaceChildren();
  pending.forEach((url, i) => {
    const fig = el("figure");
    const img = el("img");
    img.src = url;
    img.alt = "image " + (i + 1);
    const remove = el("button", "", "\u00d7");
    remove.type = "button";
    remove.title = "Remove";
    remove.onclick = () => { pending.splice(i, 1); showAttachments(); };
    fig.append(img, remove);
    box.appendChild(fig);
  });
}

// ------------------------------------------------------------------ settings
function loadSettings() {
  for (const name of SETTINGS) {
    const saved = localStorage.getItem("mlx_llama3v." + name);
    if (saved !== null) $(name).value = saved;
    $(name).addEventListener("change", () => localStorage.setItem("mlx_llama3v." + name, $(name).value));
  }
}

function number(name) {
  const v = $(name).value.trim();
  return v === "" ? undefined : Number(v);
}

function requestBody() {
  const system = $("system").value.trim();
  const body = {
    model: modelId,
    messages: system ? [{ role: "system", content: system }, ...messages] : messages,
    stream: true,
    stream_options: { include_usage: true },
  };
  for (const name of ["temperature", "top_p", "top_k", "repetition_penalty", "max_tokens", "seed"]) {
    const v = number(name);
    if (v !== undefined && !Number.isNaN(v)) body[name] = v;
  }
  return body;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

// ------------------------------------------------------------------ talking to the server
async function loadModel() {
  try {
    const r = await fetch("/health");
    const info = await r.json();
    modelId = info.model;
    $("model").textContent = info.model;
  } catch (e) {
    setStatus("the server cannot be reached: " + e);
  }
}

async function send(event) {
  event.preventDefault();
  const question = $("prompt").value.trim();
  if (!question || controller) return;
  const images = pending;
  pending = [];
  showAttachments();
  $("prompt").value = "";
  const content = images.map((url) => ({ type: "image_url", image_url: { url } }));
  content.push({ type: "text", text: question });
  messages.push({ role: "user", content });
  bubble("user", question, images);
  await answer();
}

async function answer() {
  const node = bubble("assistant streaming", "");
  const text = node.querySelector(".text");
  controller = new AbortController();
  busy(true);
  setStatus("thinking...");
  let reply = "", usage = null, finish = null, failed = false;
  const started = performance.now();
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody()), signal: controller.signal,
    });
    if (!r.ok) {
      const err = await r.json().catch(() => ({}));
      throw new Error((err.error && err.error.message) || ("HTTP " + r.status));
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, cut).trim();
        buffer = buffer.slice(cut + 2);
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") continue;
        const event = JSON.parse(data);
        if (event.error) throw new Error(event.error.message);
        if (event.usage) usage = event.usage;
        for (const choice of event.choices || []) {
          if (choice.delta && choice.delta.content) {
            reply += choice.delta.content;
            text.textContent = reply;
            scrollDown();
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
        if (reply) setStatus("answering...");
      }
    }
  } catch (e) {
    if (e.name === "AbortError") {
      finish = "stopped";
    } else {
      failed = true;
      node.className = "message error";
      text.textContent = (reply ? reply + "\n\n" : "") + "error: " + e.message;
    }
  } finally {
    controller = null;
    busy(false);
    node.classList.remove("streaming");
  }
  if (failed) {
    messages.pop();  // the question that failed is not part of the conversation
    setStatus("");
    return;
  }
  messages.push({ role: "assistant", content: reply });
  const seconds = ((performance.now() - started) / 1000).toFixed(1);
  const parts = [finish === "stopped" ? "stopped" : "done", seconds + " s"];
  if (usage) {
    const cached = usage.prompt_tokens_details ? usage.prompt_tokens_details.cached_tokens : 0;
    parts.push(`${usage.prompt_tokens} prompt tokens (${cached} cached)`, `${usage.completion_tokens} answer tokens`);
  }
  if (finish === "length") parts.push("cut at max tokens");
  node.appendChild(el("span", "meta", parts.join(" \u00b7 ")));
  setStatus("");
}

function stop() {
  if (controller) controller.abort();
}

function newChat() {
  stop();
  messages = [];
  pending = [];
  showAttachments();
  $("conversation").querySelectorAll(".message").forEach((n) => n.remove());
  $("empty").hidden = false;
  setStatus("");
  $("prompt").focus();
}

// ------------------------------------------------------------------ wiring
function main() {
  loadSettings();
  loadModel();
  $("composer").addEventListener("submit", send);
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", newChat);
  $("file").addEventListener("change", (e) => { attachFiles(e.target.files); e.target.value = ""; });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
  });
  document.addEventListener("paste", (e) => {
    const files = [...(e.clipboardData ? e.clipboardData.files : [])];
    if (files.length) { e.preventDefault(); attachFiles(files); }
  });
  const drop = $("layout");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); $("conversation").classList.add("dragging"); });
  drop.addEventListener("dragleave", () => $("conversation").classList.remove("dragging"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    $("conversation").classList.remove("dragging");
    attachFiles(e.dataTransfer.files);
  });
}

main();
