// fedjewel coordinator dashboard: hand-written, no dependencies, no network beyond this origin.
// Data: GET v1/dashboard/summary (and, when present, GET v1/insights). URLs are relative so the
// page also works behind a reverse proxy that mounts the coordinator under a path prefix.
"use strict";

(function () {
  const REFRESH_MS = 5000;
  const TOKEN_KEY = "fedjewel.dashboard.token";
  const SVG_NS = "http://www.w3.org/2000/svg";
  const COLORS = { train_loss: "#b8892d", "hr@10": "#1f7a8c", "ndcg@10": "#7b3f61" };

  const $ = (id) => document.getElementById(id);

  // Element builder; text goes through textContent, never innerHTML (ids come from the API).
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === "class") node.className = v;
      else node.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children.flat()) {
      if (c === undefined || c === null) continue;
      node.appendChild(typeof c === "object" ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // ---------- formatting ----------
  const fmt = {
    num(v, digits) {
      if (v === undefined || v === null || Number.isNaN(v)) return "–";
      return Number(v).toLocaleString(undefined, {
        maximumFractionDigits: digits ?? 0,
        minimumFractionDigits: digits ?? 0,
      });
    },
    bytes(v) {
      if (v === undefined || v === null) return "–";
      const units = ["B", "KB", "MB", "GB"];
      let i = 0;
      while (v >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
      return `${v.toFixed(i ? 1 : 0)} ${units[i]}`;
    },
    duration(s) {
      if (s === undefined || s === null) return "–";
      if (s < 1) return `${Math.round(s * 1000)} ms`;
      if (s < 120) return `${s.toFixed(1)} s`;
      if (s < 7200) return `${(s / 60).toFixed(1)} min`;
      return `${(s / 3600).toFixed(1)} h`;
    },
    ago(s) {
      if (s === undefined || s === null) return "never";
      if (s < 60) return `${Math.max(0, Math.round(s))} s ago`;
      if (s < 3600) return `${Math.round(s / 60)} min ago`;
      if (s < 172800) return `${Math.round(s / 3600)} h ago`;
      return `${Math.round(s / 86400)} d ago`;
    },
    time(iso) {
      if (!iso) return "–";
      const d = new Date(iso);
      return d.toLocaleString(undefined, {
        month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit",
      });
    },
  };

  const PILLS = {
    active: "pill-active", candidate: "pill-muted", retired: "pill-muted",
    open: "pill-open", closed: "pill-muted",
    healthy: "pill-ok", stale: "pill-warn", never_seen: "pill-muted", revoked: "pill-bad",
  };
  const pill = (text) => el("span", { class: `pill ${PILLS[text] || "pill-muted"}` }, text.replace("_", " "));

  function fillTable(id, rows, columns, emptyText) {
    const body = $(id).querySelector("tbody");
    body.replaceChildren();
    if (!rows.length) {
      body.appendChild(el("tr", {}, el("td", { class: "empty", colspan: columns }, emptyText)));
      return;
    }
    for (const cells of rows) body.appendChild(el("tr", {}, cells));
  }

  // ---------- chart: inline SVG line chart ----------
  function niceTicks(min, max, count) {
    if (min === max) { const pad = Math.abs(min) * 0.1 || 1; min -= pad; max += pad; }
    const raw = (max - min) / count;
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
    const lo = Math.floor(min / step) * step;
    const hi = Math.ceil(max / step) * step;
    const ticks = [];
    for (let v = lo; v <= hi + step / 2; v += step) ticks.push(Number(v.toPrecision(12)));
    return { lo, hi, ticks, step };
  }

  // series: [{key, label, points: [[round, value], ...]}]
  function lineChart(svgEl, series, opts) {
    svgEl.replaceChildren();
    const W = 560, H = 240, L = 52, R = 16, T = 28, B = 34;
    const all = series.flatMap((s) => s.points);
    if (!all.length) {
      svgEl.appendChild(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" },
        opts.emptyText));
      svgEl.dataset.points = "0";
      return;
    }
    const xs = all.map((p) => p[0]);
    const ys = all.map((p) => p[1]);
    let xMin = Math.min(...xs), xMax = Math.max(...xs);
    if (xMin === xMax) { xMin -= 1; xMax += 1; }
    const y = niceTicks(opts.yMin ?? Math.min(...ys), Math.max(...ys), 4);
    const px = (v) => L + ((v - xMin) / (xMax - xMin)) * (W - L - R);
    const py = (v) => T + (1 - (v - y.lo) / (y.hi - y.lo)) * (H - T - B);

    for (const t of y.ticks) {
      svgEl.appendChild(svg("line", { x1: L, x2: W - R, y1: py(t), y2: py(t), class: "grid" }));
      svgEl.appendChild(svg("text", { x: L - 6, y: py(t) + 4, "text-anchor": "end", class: "tick" },
        fmt.num(t, y.step < 0.01 ? 3 : y.step < 1 ? 2 : 0)));
    }
    const xStep = Math.max(1, Math.ceil((xMax - xMin) / 8));
    for (let v = Math.ceil(xMin); v <= xMax; v += xStep) {
      svgEl.appendChild(svg("text", { x: px(v), y: H - B + 16, "text-anchor": "middle", class: "tick" }, v));
    }
    svgEl.appendChild(svg("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis" }));
    svgEl.appendChild(svg("line", { x1: L, x2: L, y1: T, y2: H - B, class: "axis" }));
    svgEl.appendChild(svg("text", { x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle", class: "tick" }, "round"));

    let legendX = L;
    for (const s of series) {
      const color = COLORS[s.key] || "#555";
      const pts = [...s.points].sort((a, b) => a[0] - b[0]);
      if (pts.length) {
        const d = pts.map((p, i) => `${i ? "L" : "M"}${px(p[0]).toFixed(1)},${py(p[1]).toFixed(1)}`).join(" ");
        svgEl.appendChild(svg("path", {
          d, class: "series", stroke: color, "data-series": s.key, "data-points": pts.length,
        }));
        for (const p of pts) {
          const c = svg("circle", {
            cx: px(p[0]).toFixed(1), cy: py(p[1]).toFixed(1), r: 3.5, fill: color,
            class: "point", "data-series": s.key,
          });
          c.appendChild(svg("title", {}, `round ${p[0]} · ${s.label} ${fmt.num(p[1], 4)}`));
          svgEl.appendChild(c);
        }
      }
      svgEl.appendChild(svg("rect", { x: legendX, y: 8, width: 12, height: 4, rx: 2, fill: color }));
      svgEl.appendChild(svg("text", { x: legendX + 16, y: 14, class: "legend" }, s.label));
      legendX += 36 + s.label.length * 8;
    }
    svgEl.dataset.points = String(all.length);
  }

  // One point per round that produced a version: x = round id, y = the version's metric.
  function metricSeries(versions, key, label) {
    const points = versions
      .filter((v) => v.round_id !== null && typeof v.metrics[key] === "number")
      .map((v) => [v.round_id, v.metrics[key]]);
    return { key, label, points };
  }

  // ---------- rendering ----------
  function render(data) {
    const versions = data.versions;
    const closed = data.rounds.filter((r) => r.state === "closed");
    const openRound = data.rounds.find((r) => r.state === "open");
    const healthy = data.nodes.filter((n) => n.health === "healthy").length;
    const latest = versions.find((v) => v.round_id !== null);

    $("kpi-version").textContent = data.active_version ?? "–";
    $("kpi-round").textContent = openRound
      ? `#${openRound.round_id} · ${openRound.participants.length} updates` : "–";
    $("kpi-closed").textContent = fmt.num(closed.filter((r) => r.result_version !== null).length);
    $("kpi-nodes").textContent = `${healthy} / ${data.nodes.filter((n) => n.health !== "revoked").length}`;
    $("kpi-loss").textContent = latest ? fmt.num(latest.metrics.train_loss, 3) : "–";
    $("kpi-hr").textContent = latest ? fmt.num(latest.metrics["hr@10"], 3) : "–";

    lineChart($("chart-loss"), [metricSeries(versions, "train_loss", "train loss")], {
      emptyText: "no closed round yet",
    });
    lineChart($("chart-quality"), [
      metricSeries(versions, "hr@10", "HR@10"),
      metricSeries(versions, "ndcg@10", "NDCG@10"),
    ], { emptyText: "no held-out metrics yet", yMin: 0 });

    fillTable("rounds", data.rounds.map((r) => [
      el("td", {}, `#${r.round_id}`),
      el("td", {}, pill(r.state)),
      el("td", {}, `v${r.base_version} → ${r.result_version !== null ? "v" + r.result_version : "…"}`),
      el("td", {}, r.participants.length
        ? r.participants.map((p) => el("span", { class: "chip" }, p)) : el("span", { class: "muted" }, "none yet")),
      el("td", { class: "num" }, fmt.num(r.num_examples)),
      el("td", { class: "num" }, r.state === "open" ? "running" : fmt.duration(r.duration_seconds)),
      el("td", {}, r.close_reason || "–"),
    ]), 7, "no rounds yet: upload a catalog (PUT /v1/catalog)");

    $("stale-note").textContent = `stale after ${fmt.duration(data.stale_after_seconds)} without contact`;
    fillTable("nodes", data.nodes.map((n) => [
      el("td", {}, n.node_id),
      el("td", {}, n.region),
      el("td", {}, pill(n.health)),
      el("td", { title: n.last_seen_at || "" }, fmt.ago(n.seconds_since_seen)),
      el("td", { class: "num" }, n.last_model_version !== null ? `v${n.last_model_version}` : "–"),
    ]), 5, "no nodes registered (POST /v1/nodes)");

    fillTable("versions", versions.map((v) => [
      el("td", {}, `v${v.version}`),
      el("td", {}, pill(v.status)),
      el("td", {}, v.round_id !== null ? `#${v.round_id}` : "init"),
      el("td", {}, fmt.time(v.created_at)),
      el("td", { class: "num" }, fmt.num(v.num_items)),
      el("td", { class: "num" }, fmt.bytes(v.size_bytes)),
      el("td", { class: "num" }, fmt.num(v.metrics.train_loss, 4)),
      el("td", { class: "num" }, fmt.num(v.metrics["hr@10"], 4)),
      el("td", { class: "num" }, fmt.num(v.metrics["ndcg@10"], 4)),
      el("td", { class: "num" }, fmt.num(v.metrics.num_updates)),
    ]), 10, "no model yet");
  }

  // ---------- REGIONAL INSIGHTS (GET v1/insights) ----------
  // Thresholded, node-side aggregates: per region, the strongest shares of views and
  // purchases by category, material, gemstone and price band, with their weekly trend.
  function cell(v) {
    if (v === null || v === undefined) return "–";
    if (typeof v === "number") return Number.isInteger(v) ? fmt.num(v) : fmt.num(v, 4);
    if (typeof v === "object") return JSON.stringify(v);
    return String(v);
  }
  function pct(v) { return v === null || v === undefined ? "–" : `${(100 * v).toFixed(1)} %`; }
  function trend(v) {
    if (v === null || v === undefined) return "–";
    const pts = 100 * v;
    return `${pts >= 0 ? "+" : ""}${pts.toFixed(2)} pts/week`;
  }
  function renderInsights(data) {
    const regions = (data && data.regions) || [];
    if (!regions.length) { $("insights").hidden = true; return; }
    const rows = (data.highlights || []).map((h) => el("tr", {},
      el("td", {}, h.region), el("td", {}, h.kind), el("td", {}, h.dimension),
      el("td", {}, cell(h.value)), el("td", { class: "num" }, pct(h.share)),
      el("td", { class: "num" }, trend(h.trend_per_week))));
    $("insights-body").replaceChildren(el("div", { class: "table-wrap" }, el("table", {},
      el("thead", {}, el("tr", {}, ["region", "kind", "dimension", "value", "share", "trend"]
        .map((c) => el("th", {}, c)))),
      el("tbody", {}, rows))));
    $("insights").hidden = false;
  }

  // ---------- data loading ----------
  function authHeaders() {
    const token = sessionStorage.getItem(TOKEN_KEY);
    return token ? { Authorization: `Bearer ${token}` } : {};
  }

  function setConn(text, cls) {
    const c = $("conn");
    c.textContent = text;
    c.className = `pill ${cls}`;
  }

  // Whether GET v1/insights exists, learnt once from the OpenAPI document (so the page does
  // not fill the console with 404s); without the document it probes the endpoint once.
  let insightsAvailable = null;
  async function discoverInsights() {
    try {
      const r = await fetch("openapi.json");
      if (r.ok) {
        const spec = await r.json();
        return Boolean(spec.paths && spec.paths["/v1/insights"] && spec.paths["/v1/insights"].get);
      }
    } catch (_err) { /* fall through to probing */ }
    return true;
  }

  async function loadInsights() {
    if (insightsAvailable === null) insightsAvailable = await discoverInsights();
    if (!insightsAvailable) { $("insights").hidden = true; return; }
    try {
      const r = await fetch("v1/insights", { headers: authHeaders() });
      if (r.status === 404) insightsAvailable = false;
      if (!r.ok || !(r.headers.get("content-type") || "").includes("json")) {
        $("insights").hidden = true;
        return;
      }
      renderInsights(await r.json());
    } catch (_err) {
      $("insights").hidden = true;
    }
  }

  let timer = null;
  async function refresh() {
    try {
      const r = await fetch("v1/dashboard/summary", { headers: authHeaders() });
      if (r.status === 401 || r.status === 403) {
        const body = await r.json().catch(() => ({}));
        $("auth").hidden = false;
        $("main").hidden = true;
        $("auth-error").textContent = sessionStorage.getItem(TOKEN_KEY) ? body.detail || "refused" : "";
        setConn("token needed", "pill-warn");
        return;
      }
      if (!r.ok) throw new Error(`HTTP ${r.status}`);
      const data = await r.json();
      $("auth").hidden = true;
      $("main").hidden = false;
      render(data);
      setConn("live", "pill-ok");
      $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
      document.body.dataset.loaded = "true";
      await loadInsights();
    } catch (err) {
      setConn("coordinator unreachable", "pill-bad");
      $("updated").textContent = String(err.message || err);
    }
  }

  function schedule() {
    clearTimeout(timer);
    if ($("auto").checked && !document.hidden) timer = setTimeout(async () => { await refresh(); schedule(); }, REFRESH_MS);
  }

  $("auto").addEventListener("change", schedule);
  document.addEventListener("visibilitychange", () => { if (!document.hidden) refresh(); schedule(); });
  $("auth-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
    refresh();
  });

  refresh().then(schedule);
})();
