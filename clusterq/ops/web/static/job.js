// clusterq web: a bulk action's page updated in place from /live/jobs/<id> (server-sent
// events): each element marked data-job="field" gets that field's value, the progress
// bar its percent; when the job ended, the outcome counts fill the table and the stream
// is closed. Text only: values are set with textContent, never as HTML.
"use strict";
(function () {
  const box = document.getElementById("job");
  if (!box) return;
  const root = document.body.dataset.root || "";
  const status = document.getElementById("live");
  if (box.dataset.status !== "running") return;
  const source = new EventSource(root + "/live/jobs/" + encodeURIComponent(box.dataset.jobId));
  source.onmessage = function (message) {
    const job = JSON.parse(message.data);
    for (const element of box.querySelectorAll("[data-job]")) {
      const value = job[element.dataset.job];
      element.textContent = value === null || value === undefined ? "" : String(value);
    }
    const bar = document.getElementById("job-progress");
    if (bar) bar.value = job.percent;
    box.dataset.status = job.status;
    if (job.status !== "running") {
      source.close();
      const body = box.querySelector("#outcome tbody");
      const rows = [];
      for (const name of Object.keys(job.counts)) {
        const row = document.createElement("tr");
        row.className = "outcome";
        row.dataset.status = name;
        for (const text of [name, String(job.counts[name])]) {
          const cell = document.createElement("td");
          cell.textContent = text;
          row.appendChild(cell);
        }
        rows.push(row);
      }
      body.replaceChildren(...rows);
      const summary = document.getElementById("summary");
      if (summary && job.done !== null) summary.hidden = false;
    }
    if (status) status.textContent = "live: updated " + new Date().toLocaleTimeString();
  };
  source.onerror = function () {
    if (status && box.dataset.status === "running") status.textContent = "live: reconnecting";
  };
})();
