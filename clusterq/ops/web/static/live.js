// clusterq web: live pages from server-sent events (one poll on the server, shared by
// every open page). The overview (/live/queues): counts change in their cells; a queue
// whose slot moved to another master (a failover) moves to that master's table, made if
// needed; each table's caption is counted again. The timeline (/live/timeline): new
// entries appear at the top. Text only: values are set with textContent, never as HTML.
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

  function two(n) { return (n < 10 ? "0" : "") + n; }

  function clock(at) {
    const d = new Date(at * 1000);
    return d.getFullYear() + "-" + two(d.getMonth() + 1) + "-" + two(d.getDate()) + " " +
      two(d.getHours()) + ":" + two(d.getMinutes()) + ":" + two(d.getSeconds());
  }

  function timeline(entries) {
    const body = document.querySelector("#timeline tbody");
    if (!body) return;
    const known = new Set(Array.from(body.querySelectorAll("tr.entry"), (r) => r.dataset.id));
    for (const e of entries.slice().reverse()) {  // newest first: the oldest new one first
      if (known.has(e.id)) continue;
      const row = document.createElement("tr");
      row.className = "entry";
      row.dataset.id = e.id;
      row.dataset.event = e.event;
      const cells = [clock(e.at), e.event, e.message, (e.queues || []).join(", "),
        e.duration === null || e.duration === undefined ? "" : e.duration.toFixed(2)];
      cells.forEach(function (text, i) {
        const cell = document.createElement("td");
        if (i < 4) cell.className = "text";
        cell.textContent = text;
        row.appendChild(cell);
      });
      body.insertBefore(row, body.firstChild);
    }
    const empty = document.getElementById("empty");
    if (empty && body.querySelector("tr.entry")) empty.hidden = true;
  }

  const kind = document.body.dataset.live;
  const source = new EventSource(root + "/live/" + kind);
  source.onmessage = function (message) {
    const data = JSON.parse(message.data);
    if (!Array.isArray(data)) {
      if (status) status.textContent = "live: " + (data.error || "error");
      return;
    }
    if (kind === "timeline") {
      timeline(data);
      if (status) status.textContent = "live: updated " + new Date().toLocaleTimeString();
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
