// sensord's dashboard: polls the JSON API every few seconds and draws the
// overview (ingest rate, totals, sensors table) or one sensor's charts.
// Plain JavaScript, no build step; charts by uPlot.
"use strict";

(() => {
  const REFRESH_MS = 5000;
  const PAGE_SIZE = 50;
  const POINTS = 1000;

  const state = {
    sensors: [],
    /** The server's clock at the last /api/sensors, and ours then. */
    serverNow: 0,
    fetchedAt: 0,
    sort: { key: "id", dir: 1 },
    page: 0,
    filter: "",
    silentAfter: Number(localStorage.getItem("sensord.silentAfter")) || 60,
    /** The sensor shown (its id as text), or null for the overview. */
    sensor: null,
    window: localStorage.getItem("sensord.window") || "3600",
    rateChart: null,
    charts: new Map(),
    timer: 0,
  };

  const $ = (selector) => document.querySelector(selector);
  const color = (name) =>
    getComputedStyle(document.documentElement).getPropertyValue(name).trim();

  async function getJSON(url) {
    const response = await fetch(url, { cache: "no-store" });
    const body = await response.json();
    if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
    return body;
  }

  const count = (n) => (n == null ? "–" : n.toLocaleString("en-US"));
  const number = (x) => (x == null ? "–" : Math.abs(x) >= 1000 ? x.toFixed(0) : x.toFixed(1));
  const escape = (text) =>
    String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

  /** `3s`, `4m 12s`, `2h 5m`, `3d 4h`. */
  function age(seconds) {
    if (!Number.isFinite(seconds)) return "–";
    const s = Math.max(0, Math.round(seconds));
    if (s < 60) return `${s}s`;
    if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
    if (s < 86400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
    return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
  }

  function chartWidth(element) {
    return Math.max(280, element.clientWidth || element.parentElement.clientWidth || 600);
  }

  function axes(yLabel) {
    const stroke = color("--muted");
    const grid = { stroke: color("--line"), width: 1 };
    return [
      { stroke, grid, ticks: grid },
      { stroke, grid, ticks: grid, label: yLabel, size: 60 },
    ];
  }

  // ---- Overview ----

  const TOTALS = [
    ["received", "received (datagrams)"],
    ["accepted", "accepted"],
    ["rejected", "rejected"],
    ["persisted", "persisted"],
    ["queued", "queued"],
    ["kernel_drops", "kernel drops"],
    ["denied", "denied"],
    ["spilled", "spilled"],
    ["duplicates", "duplicates"],
    ["expired", "expired"],
    ["dead_letter", "dead letter"],
    ["lost", "lost"],
  ];
  /** Counters that mean trouble when not zero. */
  const BAD = new Set(["rejected", "kernel_drops", "denied", "spilled", "dead_letter", "lost"]);

  function drawSummary(summary) {
    const health = $("#health");
    health.textContent = summary.health.ok ? "healthy" : "unhealthy";
    health.className = `badge ${summary.health.ok ? "ok" : "bad"}`;
    health.title = summary.health.text;
    $("#last-commit").textContent =
      summary.last_commit == null
        ? "nothing committed yet"
        : `last commit ${age(summary.now - summary.last_commit)} ago`;
    $("#version").textContent = `v${summary.version}`;
    const c = summary.counters;
    $("#totals").innerHTML = TOTALS.map(
      ([key, label]) =>
        `<div class="${BAD.has(key) && c[key] > 0 ? "nonzero" : ""}" data-counter="${key}">` +
        `<dt>${label}</dt><dd>${count(c[key])}</dd></div>`,
    ).join("");
    const reasons = Object.entries(summary.rejected_by_reason)
      .filter(([, n]) => n > 0)
      .map(([reason, n]) => `${reason} ${count(n)}`);
    $("#reasons").textContent = reasons.length ? `rejected by reason: ${reasons.join(", ")}` : "";
    drawRate(summary.rate);
  }

  function drawRate(rate) {
    const element = $("#rate-chart");
    const data = [rate.t, rate.received, rate.accepted, rate.persisted];
    element.dataset.points = String(rate.t.length);
    if (state.rateChart) {
      state.rateChart.setData(data);
      return;
    }
    state.rateChart = new uPlot(
      {
        width: chartWidth(element),
        height: 200,
        series: [
          {},
          { label: "received datagrams/s", stroke: color("--c1"), width: 1.5 },
          { label: "accepted readings/s", stroke: color("--c3"), width: 1.5 },
          { label: "persisted readings/s", stroke: color("--c2"), width: 1.5 },
        ],
        axes: axes("per second"),
        scales: { y: { range: (u, min, max) => [0, Math.max(1, max * 1.1)] } },
      },
      data,
      element,
    );
  }

  // ---- Sensors table ----

  function sensorAge(sensor) {
    const now = state.serverNow + (Date.now() - state.fetchedAt) / 1000;
    return now - sensor.last_seen;
  }

  function compare(a, b, key) {
    if (key === "id") {
      const [x, y] = [a.id, b.id];
      if (typeof x === typeof y) return x < y ? -1 : x > y ? 1 : 0;
      return typeof x === "number" ? -1 : 1;
    }
    const [x, y] = [a[key], b[key]];
    if (x == null || y == null) return x == null ? (y == null ? 0 : 1) : -1;
    return x - y;
  }

  function visibleSensors() {
    const filter = state.filter.toLowerCase();
    const { key, dir } = state.sort;
    return state.sensors
      .filter((s) => !filter || String(s.id).toLowerCase().includes(filter))
      .sort((a, b) => {
        const order = compare(a, b, key);
        // Nulls stay last whichever the direction.
        if (key !== "id" && (a[key] == null || b[key] == null)) return order;
        return order * dir || compare(a, b, "id");
      });
  }

  /** A sparkline of `values` (nulls are gaps) as inline SVG. */
  function sparkline(values, stroke) {
    const width = 90;
    const height = 22;
    const present = values.filter((v) => v != null);
    if (!present.length) return "";
    const min = Math.min(...present);
    const span = Math.max(...present) - min || 1;
    const step = width / Math.max(1, values.length - 1);
    const runs = [];
    let run = [];
    values.forEach((v, i) => {
      if (v == null) {
        if (run.length) runs.push(run);
        run = [];
        return;
      }
      const y = height - 2 - ((v - min) / span) * (height - 4);
      run.push(`${(i * step).toFixed(1)},${y.toFixed(1)}`);
    });
    if (run.length) runs.push(run);
    const lines = runs
      .map((r) =>
        r.length === 1
          ? `<circle cx="${r[0].split(",")[0]}" cy="${r[0].split(",")[1]}" r="1.5" fill="${stroke}"/>`
          : `<polyline points="${r.join(" ")}" stroke="${stroke}"/>`,
      )
      .join("");
    return `<svg class="spark" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}">${lines}</svg>`;
  }

  function drawSensors() {
    const sensors = visibleSensors();
    const pages = Math.max(1, Math.ceil(sensors.length / PAGE_SIZE));
    state.page = Math.min(state.page, pages - 1);
    const shown = sensors.slice(state.page * PAGE_SIZE, (state.page + 1) * PAGE_SIZE);
    const table = $("#sensors");
    table.dataset.rows = String(sensors.length);
    const [t, h] = [color("--c1"), color("--c2")];
    table.tBodies[0].innerHTML = shown
      .map((s) => {
        const seconds = sensorAge(s);
        const silent = seconds > state.silentAfter;
        const loss = s.loss_ratio == null ? "–" : `${(s.loss_ratio * 100).toFixed(2)}%`;
        return (
          `<tr data-sensor="${escape(s.id)}" class="${silent ? "silent" : ""}">` +
          `<td>${escape(s.id)}${silent ? '<span class="tag">silent</span>' : ""}</td>` +
          `<td class="num">${count(s.readings_last_hour)}</td>` +
          `<td class="num age">${age(seconds)} ago</td>` +
          `<td class="num">${loss}</td>` +
          `<td class="num">${number(s.temperature)}</td>` +
          `<td class="spark-cell">${sparkline(s.spark.temperature, t)}</td>` +
          `<td class="num">${number(s.humidity)}</td>` +
          `<td class="spark-cell">${sparkline(s.spark.humidity, h)}</td>` +
          "</tr>"
        );
      })
      .join("");
    const silent = state.sensors.filter((s) => sensorAge(s) > state.silentAfter).length;
    $("#sensor-count").textContent =
      `${count(state.sensors.length)}` + (silent ? `, ${count(silent)} silent` : "");
    const first = sensors.length ? state.page * PAGE_SIZE + 1 : 0;
    $("#page-info").textContent =
      `${first}–${state.page * PAGE_SIZE + shown.length} of ${count(sensors.length)}`;
    $("#prev").disabled = state.page === 0;
    $("#next").disabled = state.page >= pages - 1;
    for (const th of table.tHead.rows[0].cells) {
      const sorted = th.dataset.sort === state.sort.key;
      th.className = th.className.replace(/ ?sorted-(asc|desc)/, "");
      if (sorted) th.className += state.sort.dir > 0 ? " sorted-asc" : " sorted-desc";
    }
  }

  // ---- One sensor ----

  function windowQuery() {
    if (state.window === "all") return `points=${POINTS}`;
    const to = Date.now() / 1000;
    return `from=${(to - Number(state.window)).toFixed(3)}&to=${to.toFixed(3)}&points=${POINTS}`;
  }

  async function loadSensor() {
    const id = state.sensor;
    const data = await getJSON(
      `/api/sensors/${encodeURIComponent(id)}/readings?${windowQuery()}`,
    );
    if (state.sensor !== id) return;
    $("#sensor-info").textContent =
      `${count(data.readings)} readings in this window, ` +
      `${count(data.t.length)} points of up to ${count(data.points)} ` +
      `(buckets of ${age(data.bucket_seconds)}; line: mean, band: min to max)`;
    drawCharts(data);
  }

  /**
   * The columns `[t, min, avg, max]` of `series`, with a break (nulls)
   * wherever the sensor was silent for much longer than its usual spacing,
   * so that a silence is drawn as a gap, not as a line across it.
   */
  function withGaps(t, series) {
    const steps = t.slice(1).map((x, i) => x - t[i]).sort((a, b) => a - b);
    const usual = steps.length ? steps[Math.floor(steps.length / 2)] : 0;
    const columns = [[], [], [], []];
    t.forEach((x, i) => {
      if (i > 0 && x - t[i - 1] > 10 * usual) {
        columns[0].push((x + t[i - 1]) / 2);
        for (const c of columns.slice(1)) c.push(null);
      }
      columns[0].push(x);
      columns[1].push(series.min[i]);
      columns[2].push(series.avg[i]);
      columns[3].push(series.max[i]);
    });
    return columns;
  }

  function drawCharts(data) {
    state.range = { from: data.from, to: data.to };
    const holder = $("#charts");
    const names = data.series.map((s) => s.name).join("\n");
    if (holder.dataset.names !== names) {
      for (const chart of state.charts.values()) chart.destroy();
      state.charts.clear();
      holder.innerHTML = data.series.length
        ? ""
        : '<p class="muted">No readings in this window.</p>';
      holder.dataset.names = names;
    }
    const palette = ["--c1", "--c2", "--c3", "--c4"].map(color);
    data.series.forEach((series, i) => {
      const label = series.unit ? `${series.name} (${series.unit})` : series.name;
      const values = withGaps(data.t, series);
      let chart = state.charts.get(series.name);
      if (!chart) {
        const block = document.createElement("div");
        block.className = "chart-block";
        block.innerHTML = `<h3>${escape(label)}</h3><div class="chart"></div>`;
        holder.appendChild(block);
        const element = block.querySelector(".chart");
        element.dataset.series = series.name;
        const stroke = palette[i % palette.length];
        const faint = `${stroke}55`;
        chart = new uPlot(
          {
            width: chartWidth(element),
            height: 220,
            series: [
              {},
              { label: "min", stroke: faint, width: 1 },
              { label: label, stroke, width: 2 },
              { label: "max", stroke: faint, width: 1 },
            ],
            bands: [{ series: [3, 1], fill: `${stroke}22` }],
            axes: axes(label),
            scales: { x: { time: true, range: () => [state.range.from, state.range.to] } },
          },
          [[], [], [], []],
          element,
        );
        state.charts.set(series.name, chart);
      }
      chart.setData(values);
      const element = chart.root.parentElement;
      element.dataset.points = String(series.avg.filter((v) => v != null).length);
    });
    holder.dataset.loaded = "1";
  }

  // ---- Navigation and refresh ----

  function markWindow() {
    document
      .querySelectorAll("#windows button")
      .forEach((b) => b.classList.toggle("active", b.dataset.window === state.window));
  }

  const WINDOWS = ["900", "3600", "86400", "604800", "all"];

  /** `#sensor=ID` shows a sensor, `&window=SECONDS|all` picks its window. */
  function route() {
    const params = new URLSearchParams(location.hash.slice(1));
    state.sensor = params.get("sensor");
    if (WINDOWS.includes(params.get("window"))) state.window = params.get("window");
    markWindow();
    $("#overview").hidden = state.sensor !== null;
    $("#sensor-view").hidden = state.sensor === null;
    if (state.sensor !== null) {
      $("#sensor-name").textContent = state.sensor;
      for (const chart of state.charts.values()) chart.destroy();
      state.charts.clear();
      $("#charts").innerHTML = "";
      delete $("#charts").dataset.names;
      delete $("#charts").dataset.loaded;
    }
    refresh();
  }

  async function refresh() {
    clearTimeout(state.timer);
    try {
      const summary = getJSON("/api/summary");
      if (state.sensor === null) {
        const sensors = await getJSON("/api/sensors");
        state.sensors = sensors.sensors;
        state.serverNow = sensors.now;
        state.fetchedAt = Date.now();
        drawSensors();
      } else {
        await loadSensor();
      }
      drawSummary(await summary);
      document.body.dataset.error = "";
    } catch (e) {
      document.body.dataset.error = String(e.message || e);
      $("#health").textContent = `cannot reach sensord: ${e.message || e}`;
      $("#health").className = "badge bad";
    } finally {
      state.timer = setTimeout(refresh, REFRESH_MS);
    }
  }

  function setUp() {
    $("#silent-after").value = state.silentAfter;
    $("#silent-after").addEventListener("input", (e) => {
      const value = Number(e.target.value);
      if (value > 0) {
        state.silentAfter = value;
        localStorage.setItem("sensord.silentAfter", String(value));
        drawSensors();
      }
    });
    $("#filter").addEventListener("input", (e) => {
      state.filter = e.target.value.trim();
      state.page = 0;
      drawSensors();
    });
    $("#sensors thead").addEventListener("click", (e) => {
      const key = e.target.dataset && e.target.dataset.sort;
      if (!key) return;
      state.sort = { key, dir: state.sort.key === key ? -state.sort.dir : 1 };
      drawSensors();
    });
    $("#sensors tbody").addEventListener("click", (e) => {
      const row = e.target.closest("tr");
      if (row) location.hash = new URLSearchParams({ sensor: row.dataset.sensor }).toString();
    });
    $("#prev").addEventListener("click", () => {
      state.page -= 1;
      drawSensors();
    });
    $("#next").addEventListener("click", () => {
      state.page += 1;
      drawSensors();
    });
    document.querySelectorAll("#windows button").forEach((button) =>
      button.addEventListener("click", () => {
        state.window = button.dataset.window;
        localStorage.setItem("sensord.window", state.window);
        markWindow();
        refresh();
      }),
    );
    let resizing = 0;
    window.addEventListener("resize", () => {
      clearTimeout(resizing);
      resizing = setTimeout(() => {
        const charts = [state.rateChart, ...state.charts.values()].filter(Boolean);
        for (const chart of charts) {
          chart.setSize({ width: chartWidth(chart.root.parentElement), height: chart.height });
        }
      }, 150);
    });
    window.addEventListener("hashchange", route);
    route();
  }

  setUp();
})();
