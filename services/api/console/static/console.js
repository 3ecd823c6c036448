// The console's only script: it refreshes the live parts of a page from the JSON the server
// renders them from, once a second, without reloading. Everything else is server-rendered.
"use strict";

const REFRESH_MS = 1000;

function setText(root, key, value) {
  for (const node of root.querySelectorAll(`[data-live="${key}"]`)) {
    const text = value === null || value === undefined ? "-" : String(value);
    if (node.textContent !== text) node.textContent = text;
  }
}

function showCycle(state) {
  const cycle = state.cycle;
  setText(document, "loop", state.paused ? "paused" : "running");
  setText(document, "open_tasks", state.open_tasks);
  if (!cycle) return;
  setText(document, "number", cycle.number);
  setText(document, "stage", cycle.stage);
  setText(document, "eta", cycle.eta_s === null ? null : Math.round(cycle.eta_s));
  setText(document, "updated_at", cycle.updated_at);
  const bar = document.querySelector('[data-live="progress"]');
  if (bar) {
    const training = cycle.epochs !== null;
    bar.max = training ? cycle.epochs : cycle.chunks_total || 1;
    bar.value = training ? cycle.epoch : cycle.chunks_done;
  }
}

function showProjects(glances) {
  for (const glance of glances) {
    const row = document.querySelector(`tr[data-project="${CSS.escape(glance.name)}"]`);
    if (!row) continue;
    const cycle = glance.cycle;
    const fields = {
      loop: glance.paused ? "paused" : "running",
      cycle: cycle ? `#${cycle.number} ${cycle.stage}` : "none yet",
      open_tasks: glance.open_tasks,
    };
    for (const [key, value] of Object.entries(fields)) {
      const cell = row.querySelector(`[data-field="${key}"]`);
      if (cell && cell.textContent !== String(value)) cell.textContent = String(value);
    }
  }
}

function poll(url, show) {
  let stopped = false;
  async function tick() {
    if (stopped) return;
    try {
      const response = await fetch(url, { credentials: "same-origin", cache: "no-store" });
      if (response.status === 401) {
        stopped = true; // signed out elsewhere: the next navigation shows the form
        return;
      }
      if (response.ok) show(await response.json());
    } catch (error) {
      // The API restarting: keep the last view and try again on the next tick.
    }
    setTimeout(tick, REFRESH_MS);
  }
  setTimeout(tick, REFRESH_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  const live = document.body.dataset.liveUrl;
  if (live) poll(live, showCycle);
  const projects = document.body.dataset.liveProjects;
  if (projects) poll(projects, showProjects);
});
