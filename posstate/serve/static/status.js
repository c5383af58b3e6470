// posstate status page: one snapshot, then live updates over the WebSocket. No framework, no build step.
"use strict";
(function () {
  const state = { positions: new Map(), orders: new Map(), metadata: new Map(), version: null };
  const $ = (id) => document.getElementById(id);

  function cell(row, text, num) {
    const td = document.createElement("td");
    td.textContent = text === undefined || text === null ? "-" : String(text);
    if (num) td.className = "num";
    row.appendChild(td);
  }

  function renderPositions(flashKey) {
    const body = $("positions").tBodies[0];
    body.replaceChildren();
    [...state.positions.keys()].sort().forEach((key) => {
      const p = state.positions.get(key);
      const row = document.createElement("tr");
      row.dataset.key = key;
      if (key === flashKey) row.className = "flash";
      cell(row, p.symbol); cell(row, p.side);
      cell(row, p.contracts, true); cell(row, p.entry_price, true); cell(row, p.mark_price, true);
      cell(row, p.unrealized_pnl, true); cell(row, p.leverage, true);
      body.appendChild(row);
    });
    $("positions-empty").hidden = state.positions.size > 0;
  }

  function renderOrders() {
    const body = $("orders").tBodies[0];
    body.replaceChildren();
    [...state.orders.values()].sort((a, b) => (a.id < b.id ? -1 : 1)).forEach((o) => {
      const row = document.createElement("tr");
      cell(row, o.id); cell(row, o.symbol); cell(row, o.side); cell(row, o.type); cell(row, o.status);
      cell(row, o.amount, true); cell(row, o.filled, true); cell(row, o.price, true);
      body.appendChild(row);
    });
    $("orders-empty").hidden = state.orders.size > 0;
  }

  function renderPairs(dl, pairs) {
    dl.replaceChildren();
    pairs.forEach(([k, v]) => {
      const dt = document.createElement("dt"); dt.textContent = k;
      const dd = document.createElement("dd"); dd.textContent = v;
      dl.append(dt, dd);
    });
  }

  function renderMetadata() {
    renderPairs($("metadata"), [...state.metadata.keys()].sort().map((s) => [s, JSON.stringify(state.metadata.get(s))]));
  }

  function setVersion(v) {
    state.version = v;
    $("version").textContent = "version " + v;
  }

  function setBalance(b) {
    $("balance").textContent = b === null || b === undefined ? "" : "balance " + b;
  }

  function applySnapshot(m) {
    state.positions = new Map(Object.entries(m.positions).map(([k, e]) => [k, e.position]));
    state.orders = new Map(Object.entries(m.orders));
    state.metadata = new Map(Object.entries(m.symbol_metadata).map(([s, e]) => [s, e.data]));
    setVersion(m.version);
    setBalance(m.balances.wallet);
    renderPositions(); renderOrders(); renderMetadata();
  }

  // One change into the state; returns what to redraw ("positions", "orders", "metadata").
  function change(m, redraw) {
    switch (m.topic) {
      case "position.update":
        if (m.position) state.positions.set(m.key, m.position); else state.positions.delete(m.key);
        redraw.positions = m.key; break;
      case "order.update": state.orders.set(m.id, m.order); redraw.orders = true; break;
      case "order.closed": state.orders.delete(m.id); redraw.orders = true; break;
      case "metadata.update":
        if (m.data) state.metadata.set(m.symbol, m.data); else state.metadata.delete(m.symbol);
        redraw.metadata = true; break;
      case "balance.update": if (m.name === "wallet") setBalance(m.balance); break;
      default: break;
    }
  }

  function apply(m) {
    if (m.topic === "snapshot") { applySnapshot(m); return; }
    if (m.topic === "resync") return; // the server closes; we reconnect and get a fresh snapshot
    // changes arrive in batches (one per poll of the server, in order): apply all, then redraw once
    const redraw = {};
    (m.topic === "batch" ? m.messages : [m]).forEach((x) => change(x, redraw));
    if (redraw.positions !== undefined) renderPositions(redraw.positions);
    if (redraw.orders) renderOrders();
    if (redraw.metadata) renderMetadata();
    if (typeof m.version === "number") setVersion(m.version);
  }

  function conn(text, ok) {
    const el = $("conn");
    el.textContent = text; el.dataset.state = text;
    el.className = "badge " + (ok ? "ok" : "bad");
  }

  let retry = 500;
  function connect() {
    const ws = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/api/account/stream");
    let beat = null;
    ws.onopen = () => {
      retry = 500; conn("live", true);
      beat = setInterval(() => ws.send('{"type":"heartbeat"}'), 10000);
    };
    ws.onmessage = (ev) => apply(JSON.parse(ev.data));
    ws.onclose = () => {
      clearInterval(beat); conn("reconnecting", false);
      setTimeout(connect, retry); retry = Math.min(retry * 2, 10000);
    };
  }

  function age(s) {
    if (s === null || s === undefined) return "-";
    if (s < 120) return Math.round(s) + " s ago";
    if (s < 7200) return Math.round(s / 60) + " min ago";
    return Math.round(s / 3600) + " h ago";
  }

  async function refresh() {
    try {
      const h = await (await fetch("/api/health", { cache: "no-store" })).json();
      const badge = $("health");
      badge.textContent = "health: " + h.status;
      badge.className = "badge " + (h.status === "ok" ? "ok" : "bad");
      const lag = h.replica.configured ? age(h.replica.lag_seconds) : "no replica";
      renderPairs($("health-detail"), [
        ["status", h.status + (h.reasons.length ? " (" + h.reasons.join("; ") + ")" : "")],
        ["generation", String(h.generation)],
        ["last save", (h.last_save.at || "-") + " (" + age(h.last_save.age_seconds) + ")"],
        ["journal", h.journal.bytes === null ? "-" : h.journal.bytes + " bytes"],
        ["newest backup", h.newest_backup ? h.newest_backup.id + " (" + age(h.newest_backup.age_seconds) + ")" : "none"],
        ["replica lag", lag],
        ["stream clients", String(h.stream.clients)],
      ]);
      const b = await (await fetch("/api/backups", { cache: "no-store" })).json();
      const list = $("backups");
      list.replaceChildren();
      b.backups.slice(0, 24).forEach((x) => {
        const li = document.createElement("li");
        li.textContent = x.created_at + "  generation " + (x.generation === null ? "?" : x.generation) + (x.valid ? "" : "  " + (x.damaged ? "DAMAGED" : "unreadable"));
        if (!x.valid) li.className = "bad";
        list.appendChild(li);
      });
      $("backups-empty").hidden = b.backups.length > 0;
    } catch (e) {
      $("health").textContent = "health: unreachable";
      $("health").className = "badge bad";
    }
  }

  connect();
  refresh();
  setInterval(refresh, 5000);
})();
