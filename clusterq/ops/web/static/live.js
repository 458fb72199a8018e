// clusterq web: the overview's rows updated in place from /live/queues (server-sent
// events; one poll on the server, shared by every open page). Text only: values are
// set with textContent, never as HTML.
"use strict";
(function () {
  const root = document.body.dataset.root || "";
  const status = document.getElementById("live");
  const fields = ["pending", "scheduled", "retry", "active", "archived", "processed", "failed", "latency"];
  const source = new EventSource(root + "/live/queues");
  source.onmessage = function (message) {
    const data = JSON.parse(message.data);
    if (!Array.isArray(data)) {
      if (status) status.textContent = "live: " + (data.error || "error");
      return;
    }
    for (const q of data) {
      for (const row of document.querySelectorAll("tr.queue")) {
        if (row.dataset.queue !== q.queue) continue;
        for (const name of fields) {
          const cell = row.querySelector('td[data-field="' + name + '"]');
          if (cell && q[name] !== undefined) {
            cell.textContent = name === "latency" ? String(Math.round(q[name] * 1000) / 1000) : String(q[name]);
          }
        }
      }
    }
    if (status) status.textContent = "live: updated " + new Date().toLocaleTimeString();
  };
  source.onerror = function () {
    if (status) status.textContent = "live: reconnecting";
  };
})();
