/* Latency of a server's recent health checks (data from the json_script block #latency-data).
 * Failed checks are drawn as a red cross on the axis: shape and colour, and the caption counts them. */
(function () {
  "use strict";

  var source = document.getElementById("latency-data");
  var canvas = document.getElementById("latency-chart");
  if (!source || !canvas || !window.Chart) return;
  var points = JSON.parse(source.textContent).points || [];

  function label(iso) {
    var d = new Date(iso);
    return d.toISOString().slice(11, 19);
  }

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
})();
