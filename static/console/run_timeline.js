// The run page's timeline: a Gantt of each step's queued, running and waiting spans, drawn with
// Plotly from the JSON island #run-timeline-data (data only; nothing inline runs).
(function () {
  "use strict";
  function draw() {
    var island = document.getElementById("run-timeline-data");
    var chart = document.getElementById("run-timeline-chart");
    if (!island || !chart || typeof Plotly === "undefined") return;
    var data = JSON.parse(island.textContent);
    if (!data.bars.length) { chart.textContent = "Nothing has run yet."; return; }
    var dark = window.matchMedia && window.matchMedia("(prefers-color-scheme: dark)").matches;
    var colours = { queued: "#9aa5b4", running: "#1f5fbf", succeeded: "#1b7a3a", failed: "#b42318",
                    cancelled: "#6b7280", skipped: "#6b7280", waiting: "#c68a00" };
    var byPhase = {};
    data.bars.forEach(function (bar) {
      var phase = bar.phase;
      var trace = byPhase[phase];
      if (!trace) {
        trace = byPhase[phase] = { type: "bar", orientation: "h", name: phase, x: [], y: [], base: [],
          marker: { color: colours[phase.split(" ")[0]] || "#7fb0ff" },
          hovertemplate: "%{y}: " + phase + " %{base|%H:%M:%S} → %{customdata}<extra></extra>", customdata: [] };
      }
      var from = new Date(bar.from), to = new Date(bar.to);
      trace.y.push(bar.step); trace.base.push(bar.from);
      trace.x.push(Math.max(to - from, 1)); trace.customdata.push(bar.to.slice(11, 19));
    });
    var traces = Object.keys(byPhase).map(function (k) { return byPhase[k]; });
    if (data.marks.length) {
      traces.push({ type: "scatter", mode: "markers", name: "failed attempt", text: data.marks.map(function (m) { return m.label; }),
        x: data.marks.map(function (m) { return m.at; }), y: data.marks.map(function (m) { return m.step; }),
        marker: { symbol: "x", size: 10, color: dark ? "#ff9b90" : "#b42318" }, hoverinfo: "text+y" });
    }
    // Steps top to bottom in the order they were created (as the steps table lists them), not
    // in the order Plotly first meets them across the traces.
    var steps = [];
    data.bars.forEach(function (b) { if (steps.indexOf(b.step) < 0) steps.push(b.step); });
    Plotly.newPlot(chart, traces, {
      barmode: "overlay", height: 100 + 28 * steps.length,
      margin: { l: 140, r: 10, t: 30, b: 50 }, xaxis: { type: "date" },
      yaxis: { autorange: "reversed", categoryorder: "array", categoryarray: steps },
      paper_bgcolor: "rgba(0,0,0,0)", plot_bgcolor: "rgba(0,0,0,0)",
      font: { color: dark ? "#e4e8ee" : "#1c2430", family: getComputedStyle(document.body).fontFamily },
      // Above the plot: below it, the legend sat on the time axis's labels.
      legend: { orientation: "h", x: 0, y: 1, yanchor: "bottom" }
    }, { displayModeBar: false, responsive: true });
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", draw);
  else draw();
})();
