// clusterq web: the overview updated in place from /live/queues (server-sent events; one
// poll on the server, shared by every open page). Counts change in their cells; a queue
// whose slot moved to another master (a failover) moves to that master's table, made if
// needed; each table's caption is counted again. Text only: values are set with
// textContent, never as HTML.
"use strict";
(function () {
  const root = document.body.dataset.root || "";
  const status = document.getElementById("live");
  const fields = ["pending", "scheduled", "retry", "active", "archived", "processed", "failed", "latency"];

  function tableOf(master, like) {
    for (const table of document.querySelectorAll("table.master")) {
      if (table.dataset.master === master) return table;
    }
    const table = like.cloneNode(true);  // the same columns, no rows
    table.dataset.master = master;
    table.querySelector("tbody").replaceChildren();
    like.parentNode.insertBefore(table, like);
    return table;
  }

  function recount(byMaster) {
    for (const table of document.querySelectorAll("table.master")) {
      const rows = table.querySelectorAll("tr.queue");
      if (rows.length === 0) { table.remove(); continue; }
      const sums = byMaster[table.dataset.master] || {pending: 0, active: 0, archived: 0};
      table.querySelector("caption").textContent = table.dataset.master + " — " + rows.length +
        " queue(s), " + sums.pending + " pending, " + sums.active + " active, " +
        sums.archived + " archived";
    }
  }

  const source = new EventSource(root + "/live/queues");
  source.onmessage = function (message) {
    const data = JSON.parse(message.data);
    if (!Array.isArray(data)) {
      if (status) status.textContent = "live: " + (data.error || "error");
      return;
    }
    const byMaster = {};
    for (const q of data) {
      const master = q.master || "(no master)";
      const sums = byMaster[master] || (byMaster[master] = {pending: 0, active: 0, archived: 0});
      sums.pending += q.pending; sums.active += q.active; sums.archived += q.archived;
      for (const row of document.querySelectorAll("tr.queue")) {
        if (row.dataset.queue !== q.queue) continue;
        for (const name of fields) {
          const cell = row.querySelector('td[data-field="' + name + '"]');
          if (cell && q[name] !== undefined) {
            cell.textContent = name === "latency" ? String(Math.round(q[name] * 1000) / 1000) : String(q[name]);
          }
        }
        const shown = row.dataset.master;
        if (q.master && shown !== q.master) {
          row.dataset.master = q.master;
          tableOf(q.master, row.closest("table")).querySelector("tbody").appendChild(row);
        }
      }
    }
    recount(byMaster);
    if (status) status.textContent = "live: updated " + new Date().toLocaleTimeString();
  };
  source.onerror = function () {
    if (status) status.textContent = "live: reconnecting";
  };
})();
