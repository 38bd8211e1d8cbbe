// LTE dashboard: polls api/status about once a second and redraws the page in place.
// No library: the charts are inline SVG drawn below, every string goes in through textContent.
"use strict";

(() => {
  const POLL_MS = 1000;
  const HIDDEN_POLL_MS = 5000; // a background tab asks less often
  const MAX_MARKERS = 80; // a series with more points is drawn as a bare line
  const token = new URLSearchParams(window.location.search).get("token");
  const fetchOptions = { cache: "no-store", headers: token ? { Authorization: "Bearer " + token } : {} };
  let lastStatus = null;
  let lastJobKey = "";

  // -- formatting ----------------------------------------------------------------------------
  const isNum = (v) => typeof v === "number" && Number.isFinite(v);

  function fmtNum(v, digits = 3) {
    if (!isNum(v)) return "–";
    if (v !== 0 && (Math.abs(v) >= 1e5 || Math.abs(v) < 1e-3)) return v.toExponential(2);
    return Number(v.toPrecision(digits)).toString();
  }

  function fmtCount(v) {
    if (!isNum(v)) return "–";
    const a = Math.abs(v);
    if (a >= 1e9) return (v / 1e9).toFixed(a >= 1e10 ? 0 : 1) + "G";
    if (a >= 1e6) return (v / 1e6).toFixed(a >= 1e7 ? 0 : 1) + "M";
    if (a >= 1e3) return (v / 1e3).toFixed(a >= 1e4 ? 0 : 1) + "k";
    return Number.isInteger(v) ? String(v) : v.toFixed(1);
  }

  function fmtBytes(v) {
    if (!isNum(v)) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (Math.abs(v) >= 1024 && i < units.length - 1) {
      v /= 1024;
      i += 1;
    }
    return (i === 0 ? String(Math.round(v)) : v.toFixed(Math.abs(v) >= 100 ? 0 : 1)) + " " + units[i];
  }

  function fmtSeconds(v) {
    if (!isNum(v)) return "–";
    if (v < 60) return v.toFixed(v < 10 ? 1 : 0) + " s";
    if (v < 3600) return Math.floor(v / 60) + " min " + Math.round(v % 60) + " s";
    return Math.floor(v / 3600) + " h " + Math.round((v % 3600) / 60) + " min";
  }

  const fmtPercent = (v) => (isNum(v) ? (100 * v).toFixed(2) + " %" : "–");

  // -- DOM helpers ---------------------------------------------------------------------------
  const $ = (sel) => document.querySelector(sel);

  function setText(sel, text) {
    const el = $(sel);
    if (el && el.textContent !== text) el.textContent = text;
  }

  function cell(row, text, cls) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    row.appendChild(td);
    return td;
  }

  // -- charts --------------------------------------------------------------------------------
  // One chart = one <figure class="chart">: an inline <svg> in its .plot, data-points set to the
  // number of finite points drawn (a browser test counts them), a legend and a hover read-out.

  function niceStep(span, count) {
    const raw = span / Math.max(1, count);
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const norm = raw / mag;
    return (norm <= 1 ? 1 : norm <= 2 ? 2 : norm <= 2.5 ? 2.5 : norm <= 5 ? 5 : 10) * mag;
  }

  function ticks(lo, hi, count) {
    const step = niceStep(hi - lo, count);
    const out = [];
    for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) out.push(t);
    return out;
  }

  function extent(values, padFraction, zeroBased) {
    let lo = Math.min(...values);
    let hi = Math.max(...values);
    if (zeroBased) lo = Math.min(lo, 0);
    if (lo === hi) {
      const d = lo === 0 ? 1 : Math.abs(lo) * 0.1;
      return [lo - d, hi + d];
    }
    const pad = (hi - lo) * padFraction;
    return [zeroBased && lo === 0 ? 0 : lo - pad, hi + pad];
  }

  function svgChild(parent, name, attrs, text) {
    const el = document.createElementNS(parent.namespaceURI, name); // the <svg>'s namespace, as parsed
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
    if (text !== undefined) el.textContent = text;
    parent.appendChild(el);
    return el;
  }

  function drawChart(figure, spec) {
    const plot = figure.querySelector(".plot");
    const series = spec.series.map((s) => ({ ...s, points: s.points.filter((p) => isNum(p[0]) && isNum(p[1])) }));
    const all = series.flatMap((s) => s.points);
    figure.dataset.points = String(all.length);
    figure.dataset.series = series.map((s) => s.points.length).join(",");

    const width = Math.max(240, Math.floor(plot.clientWidth || 480));
    const height = 220;
    const m = { left: 58, right: 14, top: 12, bottom: 34 };
    plot.innerHTML = '<svg class="chart-svg" role="img"></svg><div class="tip" hidden></div>';
    const svg = plot.firstChild;
    const tip = plot.lastChild;
    svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    svg.setAttribute("width", String(width));
    svg.setAttribute("height", String(height));
    svg.setAttribute("aria-label", figure.querySelector("figcaption").textContent.trim());

    renderLegend(figure, series);
    if (all.length === 0) {
      svgChild(svg, "text", { x: width / 2, y: height / 2, class: "empty", "text-anchor": "middle" }, spec.empty || "waiting for data");
      return;
    }
    const [x0, x1] = extent(all.map((p) => p[0]), 0.02, false);
    const [y0, y1] = extent(all.map((p) => p[1]), 0.08, spec.zeroBased);
    const px = (x) => m.left + ((x - x0) / (x1 - x0)) * (width - m.left - m.right);
    const py = (y) => height - m.bottom - ((y - y0) / (y1 - y0)) * (height - m.top - m.bottom);

    const grid = svgChild(svg, "g", { class: "grid" });
    for (const t of ticks(y0, y1, 4)) {
      svgChild(grid, "line", { x1: m.left, x2: width - m.right, y1: py(t), y2: py(t) });
      svgChild(grid, "text", { x: m.left - 6, y: py(t) + 4, "text-anchor": "end" }, spec.yFormat(t));
    }
    for (const t of ticks(x0, x1, Math.max(2, Math.floor(width / 110)))) {
      svgChild(grid, "line", { x1: px(t), x2: px(t), y1: m.top, y2: height - m.bottom, class: "v" });
      svgChild(grid, "text", { x: px(t), y: height - m.bottom + 16, "text-anchor": "middle" }, spec.xFormat(t));
    }
    svgChild(svg, "text", { x: width - m.right, y: height - 4, "text-anchor": "end", class: "axis-label" }, spec.xLabel);

    series.forEach((s, i) => {
      if (!s.points.length) return;
      const d = s.points.map((p, j) => (j ? "L" : "M") + px(p[0]).toFixed(1) + " " + py(p[1]).toFixed(1)).join("");
      svgChild(svg, "path", { d, class: "line s" + i });
      if (s.points.length <= MAX_MARKERS) {
        const g = svgChild(svg, "g", { class: "markers s" + i });
        for (const p of s.points) svgChild(g, "circle", { cx: px(p[0]).toFixed(1), cy: py(p[1]).toFixed(1), r: 2.5 });
      }
    });

    const cursor = svgChild(svg, "line", { class: "cursor", y1: m.top, y2: height - m.bottom, visibility: "hidden" });
    svg.addEventListener("mousemove", (ev) => {
      const box = svg.getBoundingClientRect();
      const x = ((ev.clientX - box.left) / box.width) * width;
      let best = null;
      series.forEach((s) => {
        for (const p of s.points) {
          const dist = Math.abs(px(p[0]) - x);
          if (!best || dist < best.dist) best = { dist, p, s };
        }
      });
      if (!best) return;
      cursor.setAttribute("x1", px(best.p[0]));
      cursor.setAttribute("x2", px(best.p[0]));
      cursor.setAttribute("visibility", "visible");
      const lines = series
        .map((s) => {
          const hit = s.points.find((p) => p[0] === best.p[0]);
          return hit ? s.label + ": " + spec.yFormat(hit[1]) : null;
        })
        .filter(Boolean);
      tip.textContent = spec.xLabel + " " + spec.xFormat(best.p[0]) + " · " + lines.join(" · ");
      tip.hidden = false;
    });
    svg.addEventListener("mouseleave", () => {
      cursor.setAttribute("visibility", "hidden");
      tip.hidden = true;
    });
  }

  function renderLegend(figure, series) {
    let legend = figure.querySelector(".legend");
    if (!legend) {
      legend = document.createElement("div");
      legend.className = "legend";
      figure.querySelector("figcaption").appendChild(legend);
    }
    legend.replaceChildren(
      ...series.map((s, i) => {
        const item = document.createElement("span");
        item.className = "key s" + i;
        item.textContent = s.label;
        return item;
      })
    );
  }

  // -- page ----------------------------------------------------------------------------------
  function renderSummary(st) {
    const job = st.job || {};
    setText("#job-title", `${job.model || "?"} on ${job.dataset || "?"} · N=${job.heads} r=${job.rank} T=${job.merge_every} · ${job.mode || ""}`);
    setText("#stat-version", String(st.version));
    setText("#stat-state", st.done ? "done" : st.workers_active ? "training" : "waiting for workers");
    setText("#stat-merges", fmtNum(st.merges_per_minute, 3));
    setText("#stat-rate", fmtCount(st.samples_per_s));
    setText("#stat-samples", fmtCount(st.samples));
    setText("#stat-workers", `${st.workers_active} active / ${st.workers.length}`);
    setText("#stat-loss", fmtNum(st.train_loss, 4));
    const lm = st.task === "lm"; // language models: perplexity where images show accuracy
    setText("#stat-accuracy-label", lm ? "val perplexity" : "test accuracy");
    setText("#stat-accuracy", lm ? fmtNum(st.perplexity, 4) : fmtPercent(st.test_accuracy));
    $("#stat-bpb-card").hidden = !lm;
    if (lm) setText("#stat-bpb", fmtNum(st.bits_per_byte, 4));
    setText("#stat-bytes-up", fmtBytes(st.bytes_up));
    setText("#stat-bytes-down", fmtBytes(st.bytes_down));
    $("#stat-progress").value = st.progress || 0;
    setText(
      "#stat-progress-text",
      `${st.head_rounds_done}/${st.target_head_rounds} head-rounds · ${fmtSeconds(st.elapsed_s)}` +
        (!st.done && isNum(st.eta_s) ? ` · ETA ${fmtSeconds(st.eta_s)}` : "")
    );
    const waiting = Object.entries(st.waiting_heads || {});
    setText(
      "#free-heads",
      waiting.length ? `· waiting: ${waiting.map(([h, why]) => `head ${h} (${why})`).join("; ")}` : ""
    );
    const counters = [
      [st.snapshot_builds, "snapshots built"],
      [st.pushes_refused, "stale pushes refused"],
      [st.guard_outliers - st.guard_clipped, "outlier pushes refused"],
      [st.guard_clipped, "outlier pushes clipped"],
      [st.guard_rollbacks, "merges rolled back"],
      [(st.guard_quarantined || []).length, "workers quarantined"],
      [st.pulls_turned_away, "long-polls turned away"],
    ].filter(([n]) => n > 0);
    setText(
      "#server-counters",
      counters.map(([n, what]) => `· ${fmtCount(n)} ${what}`).join(" ") +
        (st.guard_last ? ` · update guard: ${st.guard_last}` : "")
    );
    const warning = $("#checkpoint-warning");
    warning.hidden = !st.checkpoint_warning;
    warning.textContent = st.checkpoint_warning || "";
    document.title = `LTE v${st.version}${st.done ? " (done)" : ""}`;
  }

  function renderWorkers(workers) {
    const body = $("#workers tbody");
    const rank = (w) => (w.state === "left" || w.state === "expired" || w.state === "failed" ? 1 : 0);
    const rows = [...workers].sort((a, b) => rank(a) - rank(b) || a.worker_id.localeCompare(b.worker_id, undefined, { numeric: true }));
    const fragment = document.createDocumentFragment();
    for (const w of rows) {
      const tr = document.createElement("tr");
      tr.dataset.workerId = w.worker_id;
      tr.dataset.state = w.state;
      cell(tr, w.worker_id, "mono");
      cell(tr, w.name || "–");
      cell(tr, w.device || "–");
      cell(tr, w.heads.join(", "), "num");
      cell(tr, fmtSeconds(w.last_seen_s) + " ago", "num");
      cell(tr, w.staleness === null ? "–" : String(w.staleness), "num");
      cell(tr, fmtCount(w.samples_per_s), "num");
      cell(tr, fmtCount(w.samples), "num");
      cell(tr, String(w.pushes), "num");
      cell(tr, fmtBytes(w.bytes_up), "num");
      cell(tr, fmtBytes(w.bytes_down), "num");
      cell(tr, fmtNum(w.train_loss, 4), "num");
      const state = cell(tr, "");
      const badge = document.createElement("span");
      badge.className = "badge";
      badge.dataset.state = w.state;
      badge.textContent = w.state;
      if (w.failure) badge.title = w.failure;
      state.appendChild(badge);
      if (w.failure) state.appendChild(document.createTextNode(" " + w.failure));
      fragment.appendChild(tr);
    }
    body.replaceChildren(fragment);
    $("#workers-empty").hidden = workers.length > 0;
  }

  // options that only image jobs use: a language model's page leaves them out
  const IMAGE_ONLY = new Set([
    "image_size", "in_channels", "classes", "augment", "label_smoothing", "mixup", "cutmix",
    "randaugment_ops", "randaugment_magnitude",
  ]);

  function renderJob(job, server) {
    const key = JSON.stringify([job, server]);
    if (key === lastJobKey) return;
    lastJobKey = key;
    const shown = Object.entries(job).filter(([k]) => job.task !== "lm" || !IMAGE_ONLY.has(k));
    $("#job").replaceChildren(...shown.map(settingItem));
    $("#server-settings").replaceChildren(...Object.entries(server).map(settingItem));
  }

  function settingItem([k, v]) {
    const item = document.createElement("div");
    const dt = document.createElement("dt");
    const dd = document.createElement("dd");
    dt.textContent = k;
    dd.textContent = v === null ? "–" : String(v);
    item.append(dt, dd);
    return item;
  }

  function renderCharts(st) {
    const h = st.history;
    const ev = st.evals;
    const loss = (x) => [
      { label: "train loss", points: h.map((r) => [r[x], r.train_loss]) },
      { label: st.task === "lm" ? "val loss" : "test loss", points: ev.map((e) => [e[x], e.test_loss]) },
    ];
    const lm = st.task === "lm";
    const accuracy = (x) =>
      lm
        ? [{ label: "val perplexity", points: ev.map((e) => [e[x], e.perplexity]) }]
        : [{ label: "test accuracy", points: ev.map((e) => [e[x], e.test_accuracy]) }];
    for (const el of document.querySelectorAll(".metric-name")) {
      if (el.textContent !== (lm ? "Validation perplexity" : "Test accuracy")) el.textContent = lm ? "Validation perplexity" : "Test accuracy";
    }
    const pct = (v) => (100 * v).toFixed(Math.abs(v) < 0.1 ? 1 : 0) + "%";
    const charts = {
      "chart-loss-version": { series: loss("version"), xLabel: "version", xFormat: fmtCount, yFormat: (v) => fmtNum(v, 3) },
      "chart-loss-samples": { series: loss("samples"), xLabel: "samples", xFormat: fmtCount, yFormat: (v) => fmtNum(v, 3) },
      "chart-accuracy-version": { series: accuracy("version"), xLabel: "version", xFormat: fmtCount, yFormat: lm ? (v) => fmtNum(v, 3) : pct, empty: "waiting for an evaluation" },
      "chart-accuracy-samples": { series: accuracy("samples"), xLabel: "samples", xFormat: fmtCount, yFormat: lm ? (v) => fmtNum(v, 3) : pct, empty: "waiting for an evaluation" },
      "chart-bytes-time": {
        series: [
          { label: "up (factors)", points: h.map((r) => [r.time, r.bytes_up]) },
          { label: "down (snapshots)", points: h.map((r) => [r.time, r.bytes_down]) },
        ],
        xLabel: "seconds",
        xFormat: (v) => fmtCount(v),
        yFormat: fmtBytes,
        zeroBased: true,
      },
    };
    for (const [id, spec] of Object.entries(charts)) {
      const figure = document.getElementById(id);
      if (figure) drawChart(figure, spec);
    }
  }

  function renderModel(m) {
    if (!m.entries) return;
    const kinds = Object.entries(m.entries).map(([k, n]) => `${n} ${k}`).join(", ");
    const share = `${(100 * (m.full_rank_up_share || 0)).toFixed(1)} %`;
    setText("#model-summary", `${kinds}; a worker holds ${fmtBytes(m.memory_bytes)}, sends ${fmtBytes(m.up_bytes_per_round)} per round (${share} full-rank), receives ${fmtBytes(m.down_bytes_per_version)} per version`);
    setText("#model-warnings", (m.warnings || []).map((w) => "warning: " + w).join(" "));
  }

  function renderSample(st) {
    // textContent only: generated text is untrusted and must never become markup
    const text = st.text_sample;
    $("#text-sample-section").hidden = typeof text !== "string";
    if (typeof text !== "string") return;
    const given = st.text_sample_prompt;
    const prompt = typeof given === "string" && text.startsWith(given) ? given : "";
    setText("#text-sample-prompt", prompt);
    setText("#text-sample-rest", text.slice(prompt.length));
    setText("#text-sample-version", `· version ${st.text_sample_version}`);
  }

  function render(st) {
    lastStatus = st;
    renderSummary(st);
    renderWorkers(st.workers);
    renderJob(st.job || {}, st.server || {});
    renderModel(st.model || {});
    renderCharts(st);
    renderSample(st);
    setText("#updated", new Date().toLocaleTimeString());
  }

  function setConnection(state, text) {
    const badge = $("#connection");
    badge.dataset.state = state;
    badge.textContent = text;
  }

  async function poll() {
    try {
      const response = await fetch("api/status", fetchOptions);
      if (response.status === 401) throw new Error("unauthorised: open this page with ?token=…");
      if (!response.ok) throw new Error("HTTP " + response.status);
      render(await response.json());
      setConnection("live", lastStatus.done ? "done" : "live");
    } catch (err) {
      setConnection("error", lastStatus ? "offline · showing the last data" : String(err.message || err));
    } finally {
      window.setTimeout(poll, document.hidden ? HIDDEN_POLL_MS : POLL_MS);
    }
  }

  let resizeTimer = 0;
  window.addEventListener("resize", () => {
    window.clearTimeout(resizeTimer);
    resizeTimer = window.setTimeout(() => lastStatus && renderCharts(lastStatus), 150);
  });
  poll();
})();
