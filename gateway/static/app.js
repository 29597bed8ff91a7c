// kdgate dashboard. Plain DOM and hand-drawn SVG; no libraries, no CDN.
// Every value from the ledger (route names, prompts, answers) goes into the page as a text node or
// an attribute set through the DOM, never as HTML, so nothing in a prompt can run here.
"use strict";

(function () {
  const CSRF = document.querySelector('meta[name="csrf-token"]').getAttribute("content");
  const main = document.getElementById("main");
  const SVGNS = "http://www.w3.org/2000/svg";

  // -- helpers ------------------------------------------------------------------------------
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else if (k === "text") node.textContent = String(v);
      else node.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }
  function svg(tag, attrs, ...children) {
    const node = document.createElementNS(SVGNS, tag);
    for (const [k, v] of Object.entries(attrs || {})) if (v !== null && v !== undefined) node.setAttribute(k, String(v));
    for (const c of children.flat()) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return node;
  }
  async function api(path, options) {
    const opts = Object.assign({ credentials: "same-origin", headers: {} }, options || {});
    opts.headers = Object.assign({ accept: "application/json" }, opts.headers);
    if (opts.method && opts.method !== "GET") {
      opts.headers["x-kdgate-csrf"] = CSRF;
      if (opts.body !== undefined) { opts.headers["content-type"] = "application/json"; opts.body = JSON.stringify(opts.body); }
    }
    const resp = await fetch(path, opts);
    if (resp.status === 401) { location.href = "/dashboard"; throw new Error("Session expired; log in again."); }
    const data = await resp.json().catch(() => null);
    if (!resp.ok) throw new Error((data && data.error && data.error.message) || ("HTTP " + resp.status));
    return data;
  }
  const usd = (v) => v === null || v === undefined ? "–" :
    (Math.abs(v) >= 100 ? "$" + v.toLocaleString("en-US", { maximumFractionDigits: 0 }) :
     "$" + v.toLocaleString("en-US", { minimumFractionDigits: 2, maximumFractionDigits: Math.abs(v) < 1 ? 4 : 2 }));
  const pct = (v, d) => v === null || v === undefined ? "–" : (100 * v).toFixed(d === undefined ? 1 : d) + "%";
  const ms = (v) => v === null || v === undefined ? "–" : (v >= 1000 ? (v / 1000).toFixed(2) + " s" : v.toFixed(v < 10 ? 1 : 0) + " ms");
  const num = (v) => v === null || v === undefined ? "–" : Number(v).toLocaleString("en-US");
  const fixed = (v, d) => v === null || v === undefined ? "–" : Number(v).toFixed(d);
  const when = (t) => new Date(t * 1000).toISOString().replace("T", " ").slice(0, 19) + " UTC";
  function card(id, label, value, raw, cls) {
    return el("div", { class: "card " + (cls || "") }, el("div", { class: "label" }, label),
      el("div", { class: "value", id: id, "data-value": raw === null || raw === undefined ? "" : raw }, value));
  }
  const clip = (text, n) => text.length > n ? text.slice(0, n - 1) + "…" : text;
  function failure(err) { return el("p", { class: "error" }, String(err.message || err)); }

  // -- charts (server data, hand-drawn SVG) ---------------------------------------------------
  // series: [{name, cls, color, points: [[x, y], ...]}]; markers: [{x, label, color, dash}]
  function lineChart(opts) {
    const W = opts.width || 640, H = opts.height || 240, L = 58, R = 14, T = 12, B = 28;
    const xs = opts.series.flatMap((s) => s.points.map((p) => p[0]));
    const ys = opts.series.flatMap((s) => s.points.map((p) => p[1]));
    let x0 = opts.xMin !== undefined ? opts.xMin : Math.min(...xs), x1 = opts.xMax !== undefined ? opts.xMax : Math.max(...xs);
    let y0 = opts.yMin !== undefined ? opts.yMin : Math.min(0, ...ys), y1 = opts.yMax !== undefined ? opts.yMax : Math.max(...ys);
    if (!isFinite(x0) || !isFinite(x1)) { x0 = 0; x1 = 1; }
    if (!isFinite(y1) || y1 <= y0) y1 = y0 + 1;
    if (x1 === x0) { x0 -= 1; x1 += 1; }
    const sx = (x) => L + (x - x0) / (x1 - x0) * (W - L - R);
    const sy = (y) => H - B - (y - y0) / (y1 - y0) * (H - T - B);
    const root = svg("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": opts.title || "chart", id: opts.id });
    for (let i = 0; i <= 4; i++) {
      const y = y0 + (y1 - y0) * i / 4;
      root.append(svg("line", { class: "grid", x1: L, x2: W - R, y1: sy(y), y2: sy(y) }));
      root.append(svg("text", { x: L - 6, y: sy(y) + 4, "text-anchor": "end" }, opts.yFormat(y)));
    }
    const xt = opts.xTicks || 5;
    for (let i = 0; i <= xt; i++) {
      const x = x0 + (x1 - x0) * i / xt;
      root.append(svg("text", { x: sx(x), y: H - 8, "text-anchor": i === 0 ? "start" : i === xt ? "end" : "middle" }, opts.xFormat(x)));
    }
    root.append(svg("line", { class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B }));
    root.append(svg("line", { class: "axis", x1: L, x2: L, y1: T, y2: H - B }));
    for (const s of opts.series) {
      if (!s.points.length) continue;
      const d = s.points.map((p, i) => (i ? "L" : "M") + sx(p[0]).toFixed(1) + " " + sy(p[1]).toFixed(1)).join(" ");
      root.append(svg("path", { d: d, fill: "none", stroke: s.color, "stroke-width": 2, "data-series": s.name }));
      if (s.points.length === 1) root.append(svg("circle", { cx: sx(s.points[0][0]), cy: sy(s.points[0][1]), r: 3, fill: s.color }));
    }
    for (const m of opts.markers || []) {
      if (m.x === null || m.x === undefined || !isFinite(m.x)) continue;
      const x = sx(Math.max(x0, Math.min(x1, m.x)));
      root.append(svg("line", { x1: x, x2: x, y1: T, y2: H - B, stroke: m.color, "stroke-width": 1.5,
        "stroke-dasharray": m.dash ? "5 4" : null, class: "marker", id: m.id }));
      root.append(svg("text", { x: x + 4, y: T + 10, fill: m.color }, m.label));
    }
    const legend = el("div", { class: "legend" }, opts.series.map((s) =>
      el("span", {}, el("span", { class: "swatch " + (s.cls || "") }), s.name)));
    return el("div", {}, root, legend);
  }
  const COLORS = { teacher: "#d9534f", student: "#2a9d8f", saved: "#2a6fdb", warn: "#b7791f" };

  // -- overview -------------------------------------------------------------------------------
  const ROUTE_COLUMNS = [
    ["route", "Route", (r) => el("a", { href: "/dashboard/routes/" + encodeURIComponent(r.route), class: "route-link" }, r.route)],
    ["requests", "Requests", (r) => num(r.requests), "num"],
    ["student_share", "Student share", (r) => pct(r.student_share), "num"],
    ["escalation_rate", "Escalation", (r) => pct(r.escalation_rate), "num"],
    ["validation_agreement", "Val. agreement", (r) => pct(r.validation_agreement), "num"],
    ["live_agreement", "Live agreement", (r) => pct(r.live_agreement) + (r.shadow_checks ? " (" + num(r.shadow_checks) + ")" : ""), "num"],
    ["student_p50_ms", "Student p50/p95", (r) => ms(r.student_p50_ms) + " / " + ms(r.student_p95_ms), "num"],
    ["teacher_p50_ms", "Teacher p50/p95", (r) => ms(r.teacher_p50_ms) + " / " + ms(r.teacher_p95_ms), "num"],
    ["live_version", "Live version", (r) => r.live_version === null ? "–" : "v" + r.live_version, "num"],
    ["mode", "Mode", (r) => r.mode || "–"],
    ["saved_usd", "Saved", (r) => usd(r.saved_usd), "num"],
  ];
  const tableState = { sort: "requests", order: "desc" };

  function routesTable(rows) {
    const sorted = rows.slice().sort((a, b) => {
      const va = a[tableState.sort], vb = b[tableState.sort];
      if (va === null || va === undefined) return 1;
      if (vb === null || vb === undefined) return -1;
      const c = typeof va === "string" ? va.localeCompare(vb) : va - vb;
      return tableState.order === "asc" ? c : -c;
    });
    const head = el("tr", {}, ROUTE_COLUMNS.map(([key, label, , cls]) => el("th", {
      class: ["sortable", cls || "", tableState.sort === key ? "sorted-" + tableState.order : ""].join(" "),
      "data-key": key,
      onclick: () => {
        if (tableState.sort === key) tableState.order = tableState.order === "asc" ? "desc" : "asc";
        else { tableState.sort = key; tableState.order = key === "route" || key === "mode" ? "asc" : "desc"; }
        table.replaceWith(routesTable(rows));
      },
    }, label)));
    const body = el("tbody", {}, sorted.map((r) => el("tr", { "data-route": r.route },
      ROUTE_COLUMNS.map(([key, , fmt, cls]) => el("td", { class: cls || "", "data-key": key }, fmt(r))))));
    const table = el("table", { id: "routes-table" }, el("thead", {}, head), body);
    if (!rows.length) return el("p", { class: "muted", id: "routes-table" }, "No routes yet: send traffic through the gateway.");
    return table;
  }

  async function overviewPage() {
    const params = new URLSearchParams(location.search);
    const since = params.get("since") || "7d", bucket = params.get("bucket") || (since === "24h" ? "hour" : "day");
    const [ov, rows, keys] = await Promise.all([
      api(`/admin/overview?bucket=${encodeURIComponent(bucket)}&since=${encodeURIComponent(since)}`),
      api(`/admin/routes-table?since=${encodeURIComponent(since)}`),
      api("/admin/keys"),
    ]);
    const t = ov.totals, rg = ov.range;
    const choose = (name, values, current) => el("select", { id: name, onchange: (e) => {
      params.set(name, e.target.value); location.search = params.toString(); } },
      values.map(([v, label]) => el("option", { value: v, selected: v === current }, label)));
    const fmtT = (x) => {
      const d = new Date(x * 1000).toISOString();
      return bucket === "hour" ? d.slice(5, 10) + " " + d.slice(11, 16) : d.slice(0, 10);
    };
    const series = ov.series;
    const spend = series.length ? lineChart({
      id: "spend-chart", title: "Spend over time",
      series: [
        { name: "Teacher-only spend", cls: "teacher", color: COLORS.teacher, points: series.map((p) => [p.t, p.teacher_only_usd]) },
        { name: "Actual spend", cls: "student", color: COLORS.student, points: series.map((p) => [p.t, p.actual_usd]) },
        { name: "Saved", cls: "saved", color: COLORS.saved, points: series.map((p) => [p.t, p.saved_usd]) },
      ], xFormat: fmtT, yFormat: usd, yMin: 0,
    }) : el("p", { class: "muted" }, "No traffic in this range.");
    const share = series.length ? lineChart({
      id: "share-chart", title: "Student share over time",
      series: [{ name: "Student share", cls: "student", color: COLORS.student, points: series.map((p) => [p.t, p.student_share || 0]) }],
      xFormat: fmtT, yFormat: (y) => pct(y, 0), yMin: 0, yMax: 1,
    }) : el("p", { class: "muted" }, "No traffic in this range.");
    main.replaceChildren(
      el("h1", {}, "Savings overview"),
      el("div", { class: "cards", id: "overview-cards" },
        card("teacher-only", "Teacher-only spend", usd(t.teacher_only_usd), t.teacher_only_usd, "teacher"),
        card("actual", "Actual spend", usd(t.actual_usd), t.actual_usd, "student"),
        card("saved-total", "Saved, total", usd(ov.saved.total), ov.saved.total, "saved"),
        card("saved-today", "Saved today", usd(ov.saved.today), ov.saved.today, "saved"),
        card("saved-month", "Saved this month", usd(ov.saved.month), ov.saved.month, "saved"),
        card("student-share", "Served by students", pct(t.student_share), t.student_share, "student"),
        card("requests", "Requests", num(t.requests), t.requests),
      ),
      el("div", { class: "panel" },
        el("div", { class: "toolbar" }, el("h2", {}, "Over time"),
          el("label", {}, "Range ", choose("since", [["24h", "last 24 hours"], ["7d", "last 7 days"], ["30d", "last 30 days"], ["all", "all time"]], since)),
          el("label", {}, "Bucket ", choose("bucket", [["hour", "hourly"], ["day", "daily"]], bucket)),
          el("span", { class: "muted", id: "range-summary" },
            `In range: ${num(rg.requests)} requests, ${pct(rg.student_share)} by students, ${usd(rg.saved_usd)} saved`)),
        el("div", { class: "charts" }, el("div", {}, el("h2", {}, "Spend"), spend), el("div", {}, el("h2", {}, "Student share"), share))),
      el("div", { class: "panel" }, el("h2", {}, "Routes"), routesTable(rows)),
      el("div", { class: "panel" }, el("h2", {}, "Gateway keys and their limits"), keysTable(keys)),
    );
  }

  function keysTable(keys) {
    if (!keys.length) return el("p", { class: "muted", id: "keys-table" }, "No gateway keys: create one with `kdgate keys create NAME`.");
    const limit = (v, fmt) => (v === null || v === undefined ? "unlimited" : fmt(v));
    const cols = [
      ["id", "Key id", (k) => k.id], ["name", "Name", (k) => k.name],
      ["rpm", "Requests/min", (k) => limit(k.rpm, num)], ["tpm", "Tokens/min", (k) => limit(k.tpm, num)],
      ["budget_day_usd", "Budget/day", (k) => limit(k.budget_day_usd, usd)],
      ["budget_month_usd", "Budget/month", (k) => limit(k.budget_month_usd, usd)],
      ["revoked", "Status", (k) => (k.revoked ? "revoked" : "active")],
    ];
    return el("table", { id: "keys-table" },
      el("thead", {}, el("tr", {}, cols.map(([, label]) => el("th", {}, label)))),
      el("tbody", {}, keys.map((k) => el("tr", { "data-key-id": k.id }, cols.map(([key, , fmt]) => el("td", { "data-key": key }, fmt(k)))))));
  }

  // -- route page -------------------------------------------------------------------------------
  async function routePage(name) {
    const base = "/admin/routes/" + encodeURIComponent(name);
    const [route, curve, versions, exchanges, events] = await Promise.all([
      api(base), api(base + "/curve"), api(base + "/versions"), api(base + "/exchanges?limit=30"), api(base + "/events"),
    ]);
    const settings = route.settings || {};
    const status = el("div", { class: "status-line", id: "save-status" });

    // mode switch
    const modeSelect = el("select", { id: "mode-select" }, ["off", "shadow", "cascade"].map((m) =>
      el("option", { value: m, selected: settings.mode === m }, m)));
    const modeBox = el("div", { class: "panel" }, el("h2", {}, "Mode"),
      el("div", { class: "toolbar" }, modeSelect,
        el("button", { id: "save-mode", class: "primary", onclick: async () => {
          try {
            const out = await api(base, { method: "PATCH", body: { mode: modeSelect.value } });
            status.textContent = "Mode saved: " + out.settings.mode;
            document.getElementById("current-mode").textContent = out.settings.mode;
          } catch (e) { status.textContent = e.message; }
        } }, "Save mode")),
      el("p", { class: "muted" }, "off: the teacher answers everything. shadow: the teacher answers, the student is checked alongside. cascade: the student answers when confident enough."));

    // threshold control with live preview
    const points = curve.curve || [];
    const thresholdNow = curve.effective_threshold;
    const useTarget = settings.threshold === null || settings.threshold === undefined;
    const kindThreshold = el("input", { type: "radio", name: "kind", id: "kind-threshold", value: "threshold", checked: !useTarget });
    const kindTarget = el("input", { type: "radio", name: "kind", id: "kind-target", value: "target", checked: useTarget });
    const startValue = useTarget ? (settings.target_agreement || 0.95) : settings.threshold;
    const slider = el("input", { type: "range", id: "threshold-range", min: 0, max: 1, step: 0.001, value: startValue });
    const box = el("input", { type: "number", id: "threshold-input", min: 0, max: 1, step: 0.001, value: fixed(startValue, 3) });
    const cov = el("strong", { id: "preview-coverage" }, "–");
    const agr = el("strong", { id: "preview-agreement" }, "–");
    const previewThreshold = el("span", { id: "preview-threshold" }, "–");
    let chartHolder = el("div", { id: "curve-holder" });
    let pending = null, seq = 0;
    function drawCurve(candidate) {
      if (!points.length) { chartHolder.replaceChildren(el("p", { class: "muted" }, "No live student yet: the curve appears once a version is promoted.")); return; }
      const markers = [];
      if (thresholdNow !== null && thresholdNow !== undefined) markers.push({ x: thresholdNow, label: "current " + fixed(thresholdNow, 3), color: "#1d2330", id: "current-threshold-marker" });
      if (candidate !== null && candidate !== undefined && candidate !== thresholdNow) markers.push({ x: candidate, label: "new " + fixed(candidate, 3), color: COLORS.warn, dash: true, id: "new-threshold-marker" });
      const asc = points.slice().sort((a, b) => a.threshold - b.threshold);
      chartHolder.replaceChildren(lineChart({
        id: "curve-chart", title: "Coverage and agreement by threshold",
        series: [
          { name: "Coverage (share the student serves)", cls: "student", color: COLORS.student, points: asc.map((p) => [p.threshold, p.coverage]) },
          { name: "Agreement with the teacher", cls: "saved", color: COLORS.saved, points: asc.map((p) => [p.threshold, p.agreement]) },
        ], xMin: 0, xMax: 1, yMin: 0, yMax: 1, xFormat: (x) => x.toFixed(2), yFormat: (y) => pct(y, 0), markers: markers,
      }));
    }
    async function preview() {
      const value = Number(box.value);
      const q = kindTarget.checked ? "target_agreement=" + value : "threshold=" + value;
      const mine = ++seq;
      try {
        const p = await api(base + "/preview?" + q);
        if (mine !== seq) return;
        cov.textContent = pct(p.coverage); agr.textContent = pct(p.agreement);
        cov.setAttribute("data-value", p.coverage); agr.setAttribute("data-value", p.agreement);
        previewThreshold.textContent = p.reachable ? fixed(p.threshold, 3) : "target not reachable: all requests escalate";
        drawCurve(p.threshold);
      } catch (e) { status.textContent = e.message; }
    }
    function schedule() { clearTimeout(pending); pending = setTimeout(preview, 120); }
    slider.addEventListener("input", () => { box.value = Number(slider.value).toFixed(3); schedule(); });
    box.addEventListener("input", () => { slider.value = box.value; schedule(); });
    for (const r of [kindThreshold, kindTarget]) r.addEventListener("change", schedule);
    const save = el("button", { id: "save-threshold", class: "primary", onclick: async () => {
      const value = Number(box.value);
      const body = kindTarget.checked ? { target_agreement: value, clear_threshold: true } : { threshold: value };
      try {
        const out = await api(base, { method: "PATCH", body: body });
        status.textContent = "Saved: " + (kindTarget.checked ? "target agreement " + fixed(out.settings.target_agreement, 3) : "threshold " + fixed(out.settings.threshold, 3)) + ". It applies from the next request.";
        document.getElementById("current-threshold").textContent = out.settings.threshold === null || out.settings.threshold === undefined ? "from target" : fixed(out.settings.threshold, 3);
        document.getElementById("current-target").textContent = fixed(out.settings.target_agreement, 3);
      } catch (e) { status.textContent = e.message; }
    } }, "Save");
    const control = el("div", { class: "panel control" }, el("h2", {}, "Threshold"),
      el("div", {}, el("label", {}, kindThreshold, " confidence threshold"), el("label", {}, kindTarget, " target agreement")),
      el("div", { class: "row" }, slider, box),
      el("div", { class: "preview", id: "preview" }, "The student would serve ", cov, " of traffic at an expected agreement of ", agr,
        el("div", { class: "muted" }, "Threshold: ", previewThreshold)),
      save, status);

    const facts = el("div", { class: "panel" }, el("h2", {}, "Now"),
      el("table", {}, el("tbody", {},
        el("tr", {}, el("th", {}, "Mode"), el("td", { id: "current-mode" }, settings.mode || "–")),
        el("tr", {}, el("th", {}, "Threshold"), el("td", { id: "current-threshold" }, settings.threshold === null || settings.threshold === undefined ? "from target" : fixed(settings.threshold, 3))),
        el("tr", {}, el("th", {}, "Target agreement"), el("td", { id: "current-target" }, fixed(settings.target_agreement, 3))),
        el("tr", {}, el("th", {}, "Threshold in force"), el("td", {}, thresholdNow === null ? "none reaches the target" : fixed(thresholdNow, 3))),
        el("tr", {}, el("th", {}, "Expected coverage / agreement"), el("td", {}, curve.expected ? pct(curve.expected.coverage) + " / " + pct(curve.expected.agreement) : "–")),
        el("tr", {}, el("th", {}, "Live version"), el("td", { id: "live-version" }, curve.version === null ? "none" : "v" + curve.version)),
        el("tr", {}, el("th", {}, "Teacher"), el("td", {}, route.teacher)),
        el("tr", {}, el("th", {}, "Exchanges"), el("td", {}, num(route.exchanges))))));

    // versions
    const vstatus = el("div", { class: "status-line", id: "version-status" });
    const liveVersion = curve.version;
    const versionRows = versions.map((v) => {
      const m = v.metrics || {};
      let action = null;
      if (v.status !== "live") {
        const kind = liveVersion !== null && v.version < liveVersion ? "rollback" : "promote";
        action = el("button", { class: "version-action", "data-version": v.version, onclick: async () => {
          if (!confirm(`${kind === "rollback" ? "Roll back to" : "Promote"} version ${v.version} of ${name}?`)) return;
          try { await api(`${base}/${kind}/${v.version}`, { method: "POST" }); location.reload(); }
          catch (e) { vstatus.textContent = e.message; }
        } }, kind === "rollback" ? "Roll back" : "Promote");
      }
      return el("tr", { "data-version": v.version },
        el("td", {}, "v" + v.version), el("td", {}, v.kind || "–"), el("td", {}, el("span", { class: "tag " + v.status }, v.status)),
        el("td", { class: "num" }, pct(m.agreement)), el("td", { class: "num" }, pct(m.coverage_at_target)),
        el("td", { class: "num" }, fixed(m.threshold_at_target, 3)), el("td", { class: "num" }, fixed(m.ece, 3)),
        el("td", { class: "num" }, pct(v.live_agreement) + (v.shadow_checks ? " (" + num(v.shadow_checks) + ")" : "")),
        el("td", {}, v.created ? when(v.created).slice(0, 16) : "–"), el("td", {}, action));
    });
    const versionsBox = el("div", { class: "panel" }, el("h2", {}, "Versions"),
      versions.length ? el("table", { id: "versions-table" }, el("thead", {}, el("tr", {},
        ["Version", "Kind", "Status", "Val. agreement", "Coverage @ target", "Threshold @ target", "ECE", "Live agreement", "Created (UTC)", ""].map((h) => el("th", {}, h)))),
        el("tbody", {}, versionRows)) : el("p", { class: "muted" }, "No student versions yet."), vstatus);

    // history of changes
    const eventsBox = el("div", { class: "panel" }, el("h2", {}, "Changes"),
      events.length ? el("table", { id: "events-table" }, el("tbody", {}, events.slice(0, 15).map((e) => el("tr", {},
        el("td", {}, when(e.ts)), el("td", {}, e.kind), el("td", {}, e.actor), el("td", { class: "text detail" }, e.detail ? clip(JSON.stringify(e.detail), 240) : ""))))) :
        el("p", { class: "muted" }, "No changes recorded."));

    // recent exchanges, student and teacher side by side when shadowed
    const exBox = el("div", { class: "panel" }, el("h2", {}, "Recent exchanges"),
      exchanges.length ? el("table", { id: "exchanges-table" },
        el("thead", {}, el("tr", {}, ["Time", "Served by", "Confidence", "Prompt", "Answer / student", "Teacher (shadow)", "Latency"].map((h) => el("th", {}, h)))),
        el("tbody", {}, exchanges.map((x) => el("tr", { "data-uid": x.uid },
          el("td", {}, when(x.ts)),
          el("td", {}, el("span", { class: "tag " + (x.served_by || "") }, x.served_by || "–"), x.student_version ? " v" + x.student_version : ""),
          el("td", { class: "num" }, fixed(x.confidence, 3)),
          el("td", { class: "text prompt" }, x.prompt),
          el("td", { class: "text answer" }, x.shadow ? x.shadow.student_answer : (x.answer || x.error || "")),
          el("td", { class: "text" }, x.shadow ? [x.shadow.teacher_answer, " ", el("span", { class: "tag " + (x.shadow.agree ? "live" : "disagree") }, x.shadow.agree ? "agree" : "disagree")] : ""),
          el("td", { class: "num" }, ms(x.latency_ms)))))) : el("p", { class: "muted" }, "No exchanges yet."));

    main.replaceChildren(
      el("p", {}, el("a", { href: "/dashboard" }, "← Overview")),
      el("h1", { id: "route-name" }, "Route ", name),
      el("div", { class: "grid2" },
        el("div", { class: "panel" }, el("h2", {}, "Coverage / agreement of the live version"), chartHolder),
        el("div", {}, control, modeBox)),
      el("div", { class: "grid2" }, versionsBox, facts),
      eventsBox,
      exBox);
    drawCurve(null);
    preview();
  }

  // -- boot --------------------------------------------------------------------------------------
  document.getElementById("logout").addEventListener("click", async () => {
    await fetch("/dashboard/logout", { method: "POST", credentials: "same-origin", headers: { "x-kdgate-csrf": CSRF } });
    location.href = "/dashboard";
  });
  const m = location.pathname.match(/^\/dashboard\/routes\/([^/]+)$/);
  (m ? routePage(decodeURIComponent(m[1])) : overviewPage()).catch((e) => main.replaceChildren(failure(e)));
})();
