/* Latency of a server's recent health checks (data in the canvas's data-points attribute).
 * Failed checks are drawn as a red cross on the axis: shape and colour, and the caption counts them.
 * The page's poll replaces the card when a check is recorded: the chart is drawn again then. */
(function () {
  "use strict";

  function label(iso) {
    var d = new Date(iso);
    return d.toISOString().slice(11, 19);
  }

  function draw() {
    // No id on the canvas: htmx would carry the old one's inline style (set by Chart.js) over to the new one.
    var canvas = document.querySelector("#latency-body canvas");
    if (!window.Chart) return;
    // Charts whose canvas the swap removed would otherwise stay registered.
    Object.values(window.Chart.instances).forEach(function (chart) {
      if (!document.body.contains(chart.canvas)) chart.destroy();
    });
    if (!canvas || window.Chart.getChart(canvas)) return;
    var points = JSON.parse(canvas.getAttribute("data-points") || "[]");
    new window.Chart(canvas, {
      type: "line",
      data: {
        labels: points.map(function (p) { return label(p.t); }),
        datasets: [
          {label: "Latency (ms)", data: points.map(function (p) { return p.ok ? p.ms : null; }),
            borderColor: "#2352c9", backgroundColor: "#2352c9", borderWidth: 2, pointRadius: 2, spanGaps: true},
          {label: "Failed check", data: points.map(function (p) { return p.ok ? null : 0; }),
            borderColor: "#b42318", backgroundColor: "#b42318", showLine: false, pointStyle: "crossRot",
            pointRadius: 7, pointBorderWidth: 2}
        ]
      },
      options: {
        responsive: true, maintainAspectRatio: false, animation: false,
        plugins: {legend: {display: true, position: "bottom", labels: {usePointStyle: true}}},
        scales: {x: {title: {display: true, text: "UTC"}, ticks: {maxTicksLimit: 6}},
          y: {beginAtZero: true, title: {display: true, text: "ms"}}}
      }
    });
  }

  draw();
  document.addEventListener("htmx:afterSettle", draw);
  // A test run on this page records a check: the cards follow at once rather than at the next poll.
  document.addEventListener("htmx:afterRequest", function (event) {
    var summary = document.getElementById("server-summary");
    if (summary && event.detail.elt && event.detail.elt.id === "test-connection" && window.htmx) {
      window.htmx.trigger(summary, "refresh");
    }
  });
})();
