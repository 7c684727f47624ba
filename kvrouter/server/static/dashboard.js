// kvrouter dashboard: polls dashboard/state every 2 s and renders it. No library, no build.
// Every value from the router is written with textContent (never parsed as HTML).
"use strict";

(() => {
  const PERIOD_MS = 2000;
  const TOKEN_KEY = "kvrouter.adminToken";   // sessionStorage: gone when the tab closes
  const SVG = "http://www.w3.org/2000/svg";
  const ROLE_ORDER = { prefill: 0, decode: 1, mixed: 2 };
  let timer = null;

  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v;
      else node.setAttribute(k, v);
    }
    for (const c of children) {
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  function svgEl(tag, attrs) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
    return node;
  }

  const pct = (x) => (x === null || x === undefined ? "–" : (100 * x).toFixed(1) + "%");
  const num = (x, digits = 0) =>
    x === null || x === undefined ? "–" : Number(x).toLocaleString("en-US", {
      maximumFractionDigits: digits, minimumFractionDigits: digits });
  const ms = (secs) => (secs === null || secs === undefined ? "–" :
    secs < 1 ? (1000 * secs).toFixed(0) + " ms" : secs.toFixed(2) + " s");
  const pad = (n) => String(n).padStart(2, "0");
  const clock = (t) => {
    const d = new Date(t * 1000);
    return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  };

  function setStatus(text, kind) {
    const box = $("status");
    box.textContent = text || "";
    box.className = kind || "";
    box.hidden = !text;
  }

  // -- polling ------------------------------------------------------------------------------
  async function refresh() {
    clearTimeout(timer);
    const headers = {};
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) headers.Authorization = "Bearer " + token;
    try {
      const resp = await fetch("dashboard/state", { headers, cache: "no-store" });
      const body = await resp.json().catch(() => null);
      if (resp.status === 401 || resp.status === 403) {
        const why = body && body.error ? body.error.message : "HTTP " + resp.status;
        setStatus(`The admin token is needed (${why}). Enter it above.`, "auth");
        $("token").focus();
      } else if (!resp.ok || body === null) {
        setStatus(`The router answered HTTP ${resp.status}` +
                  (body && body.error ? `: ${body.error.message}` : ""), "error");
      } else {
        setStatus("");
        render(body);
      }
    } catch (err) {
      setStatus(`The router cannot be reached (${err.message}); retrying.`, "error");
    }
    timer = setTimeout(refresh, PERIOD_MS);
  }

  $("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const value = $("token").value.trim();
    if (value) sessionStorage.setItem(TOKEN_KEY, value);
    $("token").value = "";
    refresh();
  });
  $("token-forget").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    refresh();
  });

  // -- rendering ----------------------------------------------------------------------------
  function render(s) {
    const roles = Object.entries(s.policies);
    const policies = roles.length === 1 ? `policy ${roles[0][1]}` :
      roles.map(([r, p]) => `${r} policy ${p}`).join(", ");
    $("mode").textContent = `${s.mode} mode · ${policies} · v${s.version}`;
    $("processes").textContent = Object.entries(s.processes || {})
      .map(([k, v]) => `${k} ${Object.entries(v).map(([a, b]) => `${a}=${b}`).join(" ")}`)
      .join(" · ");
    $("updated").textContent = "updated " + clock(s.time);
    renderCards(s);
    renderInstances(s.instances);
    renderDecisions(s.decisions);
    renderCharts(s.traffic);
  }

  function renderCards(s) {
    const r = s.routable;
    const roles = Object.entries(r).filter(([, n]) => n > 0);
    $("card-routable").textContent = String(roles.reduce((a, [, n]) => a + n, 0));
    const down = s.instances.filter((i) => !i.routable).length;
    $("card-routable-sub").textContent =
      (roles.map(([k, n]) => `${n} ${k}`).join(", ") || "none registered") +
      (down ? ` · ${down} not routable` : "");
    $("card-inflight").textContent =
      num(s.instances.reduce((a, i) => a + i.in_flight_requests, 0));
    const h = s.hit_rate;
    hitRate("hit-predicted", h.predicted_recent, h.predicted_total, h.recent_secs,
            "blocks the router's prefix index predicted to hit");
    hitRate("hit-measured", h.measured_recent, h.measured_total, h.recent_secs,
            "cached / prompt tokens the instances reported");
    const t = s.traffic;
    const n = t.requests.length;
    const last10 = t.requests.slice(n - 10).reduce((a, b) => a + b, 0);
    $("card-rps").textContent = num(last10 / 10, 1);
    const fails = t.errors.slice(n - 10).reduce((a, b) => a + b, 0);
    $("card-rps-sub").textContent = `last 10 s · ${num(fails / 10, 1)}/s failed`;
    let tn = 0, tsum = 0;
    for (let i = Math.max(0, n - 60); i < n; i++) {
      if (t.ttft_mean[i] !== null) { tsum += t.ttft_mean[i] * t.requests[i]; tn += t.requests[i]; }
    }
    $("card-ttft").textContent = tn ? ms(tsum / tn) : "–";
    if (s.queue === null) {
      $("card-queue").textContent = "off";
      $("card-queue-sub").textContent = "no admission limit configured";
    } else {
      const q = s.queue;
      $("card-queue").textContent = num(Object.values(q).reduce((a, b) => a + b, 0));
      $("card-queue-sub").textContent = Object.entries(q).map(([k, v]) => `${k} ${v}`).join(" · ");
    }
  }

  // the last minute's rate if there was anything to count in it, else the rate since start
  function hitRate(id, recent, total, secs, what) {
    const window = recent !== null ? `last ${Math.max(1, Math.round(secs))} s` :
      total !== null ? "since start (nothing in the last minute)" : "nothing counted yet";
    $(id).textContent = pct(recent !== null ? recent : total);
    $(id + "-sub").textContent = `${what}; ${window}` +
      (recent !== null && total !== null ? ` · ${pct(total)} since start` : "");
  }

  function renderInstances(instances) {
    const body = $("instances").tBodies[0];
    const rows = instances.slice().sort((a, b) =>
      (ROLE_ORDER[a.role] - ROLE_ORDER[b.role]) || a.url.localeCompare(b.url));
    if (!rows.length) {
      body.replaceChildren(el("tr", {}, el("td", { colspan: 11, class: "empty" },
        "No instance is registered.")));
      return;
    }
    body.replaceChildren(...rows.map((i) => {
      const snap = i.snapshot;
      const state = el("td", { class: "state" },
        el("span", { class: "badge " + i.state }, i.state));
      if (i.ejected) state.append(el("span", { class: "badge ejected" }, "ejected"));
      return el("tr", { "data-url": i.url, "data-role": i.role },
        el("td", { class: "role" }, i.role),
        el("td", { class: "url" }, i.url),
        el("td", {}, i.engine || "?"),
        state,
        el("td", { class: "num" }, `${num(i.in_flight_requests)} / ${num(i.in_flight_tokens)}`),
        el("td", { class: "num" }, num(i.queued_prefill_tokens)),
        el("td", { class: "num" }, snap ? num(snap.running) : "–"),
        el("td", { class: "num" }, snap ? num(snap.waiting) : "–"),
        el("td", { class: "num kv" }, snap && snap.kv_usage !== null ? pct(snap.kv_usage) : "–"),
        el("td", { class: "num measured" }, pct(i.measured_hit_rate)),
        el("td", { class: "num age" }, snap ? `${snap.age_secs.toFixed(1)} s` +
          (snap.fresh ? "" : " (stale)") : "not scraped"));
    }));
  }

  function renderDecisions(decisions) {
    const body = $("decisions").tBodies[0];
    if (!decisions.length) {
      body.replaceChildren(el("tr", {}, el("td", { colspan: 6, class: "empty" },
        "No request routed since this page opened.")));
      return;
    }
    body.replaceChildren(...decisions.map((d) => el("tr", { class: "decision" },
      el("td", {}, clock(d.time)),
      el("td", { class: "role" }, d.role),
      el("td", {}, d.policy),
      el("td", { class: "url" }, d.instance),
      el("td", {}, d.strategy),
      el("td", { class: "num" }, d.lookup_blocks ? `${d.hit_blocks} / ${d.lookup_blocks}` : "–"))));
  }

  // -- charts: inline SVG polylines ---------------------------------------------------------
  function renderCharts(t) {
    const ttftMs = (xs) => xs.map((x) => (x === null ? null : 1000 * x));
    chart($("chart-ttft"), [
      { values: ttftMs(t.ttft_mean), cls: "series" },
      { values: ttftMs(t.ttft_max), cls: "series second" }], "ms");
    chart($("chart-rps"), [
      { values: t.requests, cls: "series" },
      { values: t.errors, cls: "series failed" }], "req/s");
  }

  function chart(svg, series, unit) {
    const W = 640, H = 180, L = 52, R = 8, T = 10, B = 22;
    let top = 0;
    for (const s of series) for (const v of s.values) if (v !== null && v > top) top = v;
    top = niceCeiling(top);
    const n = series[0].values.length;
    const x = (i) => L + (i / Math.max(1, n - 1)) * (W - L - R);
    const y = (v) => T + (1 - v / top) * (H - T - B);
    const nodes = [];
    for (const frac of [0, 0.5, 1]) {
      const v = top * frac;
      nodes.push(svgEl("line", { class: "axis", x1: L, x2: W - R, y1: y(v), y2: y(v) }));
      const label = svgEl("text", { class: "label", x: L - 6, y: y(v) + 4, "text-anchor": "end" });
      label.textContent = `${num(v, v < 10 && v > 0 ? 1 : 0)} ${frac === 1 ? unit : ""}`.trim();
      nodes.push(label);
    }
    for (const [i, text] of [[0, "−5 min"], [Math.floor(n / 2), "−2.5 min"], [n - 1, "now"]]) {
      const label = svgEl("text", { class: "label", x: x(i), y: H - 6,
        "text-anchor": i === 0 ? "start" : i === n - 1 ? "end" : "middle" });
      label.textContent = text;
      nodes.push(label);
    }
    for (const s of series) {
      // a gap (null) breaks the line: one polyline per run of values
      let run = [];
      const flush = () => {
        if (run.length > 1) nodes.push(svgEl("polyline", { class: s.cls, points: run.join(" ") }));
        if (run.length === 1) {
          const [cx, cy] = run[0].split(",");
          nodes.push(svgEl("circle", { class: s.cls, cx, cy, r: 1.5 }));
        }
        run = [];
      };
      s.values.forEach((v, i) => {
        if (v === null) flush();
        else run.push(`${x(i).toFixed(1)},${y(v).toFixed(1)}`);
      });
      flush();
    }
    svg.replaceChildren(...nodes);
  }

  function niceCeiling(v) {
    if (v <= 0) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 2.5, 5, 10]) if (v <= m * p) return m * p;
    return 10 * p;
  }

  refresh();
})();
